"""Middleware: per-call hooks on each message, as js-rpc's transform pairs.

A middleware factory is called once per call with its :class:`CallContext`
and returns a :class:`Middleware`.  ``forward`` sees every request (on the
server as it arrives, on the client as it leaves) and ``reverse`` every
response, success or error, in the other direction.  Forward hooks run in
list order, reverse hooks in reverse order (the chain is an onion).  A hook
may return a changed message, or raise to fail the call: on the server the
exception becomes the error response.  Raw calls bypass middleware.

The timeout middleware comes first on both sides and is on by default.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

import trio

from ._context import CallContext
from ._messages import ErrorResponse, Request, Response

__all__ = [
    "ClientTimeoutMiddleware",
    "Middleware",
    "MiddlewareFactory",
    "ServerTimeoutMiddleware",
    "metadata_timeout_ms",
]


class Middleware:
    """A pass-through middleware; subclass and override what you need (a
    hook is looked for on the class, once per class)."""

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx

    async def forward(self, message: Request) -> Request:
        return message

    async def reverse(
        self, message: Response | ErrorResponse
    ) -> Response | ErrorResponse:
        return message


MiddlewareFactory: TypeAlias = Callable[[CallContext], Middleware]


def metadata_timeout_ms(params: object) -> float | bool | None:
    """Read ``params.metadata.timeout``: ms, ``None`` for infinite, False if absent."""
    if not isinstance(params, dict):
        return False
    meta = params.get("metadata")
    if not isinstance(meta, dict) or "timeout" not in meta:
        return False
    value = meta["timeout"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if value != value or value < 0:  # NaN never equals itself
        return False
    try:
        ms = float(value)
    except OverflowError:
        # An integer past a double's range: JSON.parse reads it as Infinity.
        return None
    return None if math.isinf(ms) else ms


class ServerTimeoutMiddleware(Middleware):
    """Shortens the call's deadline to the client's ``metadata.timeout``."""

    _first = True

    async def forward(self, message: Request) -> Request:
        if self._first:
            self._first = False
            ms = metadata_timeout_ms(message.params)
            if ms is not None and ms is not False:
                self.ctx.shorten_timeout(float(ms) / 1000.0)
        return message


class ClientTimeoutMiddleware(Middleware):
    """Writes the call's timeout to ``params.metadata.timeout`` (first message)."""

    _first = True

    async def forward(self, message: Request) -> Request:
        if not self._first:
            return message
        self._first = False
        params = message.params
        params = (
            {}
            if params is None
            else dict(params)
            if isinstance(params, dict)
            else params
        )
        if not isinstance(params, dict):
            return message  # js-rpc cannot attach metadata to a non-object either
        meta = params.get("metadata")
        meta = dict(meta) if isinstance(meta, dict) else {}
        # The call's own deadline or the caller's, whichever is first. The
        # caller's as the call began, not current_effective_deadline(): that
        # walks every scope the caller is in, about 20 Python calls a call.
        ctx = self.ctx
        deadline = min(ctx.deadline, ctx.caller_deadline)
        if math.isinf(deadline):
            meta["timeout"] = None
        else:
            remaining = max(0.0, deadline - trio.current_time())
            meta["timeout"] = math.ceil(round(remaining * 1000, 6))
        params["metadata"] = meta
        # Not attrs.evolve (fields() and a getattr per field): its three.
        return Request(message.method, params, message.id)


def build_chain(
    ctx: CallContext,
    factories: Sequence[MiddlewareFactory],
) -> list[Middleware]:
    return [factory(ctx) for factory in factories]


ForwardHook: TypeAlias = Callable[[Request], Awaitable[Request]]
ReverseHook: TypeAlias = Callable[
    [Response | ErrorResponse], Awaitable[Response | ErrorResponse]
]


#: Per middleware class: whether it overrides ``forward``, ``reverse``
#: (asked per call, of every middleware in the chain).
_overrides_of: dict[type, tuple[bool, bool]] = {}


def _overrides(mw: Middleware) -> tuple[bool, bool]:
    cls = type(mw)
    known = _overrides_of.get(cls)
    if known is None:
        known = _overrides_of[cls] = (
            cls.forward is not Middleware.forward,
            cls.reverse is not Middleware.reverse,
        )
    return known


def forward_hooks(chain: Sequence[Middleware]) -> list[ForwardHook]:
    """The ``forward`` hooks of ``chain`` in order, leaving out pass-throughs."""
    return [mw.forward for mw in chain if _overrides(mw)[0]]


def reverse_hooks(chain: Sequence[Middleware]) -> list[ReverseHook]:
    """The ``reverse`` hooks of ``chain`` in reverse order, leaving out
    pass-throughs."""
    return [mw.reverse for mw in reversed(chain) if _overrides(mw)[1]]


async def run_forward(chain: Sequence[Middleware], message: Request) -> Request:
    for mw in chain:
        message = await mw.forward(message)
    return message


async def run_reverse(
    chain: Sequence[Middleware], message: Response | ErrorResponse
) -> Response | ErrorResponse:
    for mw in reversed(chain):
        message = await mw.reverse(message)
    return message
