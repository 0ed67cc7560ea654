"""The per-call context handed to handlers and middleware."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import trio

from ._messages import JSONObject

__all__ = ["CallContext"]


@attrs.define(eq=False)
class CallContext:
    """What a call runs under, on either side.

    ``cancel_scope`` is the scope the handler (server) or the call (client)
    runs in; its deadline is the call's RPC timeout.  That deadline stops
    applying once the first response message passes ("proof of life"),
    unless :meth:`keep_deadline` was called.  Cancelling the scope aborts the
    call and resets its stream.
    """

    method: str
    side: Literal["server", "client"]
    cancel_scope: trio.CancelScope
    #: The call's metadata: ``params.metadata`` of the first request.
    metadata: JSONObject = attrs.field(factory=dict)
    #: The transport's metadata (for QUIC: remote NodeId, host, port, certs).
    transport: Mapping[str, Any] = attrs.field(factory=dict)
    #: Client side: the deadline the caller was under when it made the call
    #: (``inf``: none), which caps the timeout the call sends.
    caller_deadline: float = math.inf
    _keep: bool = False
    _alive: bool = False

    @property
    def deadline(self) -> float:
        """The current deadline of the call (``inf`` when there is none)."""
        return self.cancel_scope.deadline

    @property
    def timeout(self) -> float | None:
        """Seconds left before the deadline, or ``None`` when infinite."""
        d = self.cancel_scope.deadline
        if math.isinf(d):
            return None
        return max(0.0, d - trio.current_time())

    def keep_deadline(self) -> None:
        """Keep the deadline over the whole call, past proof of life."""
        self._keep = True

    @property
    def keeps_deadline(self) -> bool:
        return self._keep

    def shorten_timeout(self, seconds: float | None) -> None:
        """Make the deadline at most ``seconds`` from now (``None``: no change)."""
        if seconds is None:
            return
        deadline = trio.current_time() + max(0.0, seconds)
        if deadline < self.cancel_scope.deadline:
            self.cancel_scope.deadline = deadline

    def set_timeout(self, seconds: float | None) -> None:
        """Restart the timer: deadline ``seconds`` from now, or none."""
        deadline = (
            math.inf if seconds is None else trio.current_time() + max(0.0, seconds)
        )
        if deadline != self.cancel_scope.deadline:
            self.cancel_scope.deadline = deadline

    @property
    def alive(self) -> bool:
        """True once the first response message has passed."""
        return self._alive

    def proof_of_life(self) -> None:
        """Called as the first response passes: the timer stops applying."""
        if not self._alive:
            self._alive = True
            if not self._keep and self.cancel_scope.deadline != math.inf:
                self.cancel_scope.deadline = math.inf

    def timed_out(self) -> bool:
        """True if the scope was cancelled because its deadline passed."""
        return (
            self.cancel_scope.cancelled_caught
            and trio.current_time() >= self.cancel_scope.deadline
        )
