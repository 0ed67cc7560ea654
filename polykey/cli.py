"""The command line: ``python -m polykey node|status|find``.

``node`` runs a node in the foreground with embedded defaults: its state
directory (identity, later its node graph) under the user's data directory,
created with a new identity on first start, and the default port. It prints
its NodeId and address, logs connections, and shuts down cleanly on SIGINT
or SIGTERM. ``status`` and ``find NODEID`` ask a running node, through the
Unix socket in its state directory.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from ._control import control_client
from .agent import DEFAULT_PORT, NodeSettings, PolykeyNode, SeedNode, default_state_dir
from .errors import PolykeyError

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
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default info)",
    )
    for name, text in (
        ("status", "show a running node's NodeId, address and connections"),
        ("find", "ask a running node to find another node by NodeId"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help=f"the running node's state directory (default {default_state_dir()})",
        )
        if name == "find":
            command.add_argument(
                "node_id", metavar="NODEID", help="the NodeId (v...) to find"
            )
    return parser


async def run_control(command: str, state_dir: Path, node_id: str | None) -> int:
    client = control_client(state_dir)
    with trio.fail_after(90):
        if command == "status":
            status = await client.unary("nodeStatus", {})
            print(f"NodeId: {status['nodeIdEncoded']}")
            print(f"Address: {status['host']}:{status['port']}")
            print(f"Graph: {status['graphSize']} nodes")
            for conn in status["connections"]:
                print(
                    f"Connection: {conn['nodeIdEncoded']} at {conn['host']}:{conn['port']}"
                )
            return 0
        found = await client.unary("nodesFind", {"nodeIdEncoded": node_id})
    if not found["addresses"]:
        print(f"{found['nodeIdEncoded']}: not found", file=sys.stderr)
        return 1
    for host, port in found["addresses"]:
        print(f"{found['nodeIdEncoded']} {host}:{port}")
    return 0


async def run_node(settings: NodeSettings) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with PolykeyNode(settings) as node:
            host, port = node.address
            print(f"NodeId: {node.node_id}", flush=True)
            shown = f"[{host}]" if ":" in host else host
            print(f"Address: {shown}:{port}", flush=True)
            print(f"Seed: {node.node_id}@{shown}:{port}", flush=True)
            async for signum in signals:
                logging.getLogger("polykey.node").info(
                    "%s received: shutting down", signal.Signals(signum).name
                )
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("status", "find"):
        state_dir = args.state_dir or default_state_dir()
        try:
            return trio.run(
                run_control, args.command, state_dir, getattr(args, "node_id", None)
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
    )
    try:
        trio.run(run_node, settings)
    except PolykeyError as exc:
        print(f"polykey: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"polykey: {exc}", file=sys.stderr)
        return 1
    return 0
