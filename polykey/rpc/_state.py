"""The life of one RPC call as sans-IO state machines, one per side.

Theory of operation
-------------------
A call is one stream, and how it ends (a graceful close, a reply sent late,
a reset and with which code, whether the peer's input is drained first)
depends on what has happened to both directions of that stream.  Rather
than in flags scattered over the trio code, that history lives here, in the
manner of h11's ``_state.py``: each side has states (enums), the events the
trio driver reports (also enums), and one transition table per direction;
an event the table does not list for the current state is a bug in the
driver and raises :class:`CallStateError`.  Nothing in this module awaits or
imports trio, so every path can be tested without a stream (including in
orders no test over a real stream could arrange).

The server's call (:class:`ServerCallState`) has two directions:

* its *output* (what we write): ``AWAITING_HEADER`` until the header is
  read, ``RUNNING`` while the answer is produced, ``SENDING`` while one
  message is being written, ``CLOSED`` once our FIN went, plus the raw
  call's ``RAW``/``RAW_CLOSED``, and the dead ends ``TORN`` (a write was
  cut short, so half a message is on the wire and only a reset can follow),
  ``RESET`` (we reset) and ``GONE`` (the peer reset or vanished);
* its *input* (what the client writes): ``OPEN``, ``DRAINING`` (the answer
  is out and we read to the client's FIN, bounded by linger), ``DROPPED``
  (the answer is out and the stream drops the rest as it comes, with no
  task reading: a QUIC stream's ``close_dropping_input``), ``ENDED`` (the
  FIN was read), ``FAILED`` (bad input) and ``BROKEN`` (reset).

Bad input seen while a message is being written must not cut it in half, so
``SENDING`` becomes ``SENDING_THEN_CANCEL`` and the handler is cancelled
when the write ends: the transition tells the driver so
(:attr:`Action.CANCEL_HANDLER`).  ``GONE`` absorbs every event: the peer's
reset races the call's own tasks, and after it nothing we do is seen.

The call scope may also be cancelled for a reason that is not a stream
event: a forced stop, or bad input that cancels a unary handler through the
call scope (which it runs in, to save a scope per call).  That reason is
:attr:`ServerCallState.stop`; when the call scope ends cancelled without
one, the driver says whether its deadline had passed, and
:meth:`ServerCallState.end` decides the rest from the states alone.

The client's call (:class:`ClientCallState`) is smaller: the request side is
open until our FIN; the response side is open, then ends with the server's
FIN, an error response, or the hand-over of a raw call's bytes;
``LINGERING`` is a unary call that has its result and waits (bounded by
linger, through the call scope's deadline) for the server's FIN.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

import attrs

from ._errors import RPCInternalError, StreamCode

__all__ = [
    "Action",
    "CallStateError",
    "ClientCallState",
    "ClientEnd",
    "ClientEvent",
    "EndAction",
    "Ending",
    "Incoming",
    "Input",
    "Outgoing",
    "Output",
    "ServerCallState",
    "ServerEvent",
    "Stop",
]


class _Enum(enum.Enum):
    # Identity hashing in C: Enum's own __hash__ is Python code, and the
    # transition tables are looked up several times per call.
    __hash__ = object.__hash__


class CallStateError(RPCInternalError):
    """An event the call's state does not allow: a bug in polykey's RPC
    driver, never a peer's doing."""


# -- the server's call ---------------------------------------------------------
class Output(_Enum):
    """What the server has written."""

    AWAITING_HEADER = "awaiting header"
    #: The answer is being produced (a handler runs, or an error for a bad
    #: header is about to go); no message is half written.
    RUNNING = "running"
    SENDING = "sending"
    #: Sending, and bad input arrived meanwhile: cancel the handler after.
    SENDING_THEN_CANCEL = "sending, then cancel"
    RAW = "raw"
    CLOSED = "closed"
    RAW_CLOSED = "raw closed"
    TORN = "torn"
    RESET = "reset"
    GONE = "gone"


