"""The CLI's control commands: one call to the running node each, its answer
printed in the format asked for, and an exit status from sysexits.

Human output is aligned ``key  value`` lines (lists as tables); JSON output
is the control method's answer, one object per command, with the keys
docs/cli.md lists. Every answer is read through its class in ``_replies``
(the classes the node built it from), so a malformed answer is one clear
error, and JSON output is that object written back. Errors are one line on
stderr.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import trio

from . import _replies as replies
from ._control import control_client
from ._state import StateDirInUseError, renew_identity, state_dir_in_use
from .keys import (
    CertChain,
    CertificateError,
    KeysError,
    NodeIdentity,
    load_cert_chain,
    load_key_pair,
    verify_chain,
)
from .nodes import format_host_port
from .rpc import RPCError, RPCRemoteError

__all__ = ["EX", "run_command"]


class EX:
    """sysexits(3) exit statuses."""

    OK: Final = 0
    USAGE: Final = 64
    DATAERR: Final = 65
    NOINPUT: Final = 66
    UNAVAILABLE: Final = 69
    SOFTWARE: Final = 70
    TEMPFAIL: Final = 75


#: The longest a control command waits for its answer (a find gives up
#: after 60 s in the node, a ping after 60 s).
COMMAND_DEADLINE: Final = 95.0
#: How long ``agent stop`` waits for the node to be gone.
STOP_WAIT: Final = 30.0
#: How often a terminal's progress line is refreshed.
PROGRESS_INTERVAL: Final = 0.25

JSON = dict[str, Any]
T = TypeVar("T")


class CommandError(Exception):
    """A one-line error and the exit status it means."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _exit_status(error: RPCRemoteError) -> int:
    code = error.remote_code
    if error.remote_type in ("ErrorRPCInvalidParams", "ErrorRPCParse"):
        return EX.DATAERR
    if error.remote_type == "ErrorPolykeyNodeUnreachable":
        return EX.UNAVAILABLE
    if error.remote_type == "ErrorRPCTimedOut" or code == -32008:
        return EX.TEMPFAIL
    return EX.SOFTWARE


async def _call_json(state_dir: Path, method: str, params: JSON) -> JSON:
    client = control_client(state_dir)
    try:
        result = await client.unary(method, params)
    except RPCRemoteError as exc:
        raise CommandError(exc.remote_message or str(exc), _exit_status(exc)) from None
    except RPCError as exc:
        raise CommandError(f"the node failed to answer: {exc}", EX.SOFTWARE) from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise CommandError(
                f"no node is running with state directory {state_dir}", EX.UNAVAILABLE
            ) from None
        raise CommandError(f"cannot reach the node: {exc}", EX.UNAVAILABLE) from None
    if not isinstance(result, dict):
        raise CommandError("the node's answer is not an object", EX.SOFTWARE)
    result.pop("metadata", None)
    return result


@contextlib.contextmanager
def _malformed(method: str) -> Iterator[None]:
    """A malformed answer to ``method`` as the command's one-line error."""
    try:
        yield
    except replies.MalformedReply as exc:
        raise CommandError(
            f"the node's answer to {method} is {exc}", EX.SOFTWARE
        ) from None


def _read(cls: type[T], method: str, result: JSON) -> T:
    with _malformed(method):
        return replies.from_json(cls, result)


async def _call(state_dir: Path, method: str, params: JSON, reply: type[T]) -> T:
    return _read(reply, method, await _call_json(state_dir, method, params))


def _print_json(reply: object, out: TextIO) -> None:
    print(json.dumps(replies.to_json(reply)), file=out)


# -- human output -----------------------------------------------------------------


def _pairs(rows: Sequence[tuple[str, object]], out: TextIO) -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO
) -> None:
    cells = [list(header)] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _address(entry: Any) -> str:
    """``host:port`` of a reply with ``host`` and ``port`` fields."""
    return format_host_port(entry.host, entry.port)


def _status_human(r: replies.AgentStatus, out: TextIO) -> None:
    rows: list[tuple[str, object]] = [
        ("status", r.status),
        ("pid", r.pid),
        ("nodeId", r.node_id_encoded),
        ("address", _address(r)),
    ]
    rows += [("seenAt", _address(seen)) for seen in r.reflexive]
    serving = "serving" if r.relay.get("serving") else "not serving"
    rows += [
        ("behindNat", "yes" if r.behind_nat else "no"),
        ("startTime", r.start_time),
        ("upTime", f"{r.up_time:.0f} s"),
        ("version", r.version),
        ("connectionsActive", r.connections_active),
        ("nodesTotal", r.nodes_total),
        ("rpcCallsServed", r.served.rpc_calls),
        ("lookups", r.served.lookups),
        ("relay", f"{r.relay.get('mode')}, {serving}"),
    ]
    _pairs(rows, out)


# -- the commands -------------------------------------------------------------------


