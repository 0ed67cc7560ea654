"""A lab node for bench/nat.py (run by it, inside a NAT lab host).

    python bench/_nat_node.py --state-dir DIR [--port P] [--relay-bytes N]

A :class:`~polykey.agent.PolykeyNode`, as ``python -m polykey node`` runs
it, plus one extra RPC method, ``benchSink`` (raw: reads the stream to its
FIN and answers the byte count in decimal). It imports everything, prints
``LOADED``, and waits for commands, one JSON object a line on stdin,
answering each with one JSON line on stdout (``{"error"}`` on failure):

* ``{"op": "start", "seeds": ["NODEID@HOST:PORT", ...]}``: start the node;
  with seeds, answer once joined through them and anchored to them.
  ``{"nodeId", "seed", "behindNat"}``.
* ``{"op": "ping", "target": NODEID}``: the node's own control socket's
  ``nodesPingNode`` (connect by NodeId alone, then ``nodesPing``).
* ``{"op": "bulk", "target": NODEID, "bytes": N, "cap": S}``: over the
  pooled connection to the target, a ``benchSink`` call with N bytes (1 MiB
  writes, stopped early after S seconds) then FIN; the clock stops when
  the sink's count arrives. ``{"path", "bytes", "seconds", "packetsSent",
  "packetsLost", "rttMs", "cwnd"}`` (the connection's QUIC packets during
  the transfer, its smoothed RTT and congestion window at the end).
* ``{"op": "forget", "target": NODEID}``: close the pooled connection to
  the target, if any (``{"closed"}``), so that the next ping makes a new one.
* ``{"op": "status"}``: connections (NodeId -> path) and relay counters.

The node stops when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import trio

from polykey._control import control_client
from polykey.agent import NodeSettings, PolykeyNode, SeedNode
from polykey.keys import NodeId
from polykey.nodes import RelayLimits
from polykey.rpc import CallContext, RawCall, RawHandler

PORT = 1314
CHUNK = 1 << 20


class Sink(RawHandler):
    """Read to FIN, answer the byte count."""

    timeout = 300.0

    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        stream = await call.accept({})
        total = 0
        while data := await stream.receive_some(CHUNK):
            total += len(data)
        await stream.send_all(str(total).encode())
        await stream.send_eof()


def answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def bulk(
    node: PolykeyNode, target: NodeId, size: int, cap: float
) -> dict[str, Any]:
    conn = node.connections.get(target)
    if conn is None:
        raise RuntimeError("no pooled connection to the target")
    chunk = bytes(CHUNK)
    sent = 0
    before = conn.connection.statistics().quiche
    async with conn.rpc.raw("benchSink", {}, rpc_timeout=cap + 60) as call:
        started = trio.current_time()
        while sent < size and trio.current_time() - started < cap:
            n = min(CHUNK, size - sent)
            await call.stream.send_all(chunk[:n])
            sent += n
        await call.stream.send_eof()
        reply = b""
        while data := await call.stream.receive_some():
            reply += data
        seconds = trio.current_time() - started
    if int(reply) != sent:
        raise RuntimeError(f"the sink counted {reply!r} bytes of {sent}")
    stats = conn.connection.statistics()
    after = stats.quiche
    return {
        "rttMs": stats.path.rtt_ns / 1e6 if stats.path else None,
        "cwnd": stats.path.cwnd if stats.path else None,
        "path": conn.path.value,
        "bytes": sent,
        "seconds": seconds,
        "packetsSent": after.sent - before.sent,
        "packetsLost": after.lost - before.lost,
    }


async def joined(node: PolykeyNode, seeds: tuple[SeedNode, ...]) -> None:
    """Joined through the seeds, holding a connection to each, and (behind a
    NAT) told so by one of them."""
    await node.wait_joined()

    def done() -> bool:
        anchored = all(node.connections.get(s.node_id) for s in seeds)
        return anchored and bool(node.connections.reflexive)

    while not done():  # noqa: ASYNC110 - the node offers no event for it
        await trio.sleep(0.01)


async def serve(args: argparse.Namespace) -> None:
    commands = trio.wrap_file(sys.stdin)
    answer({"loaded": True})
    line = await commands.readline()
    if not line:
        return
    request = json.loads(line)
    seeds = tuple(SeedNode.parse(s) for s in request.get("seeds", []))
    settings = NodeSettings(
        state_dir=args.state_dir,
        port=args.port,
        seeds=seeds,
        relay_limits=RelayLimits(circuit_bytes=args.relay_bytes),
        handlers={"benchSink": Sink()},
    )
    async with PolykeyNode(settings) as node:
        if seeds:
            with trio.fail_after(30):
                await joined(node, seeds)
        _, port = node.address
        answer(
            {
                "nodeId": str(node.node_id),
                "port": port,
                "behindNat": node.connections.behind_nat(),
            }
        )
        control = control_client(args.state_dir)
        while line := await commands.readline():
            request = json.loads(line)
            op = request.get("op")
            try:
                if op == "ping":
                    result = await control.unary(
                        "nodesPingNode", {"nodeIdEncoded": request["target"]}
                    )
                    result.pop("metadata", None)
                elif op == "bulk":
                    result = await bulk(
                        node,
                        NodeId.from_string(request["target"]),
                        int(request["bytes"]),
                        float(request["cap"]),
                    )
                elif op == "forget":
                    target = NodeId.from_string(request["target"])
                    conn = node.connections.get(target)
                    if conn is not None:
                        await conn.connection.aclose(0, b"bench: a fresh try")
                    result = {"closed": conn is not None}
                elif op == "status":
                    result = {
                        "connections": {
                            str(c.node_id): c.path.value
                            for c in node.connections.active()
                        },
                        "relay": node.relay_status(),
                    }
                else:
                    result = {"error": f"unknown op {op!r}"}
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            answer(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--relay-bytes", type=int, default=RelayLimits().circuit_bytes)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    trio.run(serve, args)


if __name__ == "__main__":
    main()