class Input(_Enum):
    """What the server has read of the client's input."""

    OPEN = "open"
    DRAINING = "draining"
    #: Answered, and the stream drops the rest of the input as it comes.
    DROPPED = "dropped"
    ENDED = "ended"
    FAILED = "failed"
    BROKEN = "broken"


class ServerEvent(_Enum):
    HEADER = "header"  # a header for a method served here
    SEND = "send"  # a message write starts
    SENT = "sent"
    SENT_LAST = "sent last"  # the write carried our FIN too
    SEND_CUT = "send cut"  # the write was cancelled part way
    FIN = "fin"  # our FIN is going out alone
    ACCEPT_RAW = "accept raw"  # the raw call's leading response is out
    RESET = "reset"  # we reset the stream
    PEER_GONE = "peer gone"  # a read or write of ours found the peer gone
    INPUT_END = "input end"  # the client's FIN was read
    INPUT_FAILED = "input failed"  # bad input (JSON, size, request, params)
    INPUT_BROKE = "input broke"  # the reader found the stream reset
    DRAIN = "drain"  # we start reading to the client's FIN
    DROP_INPUT = "drop input"  # the stream is to drop the rest of the input


class Action(_Enum):
    """What the driver must do after a transition."""

    NONE = "none"
    #: Cancel the handler (its scope, or the call scope for a unary one).
    CANCEL_HANDLER = "cancel handler"
    #: The peer is gone: cancel the call scope.
    CANCEL_CALL = "cancel call"


class Stop(_Enum):
    """Why the call scope was cancelled."""

    FORCED = "forced"  # the server's aclose() ran out of time
    BAD_INPUT = "bad input"  # bad input, for a handler without its own scope
    TIMED_OUT = "timed out"
    CANCELLED = "cancelled"  # the handler cancelled ctx.cancel_scope


class EndAction(_Enum):
    CLOSE = "close"  # nothing more to send or read
    DRAIN = "drain"  # read to the client's FIN (up to linger), then close
    REPLY = "reply"  # answer late (Ending.stop says with what), then close
    RESET = "reset"  # reset with Ending.code


@attrs.frozen
class Ending:
    """How a server call ends, decided when its call scope is over."""

    action: EndAction
    #: Why the call scope was cancelled; None if it was not (or it does not
    #: matter any more: the answer was complete, or the peer is gone).
    stop: Stop | None = None
    code: StreamCode | None = None


_S = Output
_E = ServerEvent
_A = Action