async def agent_status(state_dir: Path, output: str, out: TextIO) -> int:
    try:
        result = await _call(state_dir, "agentStatus", {}, replies.AgentStatus)
    except CommandError as exc:
        if exc.status != EX.UNAVAILABLE:
            raise
        if output == "json":
            _print_json(replies.NodeNotRunning(state_dir=str(state_dir)), out)
        else:
            _pairs([("status", "DEAD"), ("stateDir", state_dir)], out)
        return EX.UNAVAILABLE
    if output == "json":
        _print_json(result, out)
    else:
        _status_human(result, out)
    return EX.OK


async def agent_stop(state_dir: Path, output: str, out: TextIO) -> int:
    try:
        result = await _call(state_dir, "agentStop", {}, replies.AgentStop)
    except CommandError as exc:
        if exc.status != EX.UNAVAILABLE:
            raise
        if output == "json":
            _print_json(replies.NodeNotRunning(state_dir=str(state_dir)), out)
        else:
            print("Agent is not running", file=out)
        return EX.OK
    # Gone once its state directory's lock is free: the node lets go of it
    # last, after closing its connections and its graph.
    with trio.move_on_after(STOP_WAIT) as waited:
        while state_dir_in_use(state_dir):  # noqa: ASYNC110 - a lock, not a task
            await trio.sleep(0.05)
    if waited.cancelled_caught:
        raise CommandError(
            f"the node (pid {result.pid}) did not stop in {STOP_WAIT:g} s",
            EX.TEMPFAIL,
        )
    if output == "json":
        _print_json(replies.AgentStop("STOPPED", result.pid), out)
    else:
        print("Agent stopped", file=out)
    return EX.OK


async def nodes_add(
    state_dir: Path, output: str, out: TextIO, node_id: str, host: str, port: int,
    ping: bool, force: bool,
) -> int:  # fmt: skip
    result = await _call(
        state_dir,
        "nodesAdd",
        {
            "nodeIdEncoded": node_id,
            "host": host,
            "port": port,
            "ping": ping,
            "force": force,
        },
        replies.NodesAdd,
    )
    if output == "json":
        _print_json(result, out)
    else:
        pinged = {
            True: "answered",
            False: "did not answer (added anyway)",
            None: "not pinged",
        }
        if result.added:
            print(
                f"Added {result.node_id_encoded} at {_address(result)}: {pinged[result.pinged]}",
                file=out,
            )
        else:
            print(
                f"Not added {result.node_id_encoded}: its bucket is full of live nodes",
                file=out,
            )
    return EX.OK


async def _with_progress(
    state_dir: Path, output: str, method: str, params: JSON, target: str
) -> JSON:
    """Call ``method``; meanwhile, on a terminal in human format, show how
    the node's lookup for ``target`` goes (which round, how many asked) on
    one line of stderr. Quiet when piped or with --format json."""
    err = sys.stderr
    if output != "human" or not err.isatty():
        return await _call_json(state_dir, method, params)
    result: JSON = {}
    failed: CommandError | None = None
    async with trio.open_nursery() as nursery:

        async def call() -> None:
            nonlocal result, failed
            try:
                result = await _call_json(state_dir, method, params)
            except CommandError as exc:
                failed = exc  # raised below, not as an exception group
            nursery.cancel_scope.cancel()

        nursery.start_soon(call)
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            try:
                progress = await _call(
                    state_dir, "lookupProgress", {}, replies.LookupProgress
                )
            except CommandError:
                continue
            for lookup in progress.lookups:
                if lookup.target_node_id_encoded == target:
                    print(
                        f"\r  round {lookup.rounds}, {lookup.contacted} asked,"
                        f" {lookup.responses} answered, {lookup.failures} failed  ",
                        end="",
                        file=err,
                        flush=True,
                    )
    print("\r\x1b[K", end="", file=err, flush=True)
    if failed is not None:
        raise failed
    return result


async def nodes_find(state_dir: Path, output: str, out: TextIO, node_id: str) -> int:
    answer = await _with_progress(
        state_dir, output, "nodesFind", {"nodeIdEncoded": node_id}, node_id
    )
    result = _read(replies.NodesFind, "nodesFind", answer)
    found = bool(result.addresses)
    if output == "json":
        _print_json(result, out)
    elif found:
        how = f"round {result.found_round}, {result.queries} asked"
        for host, port in result.addresses:
            print(f"Found node at {format_host_port(host, port)} ({how})", file=out)
    if not found:
        raise CommandError(f"{node_id}: not found", EX.UNAVAILABLE)
    return EX.OK


async def nodes_ping(state_dir: Path, output: str, out: TextIO, node_id: str) -> int:
    answer = await _with_progress(
        state_dir, output, "nodesPingNode", {"nodeIdEncoded": node_id}, node_id
    )
    with _malformed("nodesPingNode"):
        result = replies.read_ping(answer)
    if output == "json":
        _print_json(result, out)
    elif isinstance(result, replies.NodesPing):
        print(
            f"Node is Active: {_address(result)}, {result.path},"
            f" connected in {result.connect_ms:.1f} ms, {result.rtt_ms:.1f} ms in all",
            file=out,
        )
    if isinstance(result, replies.NodesPingFailed):
        raise CommandError(f"{node_id}: not reached: {result.error}", EX.UNAVAILABLE)
    return EX.OK


