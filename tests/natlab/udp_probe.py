"""Plain UDP probes that the NAT lab tests run inside lab namespaces.

Stdlib only, blocking sockets: it runs as ``python udp_probe.py ...`` under
``ip netns exec``. Two roles:

``serve PORT...``
    The seed's mapping service: on each port, answers every datagram with the
    source address it came from, as JSON ``{"src": [ip, port]}``. Prints
    ``{"ready": true}`` once bound; exits when stdin closes.

``agent [--port P]``
    One UDP socket (port P, or an ephemeral one), driven by JSON commands on
    stdin, one per line, each answered by one JSON line on stdout:

    ``{"op": "map", "seeds": [[ip, port], ...]}``
        ask each seed what it sees: ``{"local": port, "mapped": [[ip, port], ...]}``
        (a seed that does not answer within 2 s maps to null)
    ``{"op": "send", "to": [ip, port]}``
        send one datagram: ``{"sent": true}``
    ``{"op": "listen", "seconds": s}``
        collect what arrives: ``{"got": [[ip, port], ...]}``
    ``{"op": "punch", "peer": [ip, port], "me": "a", "them": "b", ...}``
        a hole punch, below: ``{"ok": bool, "seen": [ip, port] | null, "acked": bool}``

    Exits when stdin closes.

The punch. Every ``interval`` seconds (default 0.05) for up to ``seconds``
(default 3), after an initial ``delay``, send ``punch <me> <acked>`` to the
peer's advertised address and, once the peer has been heard, to the address
it was heard from (behind a symmetric NAT, that is a port nobody could have
advertised). ``acked`` is 1 once we have heard the peer, so a datagram
carrying 1 tells its receiver that its own punches get through. A side is
``ok`` when it has heard the peer and the peer has heard it; it then keeps
sending for ``linger`` seconds (default 0.3) so that the peer learns the same.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from typing import Any

Addr = tuple[str, int]


def _reply(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _addr(value: Any) -> Addr:
    return (str(value[0]), int(value[1]))


def serve(ports: list[int]) -> None:
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        socks.append(s)
    _reply({"ready": True})
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin, *socks], [], [])
        for r in readable:
            if isinstance(r, socket.socket):
                _, src = r.recvfrom(2048)
                r.sendto(json.dumps({"src": list(src)}).encode(), src)
            elif not os.read(stdin, 4096):
                return


class Agent:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        self.local = int(self.sock.getsockname()[1])

    def _recv(self, timeout: float) -> tuple[bytes, Addr] | None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        if not ready:
            return None
        data, src = self.sock.recvfrom(2048)
        return data, (src[0], int(src[1]))

    def map(self, seeds: list[Addr]) -> dict[str, object]:
        mapped: list[list[object] | None] = []
        for seed in seeds:
            found: list[object] | None = None
            deadline = time.monotonic() + 2.0
            while found is None and time.monotonic() < deadline:
                self.sock.sendto(b"?", seed)
                resend = time.monotonic() + 0.1
                while found is None and (left := resend - time.monotonic()) > 0:
                    got = self._recv(left)
                    if got is not None and got[1] == seed:
                        found = list(json.loads(got[0])["src"])
            mapped.append(found)
        return {"local": self.local, "mapped": mapped}

    def listen(self, seconds: float) -> dict[str, object]:
        got: list[list[object]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            received = self._recv(left)
            if received is not None:
                got.append(list(received[1]))
        return {"got": got}

    def punch(
        self,
        peer: Addr,
        me: str,
        them: str,
        *,
        seconds: float = 3.0,
        interval: float = 0.05,
        delay: float = 0.0,
        linger: float = 0.3,
    ) -> dict[str, object]:
        time.sleep(delay)
        seen: Addr | None = None
        acked = False
        deadline = time.monotonic() + seconds
        done_at: float | None = None
        while True:
            now = time.monotonic()
            if now >= deadline or (done_at is not None and now >= done_at):
                break
            payload = f"punch {me} {int(seen is not None)}".encode()
            for target in {peer, seen} - {None}:
                assert target is not None
                self.sock.sendto(payload, target)
            next_send = now + interval
            while (left := next_send - time.monotonic()) > 0:
                got = self._recv(left)
                if got is None:
                    continue
                words = got[0].decode(errors="replace").split()
                if len(words) != 3 or words[:2] != ["punch", them]:
                    continue
                seen = got[1]
                acked = acked or words[2] == "1"
            if seen is not None and acked and done_at is None:
                done_at = time.monotonic() + linger
        ok = seen is not None and acked
        return {"ok": ok, "seen": None if seen is None else list(seen), "acked": acked}


def agent(port: int) -> None:
    a = Agent(port)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "map":
            _reply(a.map([_addr(s) for s in cmd["seeds"]]))
        elif op == "send":
            a.sock.sendto(b"hello", _addr(cmd["to"]))
            _reply({"sent": True})
        elif op == "listen":
            _reply(a.listen(float(cmd["seconds"])))
        elif op == "punch":
            options = {
                k: float(cmd[k])
                for k in ("seconds", "interval", "delay", "linger")
                if k in cmd
            }
            _reply(
                a.punch(_addr(cmd["peer"]), str(cmd["me"]), str(cmd["them"]), **options)
            )
        else:
            _reply({"error": f"unknown op {op!r}"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("ports", type=int, nargs="+")
    p_agent = sub.add_parser("agent")
    p_agent.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "serve":
        serve(args.ports)
    else:
        agent(args.port)


if __name__ == "__main__":
    main()
