"""The command line: ``python -m polykey`` (``polykey`` once installed).

* ``node`` runs a node in the foreground with embedded defaults: its state
  directory under the user's data directory (created with a new identity on
  first start) and the default port. It prints its NodeId, address, a seed
  line and where its state and control socket are; logs connections; and
  stops in order on SIGINT, SIGTERM or ``agent stop``. Options also come
  from ``POLYKEY_*`` environment variables (docs/cli.md).
* ``agent status|stop`` and ``nodes add|ping|find|getall|connections`` ask
  a running node, through the Unix socket in its state directory
  (``--state-dir`` or ``POLYKEY_STATE_DIR``). ``-f/--format human|json`` on
  each; exit statuses from sysexits; errors as one line on stderr.
* ``keys show|renew`` work on the state directory itself (renew needs the
  node stopped).
* ``status``, ``find`` and ``ping`` are short for ``agent status``, ``nodes
  find`` and ``nodes ping``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import trio

from . import __version__
from . import _replies as replies
from ._cli_control import (
    EX,
    agent_status,
    agent_stop,
    keys_renew,
    keys_show,
    nodes_add,
    nodes_connections,
    nodes_find,
    nodes_getall,
    nodes_ping,
    run_command,
)
from ._control import CONTROL_SOCKET
from ._logging import configure_logging
from ._logging import set_context as set_log_context
from .agent import (
    DEFAULT_PORT,
    NodeLimits,
    NodeSettings,
    PolykeyNode,
    SeedNode,
    default_state_dir,
    dialable_host,
)
from .errors import PolykeyError
from .nodes import (
    Address,
    InvalidAddressError,
    NodeAddress,
    format_host_port,
    parse_host_port,
)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with sysexits' EX_USAGE for a bad command line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX.USAGE, f"{self.prog}: error: {message}\n")


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


def _address(text: str) -> NodeAddress:
    try:
        return parse_host_port(text)
    except InvalidAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_address(text: str) -> Address:
    """``HOST:PORT`` to listen on (``[V6]:PORT``; wildcards and port 0 fine)."""
    host, _, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port_text)


#: ``node`` flags for the fields of NodeLimits, with what each bounds.
_LIMIT_HELP: dict[str, str] = {
    "max_connections": "incoming connections held at once",
    "max_connections_per_address": "the same, per IPv4 address or IPv6 /64",
    "max_handshakes_per_address": "handshakes in flight per address",
    "handshake_rate": "new handshakes a second per address",
    "handshake_burst": "new handshakes per address at once, beyond the rate",
    "retry_threshold": "handshakes in flight at which new clients get a Retry (0: always)",
    "retry_threshold_per_address": "the same, from the client's own address",
    "accept_backlog": "handshakes plus connections not yet served",
    "max_streams": "bidirectional streams a peer may open at once",
    "max_streams_uni": "unidirectional streams (unused by Polykey)",
    "stream_credit": "bytes a peer may send on a stream before we read",
    "connection_credit": "bytes a peer may send on a connection before we read",
    "stream_window": "bytes of flow-control credit per stream, at most",
    "connection_window": "bytes of flow-control credit per connection, at most",
    "max_calls": "RPC calls in flight on the node",
    "max_calls_per_connection": "RPC calls in flight on one connection",
    "max_message_size": "bytes of one RPC message",
    "control_clients": "control-socket clients served at once",
    "dialback_limit": "dial-backs of nodes that only connected in, at once (0: none)",
    "dialback_queue": "such nodes waiting for their dial-back",
}


def _number(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    return parse


def _limit_options(node: argparse.ArgumentParser) -> None:
    group = node.add_argument_group(
        "limits", "what peers may make the node hold (docs/operations.md)"
    )
    defaults = NodeLimits()
    for field in attrs.fields(NodeLimits):
        name = field.name
        env = f"POLYKEY_{name.upper()}"
        default = getattr(defaults, name)
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"limit_{name}",
            type=_number(float if isinstance(default, float) else int),
            default=os.environ.get(env) or None,
            metavar="N",
            help=f"{_LIMIT_HELP[name]} (default {default}; ${env})",
        )


def _limits(args: argparse.Namespace, parser: argparse.ArgumentParser) -> NodeLimits:
    given = {
        field.name: getattr(args, f"limit_{field.name}")
        for field in attrs.fields(NodeLimits)
        if getattr(args, f"limit_{field.name}") is not None
    }
    try:
        return NodeLimits(**given)
    except ValueError as exc:
        flag = "--" + str(exc).split()[0].replace("_", "-")
        parser.exit(EX.USAGE, f"{parser.prog} node: error: {flag}: {exc}\n")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"POLYKEY_{name}") or default


def _env_seeds() -> list[SeedNode]:
    text = os.environ.get("POLYKEY_SEEDS", "")
    try:
        return [_seed(part) for part in text.replace(";", " ").split()]
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"python -m polykey: error: POLYKEY_SEEDS: {exc}") from None


def _state_dir_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"{what} (default $POLYKEY_STATE_DIR, else {default_state_dir()})",
    )


def _control_parent() -> _Parser:
    parent = _Parser(add_help=False)
    _state_dir_option(parent, "the running node's state directory")
    parent.add_argument(
        "-f",
        "--format",
        choices=["human", "json"],
        default="human",
        help="output: aligned text (default) or JSON",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m polykey", description="Polykey's network stack for trio."
    )
    parser.add_argument("--version", action="version", version=f"polykey {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    node = commands.add_parser("node", help="run a node in the foreground")
    node.add_argument(
        "--host",
        default=_env("HOST", "::"),
        help="address to listen on (default: all, dual stack; $POLYKEY_HOST)",
    )
    node.add_argument(
        "--port",
        type=_port,
        default=_env("PORT", str(DEFAULT_PORT)),
        help=f"UDP port (default {DEFAULT_PORT}; $POLYKEY_PORT)",
    )
    _state_dir_option(node, "where the node keeps its identity and graph")
    node.add_argument(
        "--seed",
        type=_seed,
        action="append",
        default=None,
        metavar="NODEID@HOST:PORT",
        help="a node to join the network through (repeatable; $POLYKEY_SEEDS,"
        " separated by spaces or ';')",
    )
    node.add_argument(
        "--relay",
        choices=["auto", "on", "off"],
        default=_env("RELAY", "auto"),
        help="relay for nodes that cannot punch through to each other: auto"
        " (default: while no peer sees this node behind a NAT), on, off",
    )
    node.add_argument(
        "--metrics",
        type=_listen_address,
        default=os.environ.get("POLYKEY_METRICS") or None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by"
        " default; $POLYKEY_METRICS)",
    )
    node.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default info; $POLYKEY_LOG_LEVEL)",
    )
    node.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="logs on stderr as text (default) or one JSON object a line",
    )
    node.add_argument(
        "-f",
        "--format",
        choices=["human", "json"],
        default="human",
        help="the start-up lines as text (default) or one JSON object",
    )
    _limit_options(node)

    control = _control_parent()
    agent = commands.add_parser("agent", help="the running node").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    agent.add_parser(
        "status", parents=[control], help="LIVE or DEAD, and what it holds"
    )
    agent.add_parser("stop", parents=[control], help="stop it in order and wait")
    nodes = commands.add_parser(
        "nodes", help="other nodes, as the running node sees them"
    )
    nodes_sub = nodes.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = nodes_sub.add_parser("add", parents=[control], help="put a node in the graph")
    add.add_argument("node_id", metavar="NODEID")
    add.add_argument("address", type=_address, metavar="HOST:PORT")
    add.add_argument("--no-ping", action="store_true", help="add without pinging it")
    add.add_argument(
        "--force", action="store_true", help="add even if it does not answer"
    )
    for name, text in (
        ("ping", "connect by NodeId (direct, punched or relayed) and ping it"),
        ("find", "find a node's address by a lookup"),
    ):
        sub = nodes_sub.add_parser(name, parents=[control], help=text)
        sub.add_argument("node_id", metavar="NODEID")
    nodes_sub.add_parser("getall", parents=[control], help="the graph, by bucket")
    keys = commands.add_parser(
        "keys", help="the node's identity (on its state directory)"
    )
    keys_sub = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    keys_sub.add_parser("show", parents=[control], help="NodeId and certificate chain")
    keys_sub.add_parser(
        "renew", parents=[control], help="a new key pair, the chain kept (node stopped)"
    )
    nodes_sub.add_parser("connections", parents=[control], help="live connections")
    # Short forms.
    commands.add_parser("status", parents=[control], help="agent status")
    for name in ("find", "ping"):
        commands.add_parser(name, parents=[control], help=f"nodes {name}").add_argument(
            "node_id", metavar="NODEID"
        )
    return parser


def _control_command(args: argparse.Namespace) -> tuple[Any, ...]:
    """The coroutine function and arguments for a control command."""
    state_dir = args.state_dir or Path(_env("STATE_DIR", str(default_state_dir())))
    common = (state_dir, args.format, sys.stdout)
    what = (args.command, getattr(args, "action", None))
    if what in (("agent", "status"), ("status", None)):
        return (agent_status, *common)
    if what == ("agent", "stop"):
        return (agent_stop, *common)
    if what in (("nodes", "find"), ("find", None)):
        return (nodes_find, *common, args.node_id)
    if what in (("nodes", "ping"), ("ping", None)):
        return (nodes_ping, *common, args.node_id)
    if what == ("nodes", "add"):
        address = args.address
        return (
            nodes_add, *common, args.node_id, address.host, address.port,
            not args.no_ping, args.force,
        )  # fmt: skip
    if what == ("nodes", "getall"):
        return (nodes_getall, *common)
    if what == ("keys", "show"):
        return (keys_show, *common)
    if what == ("keys", "renew"):
        return (keys_renew, *common)
    return (nodes_connections, *common)


async def run_node(settings: NodeSettings, output: str = "human") -> None:
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
                set_log_context(nodeId=str(node.node_id))
                _print_started(node, output)
                async with trio.open_nursery() as waiting:

                    async def stop_on_request() -> None:
                        await node.stop_requested.wait()
                        stop.set()

                    waiting.start_soon(stop_on_request)
                    await stop.wait()
                    waiting.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


def _print_started(node: PolykeyNode, output: str) -> None:
    host, port = node.address
    seed_host, guessed = dialable_host(host)
    seed = f"{node.node_id}@{format_host_port(seed_host, port)}"
    state_dir = node.settings.state_dir
    note = None
    if guessed:
        note = "the seed address is this host's address toward its default route" + (
            " (no route: loopback, for this host only)"
            if ipaddress.ip_address(seed_host).is_loopback
            else "; peers on other networks may need another"
        )
    if output == "json":
        started = replies.Started(
            node_id_encoded=str(node.node_id),
            host=host,
            port=port,
            seed=seed,
            state_dir=str(state_dir),
            control_socket=str(state_dir / CONTROL_SOCKET),
            pid=os.getpid(),
            metrics=_metrics_url(node),
            note=note,
        )
        print(json.dumps(replies.to_json(started)), flush=True)
        return
    print(f"NodeId: {node.node_id}", flush=True)
    wildcard = " (all interfaces)" if guessed else ""
    print(f"Address: {format_host_port(host, port)}{wildcard}", flush=True)
    print(f"State: {state_dir}", flush=True)
    print(f"Control: {state_dir / CONTROL_SOCKET}", flush=True)
    print(f"Seed: {seed}", flush=True)
    if node.metrics_address is not None:
        print(f"Metrics: {_metrics_url(node)}", flush=True)
    if note:
        print(f"Note: {note}", flush=True)


def _metrics_url(node: PolykeyNode) -> str | None:
    if node.metrics_address is None:
        return None
    host, port = node.metrics_address
    return f"http://{format_host_port(host, port)}/metrics"


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "node":
        command, *rest = _control_command(args)
        return trio.run(run_command, command, *rest)
    configure_logging(args.log_level, args.log_format)
    settings = NodeSettings(
        state_dir=args.state_dir or Path(_env("STATE_DIR", str(default_state_dir()))),
        host=args.host,
        port=int(args.port),
        seeds=tuple(args.seed if args.seed is not None else _env_seeds()),
        relay=args.relay,
        limits=_limits(args, parser),
        metrics=_listen_address(args.metrics)
        if isinstance(args.metrics, str)
        else args.metrics,
    )
    try:
        trio.run(run_node, settings, args.format)
    except (PolykeyError, OSError, BaseExceptionGroup) as exc:
        lines = _one_line_errors(exc)
        if lines is None:
            raise
        for line in dict.fromkeys(lines):
            print(f"polykey: {line}", file=sys.stderr)
        return 1
    return 0
