"""The pure pieces of a QUIC connection and stream, without sockets: stream
id bookkeeping, the timer's deadlines, close reasons, the stream's conflict
detector and error translation, and peer addresses per socket family.
tests/quic/test_loopback.py and test_socket.py run the same code over real
connections."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from polykey.quic import (
    CloseKind,
    CloseReason,
    QUICConnectionError,
    QuicheError,
    QUICStream,
    QUICStreamError,
    StreamReset,
    StreamStopped,
    unmap_ipv4,
)
from polykey.quic._address import for_family
from polykey.quic._state import Deadlines, Due, StreamIds, close_reason
from polykey.quic._stream import _SendConflict

# -- stream ids ------------------------------------------------------------------


@pytest.mark.parametrize("is_server", [False, True])
def test_local_ids_count_up_by_four_per_kind(is_server: bool) -> None:
    ids = StreamIds(is_server=is_server)
    low = int(is_server)
    got = [ids.open_local(unidirectional=uni) for uni in (False, True, False, True)]
    assert got == [low, low | 2, low + 4, (low | 2) + 4]


@settings(max_examples=300, deadline=None)
@given(
    is_server=st.booleans(),
    readable=st.lists(st.integers(min_value=0, max_value=120), max_size=60),
)
def test_a_peer_stream_is_new_exactly_once(
    is_server: bool, readable: list[int]
) -> None:
    # The model: a peer id is new the first time it is readable; our own
    # ids (not open any more when they reach accept_peer) never are.
    ids = StreamIds(is_server=is_server)
    seen: set[int] = set()
    for sid in readable:
        theirs = (sid & 1) != is_server
        expected = theirs and sid not in seen
        assert ids.accept_peer(sid) is expected, (sid, sorted(seen))
        if theirs:
            seen.add(sid)


def test_implicitly_opened_lower_ids_arrive_later() -> None:
    ids = StreamIds(is_server=True)
    assert ids.accept_peer(8)  # opens 0 and 4 implicitly (RFC 9000 2.1)
    assert ids.accept_peer(4)
    assert ids.accept_peer(0)
    assert not ids.accept_peer(4)
    assert ids.accept_peer(2)  # unidirectional ids are counted apart
    assert not ids.accept_peer(1)  # ours


# -- the timer -------------------------------------------------------------------


def test_quiche_timeout_arms_the_timer() -> None:
    d = Deadlines()
    assert d.rearm(10.0, 0.5, None)
    assert d.armed == 10.5
    assert d.due(10.4) == Due()
    assert d.due(10.5) == Due(quiche=True)


def test_a_later_deadline_waits_for_the_armed_one_an_earlier_moves_it() -> None:
    d = Deadlines()
    d.rearm(10.0, 1.0, None)
    assert not d.rearm(10.1, 5.0, None)  # later: the driver re-arms at 11.0
    assert d.armed == 11.0
    assert d.due(11.0) == Due()  # woke early, nothing due
    assert d.rearm(11.0, 4.1, None)  # armed passed: moves to the real one
    assert d.armed == 15.1
    assert d.rearm(11.5, 0.1, None)  # earlier: moves at once
    assert d.armed == 11.6


def test_keep_alive_is_scheduled_once_and_consumed_when_due() -> None:
    d = Deadlines()
    d.rearm(0.0, None, 2.0)
    assert d.armed == 2.0
    d.rearm(1.0, None, 2.0)  # one pending: not pushed back
    assert d.keep_alive == 2.0
    assert d.due(2.0) == Due(keep_alive=True)
    assert d.keep_alive == math.inf
    d.rearm(2.0, 0.0, 2.0)
    assert d.due(2.0) == Due(quiche=True)  # the next keep-alive is at 4.0
    assert d.keep_alive == 4.0


def test_no_keep_alive_without_an_interval() -> None:
    d = Deadlines()
    d.rearm(0.0, None, None)
    d.rearm(0.0, None, 0.0)
    assert d.armed == math.inf
    assert d.due(1e9) == Due()


def test_the_handshake_deadline_is_all_that_is_due_once_past() -> None:
    d = Deadlines()
    d.handshake = 3.0
    d.rearm(0.0, 5.0, 1.0)
    assert d.armed == 1.0
    assert d.due(6.0) == Due(handshake=True)
    assert d.keep_alive == 1.0  # not consumed: the connection closes


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=2),  # time passing
            st.none() | st.floats(min_value=0, max_value=3),  # quiche's timeout
            st.none() | st.floats(min_value=0.01, max_value=3),  # keep-alive
        ),
        min_size=1,
        max_size=30,
    ),
    handshake=st.none() | st.floats(min_value=0, max_value=10),
)
def test_the_timer_never_wakes_late_nor_spins(
    steps: list[tuple[float, float | None, float | None]], handshake: float | None
) -> None:
    d = Deadlines()
    if handshake is not None:
        d.handshake = handshake
    now = 0.0
    for passed, timeout, keep_alive in steps:
        now += passed
        d.due(now)
        d.rearm(now, timeout, keep_alive)
        earliest = min(d.quiche, d.keep_alive, d.handshake)
        # Late: the driver would sleep past what is due.
        assert d.armed <= earliest
        # Spinning: armed in the past while nothing is due.
        assert d.armed > now or earliest <= now


# -- close reasons ------------------------------------------------------------------


@attrs.frozen
class _Close:
    is_app: bool
    error_code: int
    reason: bytes


@pytest.mark.parametrize(
    ("verified", "timed_out", "peer", "local", "expected"),
    [
        (True, True, None, None, CloseReason(CloseKind.IDLE_TIMEOUT)),
        (False, True, None, None, CloseReason(CloseKind.HANDSHAKE)),
        (
            True,
            False,
            _Close(False, 0xA, b"x"),
            _Close(True, 1, b""),
            CloseReason(CloseKind.PEER, False, 0xA, b"x"),
        ),
        (
            False,
            False,
            _Close(True, 7, b"bye"),
            None,
            CloseReason(CloseKind.PEER, True, 7, b"bye"),
        ),
        (
            False,
            False,
            _Close(False, 0x12A, b"bad cert"),
            None,
            CloseReason(CloseKind.HANDSHAKE, False, 0x12A, b"bad cert"),
        ),
        (
            True,
            False,
            None,
            _Close(False, 0x3, b""),
            CloseReason(CloseKind.PROTOCOL, False, 0x3, b""),
        ),
        (
            False,
            False,
            None,
            _Close(False, 0x3, b""),
            CloseReason(CloseKind.HANDSHAKE, False, 0x3, b""),
        ),
        (True, False, None, None, CloseReason(CloseKind.PROTOCOL)),
    ],
)
def test_close_reason(
    verified: bool,
    timed_out: bool,
    peer: _Close | None,
    local: _Close | None,
    expected: CloseReason,
) -> None:
    got = close_reason(verified=verified, timed_out=timed_out, peer=peer, local=local)
    assert got == expected


# -- a stream's conflict detector and error translation ----------------------------


def test_conflict_detector_refuses_a_second_user_until_the_first_leaves() -> None:
    detector = _SendConflict()
    busy = pytest.raises(trio.BusyResourceError, match="another task is sending")
    with detector, busy, detector:
        pass  # pragma: no cover - never entered
    with pytest.raises(ValueError, match="inside"), detector:
        raise ValueError("inside")  # an error leaves it too
    with detector:
        pass


def test_each_stream_direction_has_its_own_detector() -> None:
    stream = _stream(_Conn())
    with stream._send_conflict, stream._receive_conflict:
        other = _stream(_Conn())
        with other._send_conflict:
            pass


@attrs.define
class _Conn:
    """What a stream's error translation and checks ask of a connection."""

    closed: bool = False
    quiche: Any = None

    def raise_if_dead(self) -> None:
        if self.closed:
            raise self.closed_error()

    def closed_error(self) -> QUICConnectionError:
        return QUICConnectionError(CloseReason(CloseKind.PEER, True, 9, b""))