async def nodes_getall(state_dir: Path, output: str, out: TextIO) -> int:
    result = await _call(state_dir, "nodesGetAll", {}, replies.NodesGetAll)
    if output == "json":
        print(json.dumps(replies.to_json(result)["nodes"]), file=out)
        return EX.OK
    _table(
        ("bucket", "nodeId", "address", "lastSeen"),
        [
            (
                n.bucket_index,
                n.node_id_encoded,
                ", ".join(_address(a) for a in n.addresses),
                n.last_seen,
            )
            for n in result.nodes
        ],
        out,
    )
    return EX.OK


async def nodes_connections(state_dir: Path, output: str, out: TextIO) -> int:
    result = await _call(state_dir, "nodesConnections", {}, replies.NodesConnections)
    if output == "json":
        print(json.dumps(replies.to_json(result)["connections"]), file=out)
        return EX.OK
    _table(
        ("nodeId", "address", "path", "dir", "age s", "ttl s", "streams", "sent", "received", "rtt ms"),
        [
            (
                c.node_id_encoded, _address(c), c.path, "out" if c.outgoing else "in",
                f"{c.age_s:.0f}", None if c.ttl_left_s is None else f"{c.ttl_left_s:.0f}",
                c.streams, c.bytes_sent, c.bytes_received, c.rtt_ms,
            )
            for c in result.connections
        ],
        out,
    )  # fmt: skip
    return EX.OK


# -- keys: offline, on the state directory itself ----------------------------------


def _utc(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _certificates(chain: CertChain) -> list[replies.Certificate]:
    return [
        replies.Certificate(
            str(node_id),
            _utc(cert.not_valid_before_utc),
            _utc(cert.not_valid_after_utc),
        )
        for cert, node_id in zip(chain.certificates, chain.node_ids(), strict=True)
    ]


def _load_identity(state_dir: Path) -> NodeIdentity:
    keys = state_dir / "keys"
    try:
        return NodeIdentity(
            load_key_pair(keys / "private_key.pem"),
            load_cert_chain(keys / "certificate_chain.pem"),
        )
    except (KeysError, FileNotFoundError, ValueError) as exc:
        raise CommandError(f"no usable identity in {keys}: {exc}", EX.NOINPUT) from None


async def keys_show(state_dir: Path, output: str, out: TextIO) -> int:
    await trio.lowlevel.checkpoint()
    identity = _load_identity(state_dir)
    try:
        verify_chain(identity.chain.to_der_list())
        valid, why = True, None
    except CertificateError as exc:
        valid, why = False, str(exc)
    shown = replies.KeysShow(
        node_id_encoded=str(identity.node_id),
        key_file=str(state_dir / "keys" / "private_key.pem"),
        chain_valid=valid,
        chain_error=why,
        certificates=_certificates(identity.chain),
    )
    if output == "json":
        _print_json(shown, out)
        return EX.OK
    _pairs(
        [("nodeId", shown.node_id_encoded), ("keyFile", shown.key_file),
         ("chain", "valid" if valid else f"INVALID: {why}")],
        out,
    )  # fmt: skip
    _table(
        ("certificate of", "not before", "not after"),
        [(c.node_id_encoded, c.not_before, c.not_after) for c in shown.certificates],
        out,
    )
    return EX.OK


async def keys_renew(state_dir: Path, output: str, out: TextIO) -> int:
    await trio.lowlevel.checkpoint()
    _load_identity(state_dir)  # a clear error when there is none
    try:
        old, new = renew_identity(state_dir)
    except StateDirInUseError as exc:
        raise CommandError(f"{exc}: stop it first (agent stop)", EX.TEMPFAIL) from None
    renewed = replies.KeysRenew(
        previous_node_id_encoded=str(old.node_id),
        node_id_encoded=str(new.node_id),
        certificates=_certificates(new.chain),
    )
    if output == "json":
        _print_json(renewed, out)
    else:
        print(
            f"Renewed: {old.node_id} -> {new.node_id} (chain of {len(new.chain)})",
            file=out,
        )
    return EX.OK


async def run_command(
    command: Callable[..., Awaitable[int]], *args: object, err: TextIO = sys.stderr
) -> int:
    """Run one control command under its deadline; errors as one line."""
    try:
        with trio.fail_after(COMMAND_DEADLINE):
            return await command(*args)
    except CommandError as exc:
        print(f"polykey: {exc}", file=err)
        return exc.status
    except trio.TooSlowError:
        print(f"polykey: no answer in {COMMAND_DEADLINE:g} s", file=err)
        return EX.TEMPFAIL
