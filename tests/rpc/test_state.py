"""The call state machines without trio (polykey/rpc/_state.py), and the
fast paths of the hot path against the slow ones they stand in for."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from polykey.rpc import (
    ErrorResponse,
    Middleware,
    Response,
    RPCClient,
    StreamCode,
    memory_stream_pair,
    parse_response,
)
from polykey.rpc._codec import encode_json
from polykey.rpc._messages import NOT_PLAIN, plain_result, result_wire
from polykey.rpc._state import (
    Action,
    CallStateError,
    ClientCallState,
    ClientEnd,
    ClientEvent,
    EndAction,
    Incoming,
    Input,
    Outgoing,
    Output,
    ServerCallState,
    ServerEvent,
    Stop,
)

E = ServerEvent


def server(*events: ServerEvent) -> ServerCallState:
    state = ServerCallState()
    for event in events:
        state.handle(event)
    return state


# -- the server's call: paths a real call takes ------------------------------------
def test_unary_call_ends_gracefully() -> None:
    state = server(E.HEADER, E.SEND, E.SENT_LAST)
    assert state.answered
    assert not state.graceful
    assert state.end(cancelled=False, deadline_passed=False).action is EndAction.DRAIN
    state.handle(E.DRAIN)
    assert state.input is Input.DRAINING
    state.handle(E.INPUT_END)
    assert state.graceful
    assert state.end(cancelled=False, deadline_passed=False) == (
        server(E.HEADER, E.SEND, E.SENT_LAST, E.INPUT_END).end(
            cancelled=False, deadline_passed=False
        )
    )


def test_a_unary_call_can_leave_its_input_to_the_stream() -> None:
    # Over QUIC the stream drops the rest of the input (close_dropping_input):
    # graceful at once, and nothing more is read or answered.
    state = server(E.HEADER, E.SEND, E.SENT_LAST, E.DROP_INPUT)
    assert state.input is Input.DROPPED
    assert state.graceful
    assert state.end(cancelled=False, deadline_passed=False).action is EndAction.CLOSE
    assert state.end(cancelled=True, deadline_passed=True).action is EndAction.CLOSE
    with pytest.raises(CallStateError):  # only once the answer is out
        server(E.HEADER).handle(E.DROP_INPUT)
    with pytest.raises(CallStateError):  # and only instead of a drain
        server(E.HEADER, E.FIN, E.DRAIN).handle(E.DROP_INPUT)


def test_bad_input_waits_for_the_message_being_sent() -> None:
    state = server(E.HEADER, E.SEND)
    assert state.handle(E.INPUT_FAILED) is Action.NONE
    assert state.output is Output.SENDING_THEN_CANCEL
    assert state.handle(E.SENT) is Action.CANCEL_HANDLER
    assert (state.output, state.input) == (Output.RUNNING, Input.FAILED)
    # Between messages it cancels at once.
    assert server(E.HEADER).handle(E.INPUT_FAILED) is Action.CANCEL_HANDLER
    # Once the answer is complete it is ignored.
    assert server(E.HEADER, E.FIN).handle(E.INPUT_FAILED) is Action.NONE


def test_the_peer_going_cancels_the_call_once() -> None:
    state = server(E.HEADER, E.SEND)
    assert state.handle(E.INPUT_BROKE) is Action.CANCEL_CALL
    # Our own tasks still report what they were doing: absorbed.
    for event in ServerEvent:
        assert state.handle(event) is Action.NONE
    assert state.output is Output.GONE
    assert state.end(cancelled=True, deadline_passed=True).action is EndAction.CLOSE


@pytest.mark.parametrize(
    ("events", "stop", "cancelled", "passed", "expected"),
    [
        # The deadline before the header: reset 7, no reply.
        ((), None, True, True, (EndAction.RESET, Stop.TIMED_OUT, StreamCode.TIMED_OUT)),
        # After it: the late ErrorRPCTimedOut reply.
        ((E.HEADER,), None, True, True, (EndAction.REPLY, Stop.TIMED_OUT, None)),
        (
            (E.HEADER, E.SEND, E.SENT),
            None,
            True,
            True,
            (EndAction.REPLY, Stop.TIMED_OUT, None),
        ),
        # A raw call streaming bytes, or a message cut in half: reset 7.
        (
            (E.HEADER, E.SEND, E.SENT, E.ACCEPT_RAW),
            None,
            True,
            True,
            (EndAction.RESET, Stop.TIMED_OUT, StreamCode.TIMED_OUT),
        ),
        (
            (E.HEADER, E.SEND, E.SEND_CUT),
            None,
            True,
            True,
            (EndAction.RESET, Stop.TIMED_OUT, StreamCode.TIMED_OUT),
        ),
        # Forced stop: 0, whatever else happened.
        (
            (E.HEADER,),
            Stop.FORCED,
            True,
            True,
            (EndAction.RESET, Stop.FORCED, StreamCode.UNKNOWN),
        ),
        (
            (E.HEADER, E.SEND, E.SEND_CUT),
            Stop.FORCED,
            True,
            False,
            (EndAction.RESET, Stop.FORCED, StreamCode.UNKNOWN),
        ),
        # Bad input that cancelled a unary handler: answered late.
        (
            (E.HEADER,),
            Stop.BAD_INPUT,
            True,
            True,
            (EndAction.REPLY, Stop.BAD_INPUT, None),
        ),
        # The handler cancelled ctx.cancel_scope: reset 1.
        (
            (E.HEADER,),
            None,
            True,
            False,
            (EndAction.RESET, Stop.CANCELLED, StreamCode.HANDLER_FAILED),
        ),
        # A cut message without the call scope cancelled: reset 4.
        (
            (E.HEADER, E.SEND, E.SEND_CUT),
            None,
            False,
            False,
            (EndAction.RESET, None, StreamCode.OUTPUT_STREAM),
        ),
        # Answered: a deadline passing while we linger changes nothing.
        ((E.HEADER, E.FIN), None, True, True, (EndAction.DRAIN, None, None)),
        ((E.HEADER, E.FIN, E.DRAIN), None, True, True, (EndAction.CLOSE, None, None)),
        # Our own reset, or FIN before any header: nothing more.
        ((E.RESET,), None, True, True, (EndAction.CLOSE, None, None)),
        ((E.INPUT_END,), None, False, False, (EndAction.CLOSE, None, None)),
    ],
)
def test_how_a_server_call_ends(
    events: tuple[ServerEvent, ...],
    stop: Stop | None,
    cancelled: bool,
    passed: bool,
    expected: tuple[EndAction, Stop | None, StreamCode | None],
) -> None:
    state = server(*events)
    if stop is not None:
        state.stop_call(stop)
    if state.output in (Output.SENDING, Output.SENDING_THEN_CANCEL):
        with pytest.raises(CallStateError):
            state.end(cancelled=cancelled, deadline_passed=passed)
        return
    ending = state.end(cancelled=cancelled, deadline_passed=passed)
    assert (ending.action, ending.stop, ending.code) == expected


def test_forced_stop_wins_over_bad_input() -> None:
    first = server(E.HEADER)
    first.stop_call(Stop.BAD_INPUT)
    first.stop_call(Stop.FORCED)
    second = server(E.HEADER)
    second.stop_call(Stop.FORCED)
    second.stop_call(Stop.BAD_INPUT)
    assert first.stop is second.stop is Stop.FORCED
    with pytest.raises(CallStateError):
        first.stop_call(Stop.TIMED_OUT)  # derived at the end, never recorded


def test_illegal_events_raise_and_change_nothing() -> None:
    for events, bad in [
        ((), E.SENT),  # nothing was being sent
        ((E.HEADER,), E.HEADER),
        ((E.HEADER, E.FIN), E.SEND),  # after our FIN
        ((E.RESET,), E.FIN),
        ((E.HEADER, E.INPUT_END), E.INPUT_END),  # input side: twice
        ((E.HEADER, E.SEND, E.SEND_CUT), E.SEND),
    ]:
        state = server(*events)
        before = (state.output, state.input)
        with pytest.raises(CallStateError):
            state.handle(bad)
        assert (state.output, state.input) == before


# -- the server's call: any order of events ------------------------------------------
_TERMINAL_OUTPUT = {Output.RESET}


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(list(ServerEvent)), max_size=30))
def test_server_state_over_any_event_order(events: list[ServerEvent]) -> None:
    state = ServerCallState()
    handler_cancels = 0
    for event in events:
        before = (state.output, state.input)
        try:
            action = state.handle(event)
        except CallStateError:
            # Rejected events change nothing; GONE rejects none.
            assert (state.output, state.input) == before
            assert before[0] is not Output.GONE
            continue
        assert before[0] not in _TERMINAL_OUTPUT
        # The call scope is cancelled exactly on the way into GONE.
        entered_gone = before[0] is not Output.GONE and state.output is Output.GONE
        assert (action is Action.CANCEL_CALL) == entered_gone
        if action is Action.CANCEL_HANDLER:
            handler_cancels += 1
            # Never in the middle of a message, and only for bad input.
            assert state.output not in (Output.SENDING, Output.SENDING_THEN_CANCEL)
            assert state.input is Input.FAILED
        if before[0] is Output.GONE:
            assert state.output is Output.GONE
        if state.graceful:
            assert state.output is Output.CLOSED
            assert state.input in (Input.ENDED, Input.DROPPED)
        for cancelled in (False, True):
            for passed in (False, True):
                _check_ending(state, cancelled, passed)
    assert handler_cancels <= 1


def _check_ending(state: ServerCallState, cancelled: bool, passed: bool) -> None:
    if state.output in (Output.SENDING, Output.SENDING_THEN_CANCEL):
        with pytest.raises(CallStateError):
            state.end(cancelled=cancelled, deadline_passed=passed)
        return
    ending = state.end(cancelled=cancelled, deadline_passed=passed)
    assert (ending.action is EndAction.RESET) == (ending.code is not None)
    if ending.action is EndAction.REPLY:
        # A late reply goes only where a whole message can still be written.
        assert state.output in (Output.RUNNING,)
        assert ending.stop in (Stop.TIMED_OUT, Stop.BAD_INPUT)
    if ending.action is EndAction.DRAIN:
        assert (state.output, state.input) == (Output.CLOSED, Input.OPEN)
    if state.output is Output.CLOSED:
        # A complete answer is never reset nor answered again.
        assert ending.action in (EndAction.DRAIN, EndAction.CLOSE)
    if state.output in (Output.GONE, Output.RESET):
        assert ending.action is EndAction.CLOSE
    if not cancelled and state.output is not Output.TORN:
        assert ending.action in (EndAction.DRAIN, EndAction.CLOSE)


# -- the client's call ---------------------------------------------------------------
C = ClientEvent


def client(*events: ClientEvent) -> ClientCallState:
    state = ClientCallState()
    for event in events:
        state.handle(event)
    return state


@pytest.mark.parametrize(
    ("events", "kwargs", "expected"),
    [
        # Left normally: finished if answered, else reset 0.
        ((C.FIN_RECEIVED,), {}, (ClientEnd.FINISH, None)),
        ((C.ERROR_RESPONSE,), {}, (ClientEnd.FINISH, None)),
        ((C.RAW,), {}, (ClientEnd.FINISH, None)),
        ((), {}, (ClientEnd.RESET, StreamCode.UNKNOWN)),
        # Left by an exception: its own code unless answered.
        ((), {"error_code": 5}, (ClientEnd.RESET, 5)),
        ((C.FIN_RECEIVED,), {"error_code": 5}, (ClientEnd.FINISH, None)),
        # Cancelled: 7 for a deadline, else 0, even when answered.
        ((C.FIN_RECEIVED,), {"cancelled": True}, (ClientEnd.RESET, 0)),
        ((), {"cancelled": True, "expired": True}, (ClientEnd.RESET, 7)),
        # A unary call whose linger ran out keeps its result: reset 0 ...
        (
            (C.LINGER,),
            {"cancelled": True, "expired": True, "lingered": True},
            (ClientEnd.RESET, 0),
        ),
        # ... unless the caller's own deadline passed too.
        (
            (C.LINGER,),
            {
                "cancelled": True,
                "expired": True,
                "lingered": True,
                "caller_expired": True,
            },
            (ClientEnd.RESET, 7),
        ),
    ],
)
def test_how_a_client_call_ends(
    events: tuple[ClientEvent, ...], kwargs: dict[str, Any], expected: Any
) -> None:
    assert client(*events).end(**kwargs) == expected


def test_client_illegal_events() -> None:
    for events, bad in [
        ((C.SEND_EOF,), C.SEND_EOF),
        ((C.FIN_RECEIVED,), C.FIN_RECEIVED),
        ((C.ERROR_RESPONSE,), C.LINGER),
        ((C.RAW,), C.FIN_RECEIVED),
    ]:
        state = client(*events)
        before = (state.outgoing, state.incoming)
        with pytest.raises(CallStateError):
            state.handle(bad)
        assert (state.outgoing, state.incoming) == before


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(ClientEvent)), max_size=12))
def test_client_state_over_any_event_order(events: list[ClientEvent]) -> None:
    state = ClientCallState()
    for event in events:
        answered = state.answered
        try:
            state.handle(event)
        except CallStateError:
            continue
        assert state.answered or not answered  # an answer stays
        if state.graceful:
            assert state.incoming is Incoming.ENDED
            assert state.outgoing is Outgoing.CLOSED
        how, code = state.end()
        assert (how is ClientEnd.FINISH) == state.answered
        assert (code is None) == (how is ClientEnd.FINISH)
        assert state.end(cancelled=True)[0] is ClientEnd.RESET


# -- fast paths against slow paths -----------------------------------------------------
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(["jsonrpc", "result", "error", "id", "x"])
_response_like = st.dictionaries(_keys, _json, max_size=4) | st.builds(
    lambda result, id: {"jsonrpc": "2.0", "result": result, "id": id},
    _json,
    _scalars,
)


@settings(max_examples=500, deadline=None)
@given(_response_like | _json)
def test_plain_result_agrees_with_parse_response(value: Any) -> None:
    fast = plain_result(value)
    if fast is NOT_PLAIN:
        return  # parse_response decides on its own
    slow = parse_response(value)
    assert isinstance(slow, Response)
    assert slow.result is fast


@settings(max_examples=200, deadline=None)
@given(_json, _scalars.filter(lambda v: not isinstance(v, bool)))
def test_result_wire_is_the_responses_wire_form(result: Any, id: Any) -> None:
    assert result_wire(result, id) == Response(result, id).to_wire()
    assert parse_response(result_wire(result, id)) == Response(result, id)


class _Identity(Middleware):
    """Sees every response, so the client takes the slow path."""

    async def reverse(
        self, message: Response | ErrorResponse
    ) -> Response | ErrorResponse:
        return message


async def _receive_all(values: list[Any], slow: bool) -> list[Any]:
    """What a server-streaming caller gets from a server sending ``values``:
    the results, then the error's type and message or ``"end"``."""

    async def serve(end: trio.abc.HalfCloseableStream) -> None:
        await end.receive_some()  # the request
        try:
            for value in values:
                await end.send_all(encode_json(value))
            await end.send_eof()
        except trio.BrokenResourceError:
            pass  # the client stopped at an error response

    async with trio.open_nursery() as nursery:

        async def factory() -> trio.abc.HalfCloseableStream:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(serve, theirs)
            return ours

        middleware = [_Identity] if slow else []
        rpc: RPCClient[None] = RPCClient(None, factory, middleware=middleware, linger=0)
        out: list[Any] = []
        try:
            async with rpc.server_stream("m", {}) as results:
                async for result in results:
                    out.append(result)
            out.append("end")
        except Exception as exc:  # the outcome to compare, whatever it is
            out.append((type(exc).__name__, str(exc)))
        return out


@settings(max_examples=100, deadline=None)
@given(st.lists(_response_like, max_size=4))
def test_client_fast_and_slow_paths_receive_the_same(values: list[Any]) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        with trio.fail_after(10):
            return await _receive_all(values, False), await _receive_all(values, True)

    fast, slow = trio.run(both)
    assert fast == slow
