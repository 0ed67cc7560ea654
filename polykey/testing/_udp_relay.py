"""A lossy UDP relay on real sockets, for testing transports under loss.

The relay listens on one address and forwards every datagram to ``target``,
and the answers back to whoever last sent to it. Each datagram, in either
direction, may be dropped, duplicated, delayed or reordered, decided by a
seeded random generator so a failing run can be repeated. Set ``blackhole``
to make the peer behind it vanish without a word.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import attrs
import trio

from ..quic import Address

__all__ = ["LossyUDPRelay", "RelayStatistics"]


@attrs.define
class RelayStatistics:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0


class LossyUDPRelay:
    """Run with ``await nursery.start(relay.run)``; then dial
    ``relay.address`` instead of the target.

    ``drop`` and ``duplicate`` are probabilities per datagram; ``delay`` is a
    probability of holding a datagram back for up to ``max_delay`` seconds,
    which also reorders it behind later ones. IPv4 loopback only.
    """

    def __init__(
        self,
        target: Address,
        *,
        seed: int = 0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 0.02,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.drop = drop
        self.duplicate = duplicate
        self.delay = delay
        self.max_delay = max_delay
        self.blackhole = False
        self.statistics = RelayStatistics()
        self._rng = random.Random(seed)
        self._host = host
        self.address: Address = (host, 0)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        front = _udp_socket(self._host)
        back = _udp_socket(self._host)
        with front, back:
            self.address = front.getsockname()
            client: list[Any] = []
            async with trio.open_nursery() as nursery:

                async def pump(
                    source: socket.socket, sink: socket.socket, inbound: bool
                ) -> None:
                    while True:
                        await trio.lowlevel.wait_readable(source)
                        while True:
                            try:
                                data, address = source.recvfrom(65536)
                            except BlockingIOError:
                                break
                            except OSError:
                                continue  # ICMP noise
                            if inbound:
                                client[:] = [address]
                                self._forward(nursery, sink, data, self.target)
                            elif client:
                                self._forward(nursery, sink, data, client[0])

                nursery.start_soon(pump, front, back, True)
                nursery.start_soon(pump, back, front, False)
                task_status.started()

    def _forward(
        self, nursery: trio.Nursery, sock: socket.socket, data: bytes, to: Any
    ) -> None:
        stats = self.statistics
        rng = self._rng
        if self.blackhole or rng.random() < self.drop:
            stats.dropped += 1
            return
        copies = 2 if rng.random() < self.duplicate else 1
        stats.duplicated += copies - 1
        for _ in range(copies):
            if rng.random() < self.delay:
                stats.delayed += 1
                nursery.start_soon(
                    self._send_later, sock, data, to, rng.random() * self.max_delay
                )
            else:
                self._send_now(sock, data, to)

    def _send_now(self, sock: socket.socket, data: bytes, to: Any) -> None:
        try:
            sock.sendto(data, to)
            self.statistics.forwarded += 1
        except OSError:
            # A full buffer is loss too.
            self.statistics.dropped += 1

    async def _send_later(
        self, sock: socket.socket, data: bytes, to: Any, after: float
    ) -> None:
        await trio.sleep(after)
        self._send_now(sock, data, to)


def _udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock
