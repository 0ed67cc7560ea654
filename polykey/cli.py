"""The command line: ``python -m polykey node|status|find|ping``.

``node`` runs a node in the foreground with embedded defaults: its state
directory (identity, later its node graph) under the user's data directory,
created with a new identity on first start, and the default port. It prints
its NodeId and address, logs connections, and shuts down cleanly on SIGINT
or SIGTERM. ``status`` and ``find NODEID`` ask a running node, through the
Unix socket in its state directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from ._control import control_client
from .agent import (
    DEFAULT_PORT,
    NodeSettings,
    PolykeyNode,
    SeedNode,
    default_state_dir,
    dialable_host,
)
from .errors import PolykeyError
from .nodes import format_host_port

__all__ = ["main"]


def _seed(text: str) -> SeedNode:
    try:
        return SeedNode.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError("port must be 0..65535 (0: any free port)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m polykey", description="Polykey's network stack for trio."
    )
    parser.add_argument("--version", action="version", version=f"polykey {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser("node", help="run a node in the foreground")
    node.add_argument(
        "--host", default="::", help="address to listen on (default: all, dual stack)"
    )
    node.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"UDP port (default {DEFAULT_PORT})",
    )
    node.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"where the node keeps its identity (default {default_state_dir()})",
    )
    node.add_argument(
        "--seed",
        type=_seed,
        action="append",
        default=[],
        metavar="NODEID@HOST:PORT",
        help="a node to join the network through (repeatable)",
    )
    node.add_argument(
        "--relay",
        choices=["auto", "on", "off"],
        default="auto",
        help="relay for nodes that cannot punch through to each other: auto"
        " (default: while no peer sees this node behind a NAT), on, off",
    )
    node.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default info)",
    )
    for name, text in (
        ("status", "show a running node's NodeId, address and connections"),
        ("find", "ask a running node to find another node by NodeId"),
        ("ping", "ask a running node to connect to another by NodeId and ping it"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help=f"the running node's state directory (default {default_state_dir()})",
        )
        command.add_argument(
            "-f",
            "--format",
            choices=["human", "json"],
            default="human",
            help="output: aligned text (default) or one JSON object",
        )
        if name in ("find", "ping"):
            command.add_argument(
                "node_id", metavar="NODEID", help=f"the NodeId (v...) to {name}"
            )
    return parser


async def run_control(
    command: str, state_dir: Path, node_id: str | None, output: str = "human"
) -> int:
    client = control_client(state_dir)
    with trio.fail_after(90):
        if command == "status":
            result = await client.unary("nodeStatus", {})
        elif command == "find":
            result = await client.unary("nodesFind", {"nodeIdEncoded": node_id})
        else:
            result = await client.unary("nodesPingNode", {"nodeIdEncoded": node_id})
    result.pop("metadata", None)
    ok = {"find": bool(result.get("addresses")), "ping": bool(result.get("success"))}
    if output == "json":
        print(json.dumps(result))
        return 0 if ok.get(command, True) else 1
    if command == "status":
        print(f"NodeId: {result['nodeIdEncoded']}")
        print(f"Address: {format_host_port(result['host'], result['port'])}")
        print(f"Graph: {result['graphSize']} nodes")
        for seen in result.get("reflexive", []):
            print(f"Seen at: {format_host_port(seen['host'], seen['port'])}")
        relay = result.get("relay", {})
        if relay:
            state = "serving" if relay.get("serving") else "not serving"
            print(f"Relay: {relay.get('mode')}, {state}")
        for conn in result["connections"]:
            address = format_host_port(conn["host"], conn["port"])
            path = conn.get("path", "direct")
            print(f"Connection: {conn['nodeIdEncoded']} at {address} ({path})")
        return 0
    if command == "find":
        if not ok["find"]:
            print(f"{result['nodeIdEncoded']}: not found", file=sys.stderr)
            return 1
        for host, port in result["addresses"]:
            print(f"{result['nodeIdEncoded']} {format_host_port(host, port)}")
        return 0
    if not ok["ping"]:
        print(
            f"{result['nodeIdEncoded']}: not reached: {result.get('error')}",
            file=sys.stderr,
        )
        return 1
    address = format_host_port(result["host"], result["port"])
    print(
        f"{result['nodeIdEncoded']} at {address}: {result['path']}, {result['rttMs']:.1f} ms"
    )
    return 0


async def run_node(settings: NodeSettings) -> None:
    """Run a node until SIGINT or SIGTERM.

    The signals are ours from the first moment, start-up included: a
    signal while the node starts cancels the start (and the process exits);
    once it runs, a signal stops it in order (connections closed with a
    code, the graph flushed).
    """
    log = logging.getLogger("polykey.node")
    stop = trio.Event()
    running = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    log.info("%s received: shutting down", signal.Signals(signum).name)
                    if running:
                        stop.set()  # an ordered stop
                    else:
                        nursery.cancel_scope.cancel()  # abandon the start
                    return

            nursery.start_soon(watch_signals)
            async with PolykeyNode(settings) as node:
                running = True
                _print_started(node)
                await stop.wait()
            nursery.cancel_scope.cancel()


def _print_started(node: PolykeyNode) -> None:
    host, port = node.address
    seed_host, guessed = dialable_host(host)
    print(f"NodeId: {node.node_id}", flush=True)
    wildcard = " (all interfaces)" if guessed else ""
    print(f"Address: {format_host_port(host, port)}{wildcard}", flush=True)
    print(f"Seed: {node.node_id}@{format_host_port(seed_host, port)}", flush=True)
    if guessed:
        print(
            "Note: the seed address is this host's address toward its default route"
            + (
                " (no route: loopback, for this host only)"
                if ipaddress.ip_address(seed_host).is_loopback
                else "; peers on other networks may need another"
            ),
            flush=True,
        )


def _one_line_errors(exc: BaseException) -> list[str] | None:
    """The messages of an error a user can act on (ours, or the OS's), or
    None for anything else (a bug: let its traceback show)."""
    if isinstance(exc, BaseExceptionGroup):
        lines: list[str] = []
        for leaf in exc.exceptions:
            more = _one_line_errors(leaf)
            if more is None:
                return None
            lines.extend(more)
        return lines
    if isinstance(exc, PolykeyError | OSError):
        return [str(exc)]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("status", "find", "ping"):
        state_dir = args.state_dir or default_state_dir()
        try:
            return trio.run(
                run_control,
                args.command,
                state_dir,
                getattr(args, "node_id", None),
                args.format,
            )
        except (OSError, trio.TooSlowError) as exc:
            print(
                f"polykey: no running node answers in {state_dir}: {exc}",
                file=sys.stderr,
            )
            return 1
        except PolykeyError as exc:
            print(f"polykey: {exc}", file=sys.stderr)
            return 1
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = NodeSettings(
        state_dir=args.state_dir or default_state_dir(),
        host=args.host,
        port=args.port,
        seeds=tuple(args.seed),
        relay=args.relay,
    )
    try:
        trio.run(run_node, settings)
    except (PolykeyError, OSError, BaseExceptionGroup) as exc:
        lines = _one_line_errors(exc)
        if lines is None:
            raise
        for line in dict.fromkeys(lines):
            print(f"polykey: {line}", file=sys.stderr)
        return 1
    return 0