_OUTPUT: Final[Mapping[tuple[Output, ServerEvent], tuple[Output, Action]]] = {
    (_S.AWAITING_HEADER, _E.HEADER): (_S.RUNNING, _A.NONE),
    (_S.AWAITING_HEADER, _E.SEND): (_S.SENDING, _A.NONE),
    (_S.AWAITING_HEADER, _E.RESET): (_S.RESET, _A.NONE),
    (_S.AWAITING_HEADER, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    (_S.AWAITING_HEADER, _E.INPUT_END): (_S.AWAITING_HEADER, _A.NONE),
    (_S.RUNNING, _E.SEND): (_S.SENDING, _A.NONE),
    (_S.RUNNING, _E.FIN): (_S.CLOSED, _A.NONE),
    (_S.RUNNING, _E.ACCEPT_RAW): (_S.RAW, _A.NONE),
    (_S.RUNNING, _E.RESET): (_S.RESET, _A.NONE),
    (_S.RUNNING, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    (_S.RUNNING, _E.INPUT_END): (_S.RUNNING, _A.NONE),
    (_S.RUNNING, _E.INPUT_FAILED): (_S.RUNNING, _A.CANCEL_HANDLER),
    (_S.RUNNING, _E.INPUT_BROKE): (_S.GONE, _A.CANCEL_CALL),
    (_S.SENDING, _E.SENT): (_S.RUNNING, _A.NONE),
    (_S.SENDING, _E.SENT_LAST): (_S.CLOSED, _A.NONE),
    (_S.SENDING, _E.SEND_CUT): (_S.TORN, _A.NONE),
    (_S.SENDING, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    (_S.SENDING, _E.INPUT_END): (_S.SENDING, _A.NONE),
    (_S.SENDING, _E.INPUT_FAILED): (_S.SENDING_THEN_CANCEL, _A.NONE),
    (_S.SENDING, _E.INPUT_BROKE): (_S.GONE, _A.CANCEL_CALL),
    (_S.SENDING_THEN_CANCEL, _E.SENT): (_S.RUNNING, _A.CANCEL_HANDLER),
    (_S.SENDING_THEN_CANCEL, _E.SENT_LAST): (_S.CLOSED, _A.CANCEL_HANDLER),
    (_S.SENDING_THEN_CANCEL, _E.SEND_CUT): (_S.TORN, _A.NONE),
    (_S.SENDING_THEN_CANCEL, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    (_S.SENDING_THEN_CANCEL, _E.INPUT_BROKE): (_S.GONE, _A.CANCEL_CALL),
    (_S.RAW, _E.FIN): (_S.RAW_CLOSED, _A.NONE),
    (_S.RAW, _E.RESET): (_S.RESET, _A.NONE),
    (_S.RAW, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    (_S.RAW_CLOSED, _E.DRAIN): (_S.RAW_CLOSED, _A.NONE),
    (_S.RAW_CLOSED, _E.INPUT_END): (_S.RAW_CLOSED, _A.NONE),
    (_S.RAW_CLOSED, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    (_S.RAW_CLOSED, _E.RESET): (_S.RESET, _A.NONE),
    # Once the answer is complete, input trouble no longer matters.
    (_S.CLOSED, _E.DRAIN): (_S.CLOSED, _A.NONE),
    (_S.CLOSED, _E.DROP_INPUT): (_S.CLOSED, _A.NONE),
    (_S.CLOSED, _E.INPUT_END): (_S.CLOSED, _A.NONE),
    (_S.CLOSED, _E.INPUT_FAILED): (_S.CLOSED, _A.NONE),
    (_S.CLOSED, _E.INPUT_BROKE): (_S.CLOSED, _A.NONE),
    (_S.CLOSED, _E.PEER_GONE): (_S.GONE, _A.CANCEL_CALL),
    # The reader runs until the call task stops it.
    (_S.TORN, _E.INPUT_END): (_S.TORN, _A.NONE),
    (_S.TORN, _E.INPUT_FAILED): (_S.TORN, _A.NONE),
    (_S.TORN, _E.INPUT_BROKE): (_S.GONE, _A.CANCEL_CALL),
    (_S.TORN, _E.RESET): (_S.RESET, _A.NONE),
}

# Read once: an Enum member read off its class costs 0.2 us in CPython 3.11,
# and these are read on every call.
_GONE: Final = Output.GONE
_CLOSED: Final = Output.CLOSED
_OPEN: Final = Input.OPEN
_ENDED: Final = Input.ENDED
_DROPPED: Final = Input.DROPPED
_NO_ACTION: Final = Action.NONE
_CLOSE: Final = Ending(EndAction.CLOSE)
_DRAIN: Final = Ending(EndAction.DRAIN)

_I = Input
_INPUT: Final[Mapping[tuple[Input, ServerEvent], Input]] = {
    (_I.OPEN, _E.INPUT_END): _I.ENDED,
    (_I.OPEN, _E.INPUT_FAILED): _I.FAILED,
    (_I.OPEN, _E.INPUT_BROKE): _I.BROKEN,
    (_I.OPEN, _E.DRAIN): _I.DRAINING,
    (_I.OPEN, _E.DROP_INPUT): _I.DROPPED,
    (_I.DRAINING, _E.INPUT_END): _I.ENDED,
    (_I.DRAINING, _E.INPUT_FAILED): _I.FAILED,
    (_I.DRAINING, _E.INPUT_BROKE): _I.BROKEN,
}
#: The events that concern the input side (the others leave it alone).
_INPUT_EVENTS: Final = frozenset(event for _, event in _INPUT)

#: Output states in which nothing more is written (a send is not attempted).
_ANSWERED: Final = frozenset({_S.CLOSED, _S.RAW_CLOSED, _S.RESET})
#: Output states a late reply cannot be written in: it gets a reset instead.
_UNREPLYABLE: Final = frozenset({_S.AWAITING_HEADER, _S.RAW, _S.RAW_CLOSED, _S.TORN})


@attrs.define
class ServerCallState:
    """The state of one server call; the trio driver reports events to it."""

    output: Output = Output.AWAITING_HEADER
    input: Input = Input.OPEN
    #: Why the call scope was cancelled, if the driver said so (FORCED wins).
    stop: Stop | None = None

    def handle(self, event: ServerEvent) -> Action:
        """Apply ``event``; the action the driver owes it."""
        output = self.output
        if output is _GONE:
            return _NO_ACTION
        try:
            new, action = _OUTPUT[output, event]
        except KeyError:
            raise CallStateError(
                f"server call: {event.value!r} in output state {output.value!r}"
            ) from None
        if event in _INPUT_EVENTS and new is not _GONE:
            try:
                self.input = _INPUT[self.input, event]
            except KeyError:
                raise CallStateError(
                    f"server call: {event.value!r} in input state {self.input.value!r}"
                ) from None
        self.output = new
        return action

    def stop_call(self, stop: Stop) -> None:
        """Record why the driver cancels the call scope (first reason wins,
        except that a forced stop always does)."""
        if stop not in (Stop.FORCED, Stop.BAD_INPUT):
            raise CallStateError(f"server call: {stop.value!r} is not recorded")
        if self.stop is None or stop is Stop.FORCED:
            self.stop = stop

    @property
    def answered(self) -> bool:
        """The answer is complete (or reset): nothing more is written."""
        return self.output in _ANSWERED

    @property
    def graceful(self) -> bool:
        """FIN both ways, or ours and the rest of the input dropped as it
        comes: nothing left that a forceful close would abort."""
        return self.output is _CLOSED and (
            self.input is _ENDED or self.input is _DROPPED
        )

    def end(self, *, cancelled: bool, deadline_passed: bool) -> Ending:
        """How the call ends, once its call scope is over.

        ``cancelled``: the call scope caught a cancellation;
        ``deadline_passed``: its deadline is in the past.
        """
        output = self.output
        if output is _CLOSED:  # answered: the common end, decided first
            return _DRAIN if self.input is _OPEN else _CLOSE
        if output is Output.SENDING or output is Output.SENDING_THEN_CANCEL:
            # A write ends (whole, cut or broken) before its scope does.
            raise CallStateError("server call: ended with a message being sent")
        if output is Output.GONE or output is Output.RESET:
            return _CLOSE
        if cancelled:
            stop = self.stop or (Stop.TIMED_OUT if deadline_passed else Stop.CANCELLED)
            if stop is Stop.FORCED:
                return Ending(EndAction.RESET, stop, StreamCode.UNKNOWN)
            if stop is Stop.CANCELLED:
                return Ending(EndAction.RESET, stop, StreamCode.HANDLER_FAILED)
            if output in _UNREPLYABLE:
                return Ending(EndAction.RESET, stop, StreamCode.TIMED_OUT)
            return Ending(EndAction.REPLY, stop)
        if output is Output.TORN:
            return Ending(EndAction.RESET, None, StreamCode.OUTPUT_STREAM)
        return _CLOSE


# -- the client's call ---------------------------------------------------------
class Outgoing(_Enum):
    """The client's request side."""

    OPEN = "open"
    CLOSED = "closed"  # our FIN went (or is going)


class Incoming(_Enum):
    """The client's response side."""

    OPEN = "open"
    #: A unary call has its result and waits for the server's FIN.
    LINGERING = "lingering"
    ENDED = "ended"  # the server's FIN was read
    ERRORED = "errored"  # an error response: the call's answer
    RAW = "raw"  # a raw call's bytes belong to the caller now


class ClientEvent(_Enum):
    SEND_EOF = "send eof"  # our FIN goes (alone or with a last message)
    ERROR_RESPONSE = "error response"
    FIN_RECEIVED = "fin received"
    LINGER = "linger"
    RAW = "raw"


_CE = ClientEvent
_OUTGOING: Final[Mapping[tuple[Outgoing, ClientEvent], Outgoing]] = {
    (Outgoing.OPEN, _CE.SEND_EOF): Outgoing.CLOSED,
}
_IN = Incoming
_INCOMING: Final[Mapping[tuple[Incoming, ClientEvent], Incoming]] = {
    (_IN.OPEN, _CE.ERROR_RESPONSE): _IN.ERRORED,
    (_IN.OPEN, _CE.FIN_RECEIVED): _IN.ENDED,
    (_IN.OPEN, _CE.LINGER): _IN.LINGERING,
    (_IN.OPEN, _CE.RAW): _IN.RAW,
    (_IN.LINGERING, _CE.ERROR_RESPONSE): _IN.ERRORED,
    (_IN.LINGERING, _CE.FIN_RECEIVED): _IN.ENDED,
}
_ANSWERS: Final = frozenset({_IN.ENDED, _IN.ERRORED, _IN.RAW})
_IN_ENDED: Final = _IN.ENDED
_OUT_CLOSED: Final = Outgoing.CLOSED


class ClientEnd(_Enum):
    #: Send our FIN if it has not gone; close gracefully if the server's
    #: FIN was read (:attr:`ClientCallState.graceful`), else forcefully.
    FINISH = "finish"
    RESET = "reset"


_FINISH: Final = (ClientEnd.FINISH, None)


@attrs.define
class ClientCallState:
    """The state of one client call; the trio driver reports events to it."""

    outgoing: Outgoing = Outgoing.OPEN
    incoming: Incoming = Incoming.OPEN

    def handle(self, event: ClientEvent) -> None:
        try:
            if event is ClientEvent.SEND_EOF:
                self.outgoing = _OUTGOING[self.outgoing, event]
            else:
                self.incoming = _INCOMING[self.incoming, event]
        except KeyError:
            raise CallStateError(
                f"client call: {event.value!r} with request side "
                f"{self.outgoing.value!r}, response side {self.incoming.value!r}"
            ) from None

    @property
    def answered(self) -> bool:
        """The response side is over: receiving gives EOF."""
        return self.incoming in _ANSWERS

    @property
    def graceful(self) -> bool:
        return self.incoming is _IN_ENDED and self.outgoing is _OUT_CLOSED

    def end(
        self,
        *,
        cancelled: bool = False,
        error_code: int | None = None,
        lingered: bool = False,
        expired: bool = False,
        caller_expired: bool = False,
    ) -> tuple[ClientEnd, int | None]:
        """How the call ends: ``(FINISH, None)`` or ``(RESET, code)``.

        ``cancelled``: the call is left by a cancellation; ``error_code``:
        by an exception, with its stream code; ``lingered``: the call scope's
        deadline is the one set on the way into :attr:`Incoming.LINGERING`,
        and it passed (even if the FIN came after all);
        ``expired``: the call's or the caller's deadline passed
        (``caller_expired``: the caller's).
        """
        if not cancelled:
            if self.incoming in _ANSWERS:
                return _FINISH
            code = StreamCode.UNKNOWN if error_code is None else error_code
            return ClientEnd.RESET, int(code)
        if lingered and not caller_expired:
            # No FIN within linger: the result stands, the stream is dropped.
            return ClientEnd.RESET, int(StreamCode.UNKNOWN)
        if expired:
            return ClientEnd.RESET, int(StreamCode.TIMED_OUT)
        return ClientEnd.RESET, int(StreamCode.UNKNOWN)