def _stream(conn: _Conn) -> QUICStream:
    return QUICStream(conn, 4, can_read=True, can_write=True)  # type: ignore[arg-type]


async def test_a_reset_fails_the_read_side_for_good() -> None:
    stream = _stream(_Conn())
    error = stream._translate(StreamReset(4, 21))
    assert isinstance(error, QUICStreamError)
    assert (error.code, error.reset) == (21, True)
    with trio.fail_after(1), pytest.raises(QUICStreamError) as again:
        await stream.receive_some()
    assert again.value is error


async def test_a_stop_sending_fails_the_write_side_for_good() -> None:
    stream = _stream(_Conn())
    error = stream._translate(StreamStopped(4, 22))
    assert isinstance(error, QUICStreamError)
    assert (error.code, error.reset) == (22, False)
    with trio.fail_after(1), pytest.raises(QUICStreamError) as again:
        await stream.send_all(b"x")
    assert again.value is error


def test_other_quiche_errors_mean_the_stream_or_the_connection_is_gone() -> None:
    conn = _Conn()
    stream = _stream(conn)
    error = stream._translate(QuicheError(-7, "stream_recv(4)"))
    assert type(error) is trio.BrokenResourceError
    assert str(error).startswith("stream 4: ")
    conn.closed = True
    assert isinstance(
        stream._translate(QuicheError(-7, "stream_recv(4)")), QUICConnectionError
    )


# -- addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "plain"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:a00:1", "::ffff:a00:1"),  # mapped, but not written as IPv4
        ("2001:db8::1", "2001:db8::1"),
        ("::1", "::1"),
    ],
)
def test_unmap_ipv4(host: str, plain: str) -> None:
    assert unmap_ipv4(host) == plain


@pytest.mark.parametrize(
    ("address", "ipv6", "expected"),
    [
        (("10.0.0.1", 5), True, ("::ffff:10.0.0.1", 5, 0, 0)),
        (("2001:db8::1", 5), True, ("2001:db8::1", 5, 0, 0)),
        (("fe80::1", 5, 0, 3), True, ("fe80::1", 5, 0, 3)),  # scope id kept
        (("10.0.0.1", 5), False, ("10.0.0.1", 5)),
        (("::ffff:10.0.0.1", 5, 0, 0), False, ("10.0.0.1", 5)),
    ],
)
def test_addresses_for_a_socket_family(
    address: tuple[object, ...], ipv6: bool, expected: tuple[object, ...]
) -> None:
    assert for_family(address, ipv6=ipv6) == expected


def test_an_ipv4_socket_refuses_ipv6_peers() -> None:
    with pytest.raises(OSError, match="IPv6 address 2001:db8::1 on an IPv4 socket"):
        for_family(("2001:db8::1", 5), ipv6=False)
