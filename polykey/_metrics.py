"""A Prometheus endpoint for a running node (``node --metrics HOST:PORT``).

Off by default. One small HTTP/1.0 server: ``GET /metrics`` answers the
node's counters in Prometheus' text format (version 0.0.4), written by hand
(no dependency), anything else 404; one request per connection. Bounded
like the control socket: a client has ``REQUEST_TIMEOUT`` to send its
request line and headers (at most ``MAX_REQUEST`` bytes), and at most
``MAX_CLIENTS`` are served at once. The families are listed in docs/cli.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import attrs
import trio

from .quic import Address

if TYPE_CHECKING:
    from .agent import PolykeyNode

__all__ = ["render_metrics", "serve_metrics"]

log = logging.getLogger("polykey.metrics")

REQUEST_TIMEOUT: Final = 5.0
MAX_REQUEST: Final = 8192
MAX_CLIENTS: Final = 16

Sample = tuple[dict[str, str], float]


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[Sample]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if labels:
            inner = ",".join(
                f'{k}="{v}"'.replace("\n", " ") for k, v in sorted(labels.items())
            )
            lines.append(f"{name}{{{inner}}} {value:g}")
        else:
            lines.append(f"{name} {value:g}")
    return lines


def render_metrics(node: PolykeyNode) -> str:
    """The node's counters, in Prometheus' text format."""
    connections = node.connections
    socket = attrs.asdict(connections.socket.statistics)
    stats = connections.statistics()
    server = stats["server"]
    rpc = node.rpc_server.statistics()
    manager = node.manager.statistics()
    relay = node.relay_status()
    by_path: dict[str, int] = {"direct": 0, "punched": 0, "relayed": 0}
    for c in connections.active():
        by_path[c.path.value] = by_path.get(c.path.value, 0) + 1
    out: list[str] = []
    out += _family(
        "polykey_quic_datagrams_total", "counter", "UDP datagrams, by direction",
        [({"direction": "received"}, socket["datagrams_received"]),
         ({"direction": "sent"}, socket["datagrams_sent"])],
    )  # fmt: skip
    out += _family(
        "polykey_quic_bytes_total", "counter", "UDP payload bytes, by direction",
        [({"direction": "received"}, socket["bytes_received"]),
         ({"direction": "sent"}, socket["bytes_sent"])],
    )  # fmt: skip
    out += _family(
        "polykey_quic_dropped_total", "counter", "datagrams dropped, by reason",
        [({"reason": r}, socket[f"dropped_{r}"])
         for r in ("not_quic", "unknown_connection", "short_unknown_version", "no_server",
                   "by_quiche")],
    )  # fmt: skip
    out += _family(
        "polykey_bugs_total", "counter",
        "bugs caught and logged at WARNING (the node ran on), by where",
        [({"where": "quic"}, socket["unexpected_errors"]),
         ({"where": "rpc_handler"}, rpc.handler_bugs),
         ({"where": "rpc_server"}, rpc.internal_errors),
         ({"where": "connections"}, stats["task_errors"]),
         ({"where": "node_manager"}, manager.unexpected_errors),
         ({"where": "node"}, node.bugs)],
    )  # fmt: skip
    out += _family(
        "polykey_quic_handshakes_total", "counter", "server handshakes, by outcome",
        [({"outcome": "started"}, server["handshakes_started"]),
         ({"outcome": "accepted"}, server["accepted"]),
         ({"outcome": "failed"}, server["handshakes_failed"])],
    )  # fmt: skip
    out += _family(
        "polykey_quic_refused_total", "counter",
        "new clients refused, and peers closed for opening too many streams, by reason",
        [({"reason": r}, server[k]) for r, k in (
            ("backlog", "refused_backlog"), ("address_limit", "refused_address_limit"),
            ("bad_token", "bad_tokens"), ("reused_token", "reused_tokens"),
            ("token_dcid_mismatch", "token_dcid_mismatch"),
            ("connections", "refused_connections"),
            ("connections_per_address", "refused_connections_per_address"),
            ("handshake_rate", "refused_handshake_rate"))]
        # Any connection, dialled or accepted: the socket counts them.
        + [({"reason": "streams"}, socket["refused_streams"])],
    )  # fmt: skip
    out += _family(
        "polykey_quic_retries_sent_total",
        "counter",
        "stateless Retries sent",
        [({}, server["retries_sent"])],
    )
    out += _family(
        "polykey_connections",
        "gauge",
        "live node connections, by path",
        [({"path": p}, n) for p, n in sorted(by_path.items())],
    )
    out += _family(
        "polykey_dials_total", "counter", "dials, by kind and outcome",
        [({"kind": "direct", "outcome": "started"}, stats["dials"]),
         ({"kind": "direct", "outcome": "failed"}, stats["dial_failures"]),
         ({"kind": "punched", "outcome": "started"}, stats["punched_dials"]),
         ({"kind": "punched", "outcome": "failed"}, stats["punched_dial_failures"])],
    )  # fmt: skip
    out += _family(
        "polykey_punches_total", "counter", "punches sprayed for others (and refused)",
        [({"outcome": "started"}, stats["punches"]),
         ({"outcome": "refused"}, stats["punches_refused"])],
    )  # fmt: skip
    out += _family(
        "polykey_signals_total", "counter", "signals forwarded as a signaller",
        [({"outcome": "forwarded"}, stats["signals_forwarded"]),
         ({"outcome": "dropped"}, stats["signals_dropped"]),
         ({"outcome": "failed"}, stats["signal_failures"])],
    )  # fmt: skip
    out += _family(
        "polykey_rpc_calls_total",
        "counter",
        "RPC calls served, by method",
        [({"method": m}, n) for m, n in sorted(rpc.calls_by_method.items())]
        + [({"method": "(unknown)"}, rpc.unknown_methods)],
    )
    out += _family(
        "polykey_rpc_outcomes_total", "counter", "RPC calls that did not simply answer",
        [({"outcome": o}, getattr(rpc, o)) for o in (
            "timeouts", "error_responses", "resets", "peer_resets", "internal_errors",
            "refused", "refused_busy", "refused_busy_connection", "handler_bugs")],
    )  # fmt: skip
    out += _family(
        "polykey_lookups_total", "counter", "Kademlia lookups, and finds",
        [({"kind": "lookup"}, manager.lookups), ({"kind": "find"}, manager.finds),
         ({"kind": "find_failed"}, manager.finds_failed),
         ({"kind": "timed_out"}, manager.lookups_timed_out)],
    )  # fmt: skip
    out += _family(
        "polykey_dialbacks_total", "counter",
        "dial-backs of nodes that only connected to us, and their outcomes",
        [({"outcome": "started"}, manager.dialbacks),
         ({"outcome": "confirmed"}, manager.confirmed_by_dialback),
         ({"outcome": "failed"}, manager.dialback_failed),
         ({"outcome": "skipped"}, manager.dialbacks_skipped),
         ({"outcome": "dropped"}, manager.dialbacks_dropped)],
    )  # fmt: skip
    out += _family(
        "polykey_lookup_rounds_total",
        "counter",
        "rounds of every lookup, summed",
        [({}, manager.lookup_rounds)],
    )
    out += _family(
        "polykey_graph_nodes", "gauge", "nodes in the graph", [({}, len(node.graph))]
    )
    out += _family(
        "polykey_relay_circuits",
        "gauge",
        "circuits this node relays now",
        [({}, relay.get("circuits", 0))],
    )
    out += _family(
        "polykey_relay_bytes_total",
        "counter",
        "bytes relayed for others",
        [({}, relay.get("bytes_forwarded", 0))],
    )
    return "\n".join(out) + "\n"


async def _serve_client(node: PolykeyNode, stream: trio.SocketStream) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                data = await stream.receive_some(4096)
                if not data:
                    break
                request += data
        line = request.split(b"\r\n", 1)[0].split()
        if (
            len(line) >= 2
            and line[0] == b"GET"
            and line[1].split(b"?")[0] == b"/metrics"
        ):
            body = render_metrics(node).encode()
            head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
        else:
            body = b"not found\n"
            head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await stream.send_all(head + body)
        except trio.BrokenResourceError:
            pass  # the scraper went away


async def serve_metrics(
    node: PolykeyNode,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on ``host:port`` until cancelled; reports the
    address bound (``port`` 0: any free one)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    address = listeners[0].socket.getsockname()
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    async with trio.open_nursery() as nursery:
        task_status.started((str(address[0]), int(address[1])))
        log.info("metrics on http://%s:%d/metrics", address[0], address[1])
        for listener in listeners:
            nursery.start_soon(_accept, node, listener, limiter, nursery)


async def _accept(
    node: PolykeyNode,
    listener: trio.SocketListener,
    limiter: trio.CapacityLimiter,
    nursery: trio.Nursery,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.warning("metrics: cannot accept a client: %s", exc)
                await trio.sleep(0.1)
                continue
            if limiter.available_tokens == 0:
                await trio.aclose_forcefully(stream)
                continue

            async def one(stream: trio.SocketStream = stream) -> None:
                async with limiter:
                    await _serve_client(node, stream)

            nursery.start_soon(one)
