"""The methods a running node serves on its control socket (``_control``).

Each reads its params through one of ``_control_params``' attrs classes
(a bad key is -32602 naming it) and answers with JSON whose keys docs/cli.md
lists (they are stable: the CLI's ``--format json`` prints them as they
are), shaped by one of ``_replies``' attrs classes:

* ``agentStatus`` / ``nodeStatus`` (its old name): who and where the node
  is, since when, what it holds and has served.
* ``agentStop``: stop the node in order (the reply comes first).
* ``nodesAdd`` ``{nodeIdEncoded, host, port, ping?, force?}``: put a node in
  the graph; with ``ping`` (the default) only once it answered, unless
  ``force``. As the node manager adds: into a full bucket only if a
  stale member fails its ping (``added`` false otherwise). The reply comes
  once the graph's write is committed.
* ``nodesFind`` ``{nodeIdEncoded}``: its addresses, by a Kademlia lookup.
* ``nodesPingNode`` ``{nodeIdEncoded}``: connect to it by NodeId alone
  (dialled, punched or relayed) and call its ``nodesPing``.
* ``nodesGetAll``: the graph, by bucket.
* ``nodesConnections``: the live connections, with quiche's figures.

A failure the operator should hear about (bad input, a node not reached) is
an error reply with a code the CLI maps to a sysexits exit status.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
import trio

from . import __version__
from . import _replies as replies
from ._control_params import NodesAddParams, NoParams, TargetParams, read_params
from .keys import NodeId
from .nodes import NodesError, request_ping
from .rpc import CallContext, JSONValue, RPCError, RPCInvalidParams, UnaryHandler

if TYPE_CHECKING:
    from ._control import ControlServer
    from .agent import PolykeyNode

__all__ = ["FIND_TIMEOUT", "PING_TIMEOUT", "control_methods"]

JSON = dict[str, Any]
P = TypeVar("P")

#: A find or a ping may run this long (a lookup gives up at 60 s itself).
FIND_TIMEOUT: Final = 90.0
PING_TIMEOUT: Final = 60.0


class NodeUnreachable(RPCError):
    """A node asked for could not be reached or found (exit status 69)."""

    code = -32090  # ours; the CLI maps it to EX_UNAVAILABLE
    wire_type = "ErrorPolykeyNodeUnreachable"
    default_message = "node not reached"


def _not_own(target: NodeId, own: NodeId) -> NodeId:
    if target == own:
        raise RPCInvalidParams("that is this node's own NodeId")
    return target


def _iso(seconds: float) -> str:
    return (
        datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


class _Method(UnaryHandler[P, JSON]):
    #: The class its params are read as (``_control_params``).
    params: type[P]

    def __init__(self, node: PolykeyNode, control: ControlServer) -> None:
        self.node = node
        self.control = control

    def parse_params(self, params: JSONValue) -> P:
        return read_params(params, self.params)


class AgentStatus(_Method[NoParams]):
    params = NoParams

    async def handle(self, params: NoParams, ctx: CallContext) -> JSON:
        ctx.keep_deadline()  # over the reply too: the client may not read it
        node = self.node
        host, port = node.address
        stats = self.control.statistics()
        rpc = node.rpc_server.statistics()
        manager = node.manager.statistics()
        connections = node.connections.active()
        reply = replies.AgentStatus(
            status="LIVE",
            pid=os.getpid(),
            version=__version__,
            node_id_encoded=str(node.node_id),
            host=host,
            port=port,
            start_time=_iso(node.started_at),
            up_time=round(time.time() - node.started_at, 3),
            connections_active=len(connections),
            nodes_total=len(node.graph),
            graph_size=len(node.graph),
            connections=[
                replies.NodeLink(str(c.node_id), *c.address, c.path.value, c.outgoing)
                for c in connections
            ],
            # Where peers see us (most recent first), and what it implies.
            reflexive=[replies.HostPort(*a) for a in node.connections.reflexive],
            behind_nat=node.connections.behind_nat(),
            relay=node.relay_status(),
            served=replies.ServedCounts(rpc.calls, manager.lookups, manager.finds),
            # Every component's counters, in one snapshot.
            statistics={
                **node.connections.statistics(),
                "rpc": attrs.asdict(rpc),
                "manager": attrs.asdict(manager),
                "finder": attrs.asdict(node.finder.statistics),
                "graphWriter": {
                    "writes": node.manager.writer.writes,
                    "writeErrors": node.manager.writer.write_errors,
                },
                "eventsDropped": node.events_dropped,
                # Live trio tasks in the process: a leak shows as growth.
                "tasks": _live_tasks(),
            },
            control=replies.ControlCounts(
                stats.clients,
                stats.accepted,
                stats.refused_busy,
                stats.accept_errors,
                stats.timeouts,
                stats.bugs,
            ),
        )
        return replies.to_json(reply)


def _live_tasks() -> int:
    """Every live trio task, counted down the task tree from the root."""
    count = 0
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


class AgentStop(_Method[NoParams]):
    params = NoParams

    async def handle(self, params: NoParams, ctx: CallContext) -> JSON:
        self.node.request_stop()
        return replies.to_json(replies.AgentStop("STOPPING", os.getpid()))


class NodesAdd(_Method[NodesAddParams]):
    params = NodesAddParams
    timeout = PING_TIMEOUT

    async def handle(self, params: NodesAddParams, ctx: CallContext) -> JSON:
        ctx.keep_deadline()
        target = _not_own(params.node_id_encoded, self.node.node_id)
        address = params.address()
        answered: bool | None = None
        if params.ping:
            # As long as a ping of the node manager's may take (a multiple of
            # the dial times seen; 15 s at most).
            seconds = self.node.manager.attempt_deadline()
            try:
                with trio.fail_after(seconds):
                    await self.node.connect(target, address.as_tuple())
                answered = True
            except (NodesError, OSError, trio.TooSlowError) as exc:
                if not params.force:
                    why = exc if str(exc) else f"no answer in {seconds:g} s"
                    raise NodeUnreachable(f"{target} did not answer: {why}") from None
                answered = False
        # As the node manager adds: a full bucket pings its stalest members
        # and evicts the dead; the reply waits until the row is committed,
        # so an acknowledged node survives a crash.
        added = await self.node.manager.add_node(target, [address])
        reply = replies.NodesAdd(
            node_id_encoded=str(target),
            host=address.host,
            port=address.port,
            added=added,
            pinged=answered,
        )
        return replies.to_json(reply)


class NodesFind(_Method[TargetParams]):
    params = TargetParams
    timeout = FIND_TIMEOUT

    async def handle(self, params: TargetParams, ctx: CallContext) -> JSON:
        ctx.keep_deadline()
        target = params.node_id_encoded
        if target == self.node.node_id:
            # Found without a lookup: no rounds, no one asked.
            own = replies.NodesFind(
                node_id_encoded=str(target),
                addresses=[self.node.address],
                rounds=0,
                found_round=0,
                queries=0,
                failures=0,
            )
            return replies.to_json(own)
        result = await self.node.manager.find(target)
        found = result.found
        reply = replies.NodesFind(
            node_id_encoded=str(target),
            addresses=[a.as_tuple() for a in found.addresses] if found else [],
            # How the lookup went: rounds (and the one that reached it),
            # nodes asked, of those failed.
            rounds=result.rounds,
            found_round=result.found_round,
            queries=result.queries,
            failures=result.failures,
        )
        return replies.to_json(reply)


class NodesPingNode(_Method[TargetParams]):
    params = TargetParams

    #: Long enough for a find and a punch; the caller's own timeout, if
    #: shorter, wins (js-rpc's timeout rule).
    timeout = PING_TIMEOUT

    async def handle(self, params: TargetParams, ctx: CallContext) -> JSON:
        ctx.keep_deadline()
        target = _not_own(params.node_id_encoded, self.node.node_id)
        started = trio.current_time()
        pooled = self.node.connections.get(target) is not None
        try:
            conn = await self.node.connect(target)
            connected = trio.current_time()
            await request_ping(conn.rpc)
        except (NodesError, RPCError, OSError) as exc:
            failed = replies.NodesPingFailed(
                node_id_encoded=str(target), error=str(exc) or type(exc).__name__
            )
            return replies.to_json(failed)
        host, port = conn.address
        # The winning attempt alone: the dial; a punch from its signal
        # request; a relayed connection from its circuit request.
        attempt = None
        if conn.attempt_started is not None and conn.since >= started:
            attempt = _ms(conn.since - conn.attempt_started)
        answer = replies.NodesPing(
            node_id_encoded=str(target),
            path=conn.path.value,
            host=host,
            port=port,
            pooled=pooled,
            # Finding and connecting (dialled, punched or relayed), then
            # that and the ping.
            connect_ms=_ms(connected - started),
            rtt_ms=_ms(trio.current_time() - started),
            attempt_ms=attempt,
        )
        return replies.to_json(answer)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class NodesGetAll(_Method[NoParams]):
    params = NoParams

    async def handle(self, params: NoParams, ctx: CallContext) -> JSON:
        graph = self.node.graph
        nodes = []
        for index in graph.nonempty_buckets():
            for contact in graph.bucket(index):
                seen = graph.last_seen(contact.node_id)
                entry = replies.GraphEntry(
                    node_id_encoded=str(contact.node_id),
                    bucket_index=index,
                    addresses=[
                        replies.HostPort(*a.as_tuple()) for a in contact.addresses
                    ],
                    last_seen=_iso(seen) if seen else None,
                )
                nodes.append(entry)
        return replies.to_json(replies.NodesGetAll(nodes))


class NodesConnections(_Method[NoParams]):
    params = NoParams

    async def handle(self, params: NoParams, ctx: CallContext) -> JSON:
        node = self.node
        now = trio.current_time()
        out = []
        for c in node.connections.active():
            stats = c.connection.statistics()
            path = stats.path
            ttl = node.connections.ttl_of(c.node_id)
            entry = replies.ConnectionEntry(
                node_id_encoded=str(c.node_id),
                host=c.address[0],
                port=c.address[1],
                path=c.path.value,
                outgoing=c.outgoing,
                age_s=round(now - c.since, 3),
                ttl_left_s=None if ttl is None else round(ttl - (now - c.last_used), 3),
                streams=stats.streams_open,
                bytes_sent=stats.quiche.sent_bytes,
                bytes_received=stats.quiche.recv_bytes,
                rtt_ms=round(path.rtt_ns / 1e6, 3) if path is not None else None,
            )
            out.append(entry)
        return replies.to_json(replies.NodesConnections(out))


class LookupProgress(_Method[NoParams]):
    """The lookups running now: for a CLI's progress line."""

    params = NoParams

    async def handle(self, params: NoParams, ctx: CallContext) -> JSON:
        lookups = [
            replies.LookupEntry(
                target_node_id_encoded=str(m.target),
                rounds=m.rounds,
                contacted=m.contacted,
                in_flight=m.in_flight,
                responses=m.responses,
                failures=m.failures,
            )
            for m in self.node.manager.running_lookups
        ]
        return replies.to_json(replies.LookupProgress(lookups))


def control_methods(node: PolykeyNode, control: ControlServer) -> dict[str, Any]:
    status = AgentStatus(node, control)
    return {
        "agentStatus": status,
        "nodeStatus": status,
        "agentStop": AgentStop(node, control),
        "nodesAdd": NodesAdd(node, control),
        "nodesFind": NodesFind(node, control),
        "nodesPingNode": NodesPingNode(node, control),
        "nodesGetAll": NodesGetAll(node, control),
        "nodesConnections": NodesConnections(node, control),
        "lookupProgress": LookupProgress(node, control),
    }
