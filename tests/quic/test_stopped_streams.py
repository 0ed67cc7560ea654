"""Streams the peer stops (STOP_SENDING) after we are done with them.

quiche keeps such a stream until the application touches it again (to hand
it the StreamStopped error); a stream of the peer's that quiche keeps is
one of the peer's stream credits that never comes back. An RPC client that
gives up reading after an error response stops the stream exactly so, and
after ``initial_max_streams_bidi`` of those it could open no stream at all
(the garbage-signalling fuzz: calls unanswered for 15 s, then the connection
closed as idle).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from polykey.quic import QUICConfig, QUICConnection, QUICStream

from .helpers import open_pair

LIMIT = 10


async def _stopped_after_reply(
    client_conn: QUICConnection, server_conn: QUICConnection
) -> None:
    """One exchange: request and FIN; the reply, without FIN; the server
    closes its side, and the client, having read the reply, stops reading
    (STOP_SENDING) before the server's FIN is acknowledged."""
    cs = await client_conn.open_stream()
    await cs.send_all_and_eof(b"request")
    ss: QUICStream = await server_conn.accept_stream()
    while await ss.receive_some():
        pass
    await ss.send_all(b"error response")
    assert await cs.receive_some() == b"error response"
    stopped = server_conn.quiche.stats().stopped_stream_count_remote
    # No checkpoint between the two: the server's FIN goes out, and the
    # client's STOP_SENDING follows before any ACK of it could.
    ss.close()  # done with it: never touched again
    cs.close(forceful=True)
    stats = server_conn.quiche.stats
    while stats().stopped_stream_count_remote == stopped:  # noqa: ASYNC110
        await trio.sleep(0.001)


async def _answered_dropping(
    client_conn: QUICConnection, server_conn: QUICConnection, *, early_fin: bool
) -> None:
    """One exchange where the server answers and closes dropping the rest of
    the input: the client sends more and its FIN after the answer, or
    (``early_fin``) before the server closes, so that they wait in quiche."""
    cs = await client_conn.open_stream()
    await cs.send_all(b"request")
    ss: QUICStream = await server_conn.accept_stream()
    assert await ss.receive_some() == b"request"
    if early_fin:
        await cs.send_all_and_eof(b"more")
        while not server_conn.quiche.stream_readable(ss.stream_id):  # noqa: ASYNC110
            await trio.sleep(0.001)
    await ss.send_all_and_eof(b"answer")
    ss.close_dropping_input()
    assert await cs.receive_some() == b"answer"
    assert await cs.receive_some() == b""
    if not early_fin:
        # No STOP_SENDING came: both go, and the server drops them.
        await cs.send_all_and_eof(b"more")
    await cs.aclose()


async def _answered_dropping_after_the_fin(
    client_conn: QUICConnection, server_conn: QUICConnection
) -> None:
    await _answered_dropping(client_conn, server_conn, early_fin=True)


async def _answered_dropping_before_the_fin(
    client_conn: QUICConnection, server_conn: QUICConnection
) -> None:
    await _answered_dropping(client_conn, server_conn, early_fin=False)


@pytest.mark.parametrize(
    "exchange",
    [
        _stopped_after_reply,
        # The server never reads the client's FIN itself: the connection
        # drops it as it comes (or at the close, if it is there already).
        _answered_dropping_before_the_fin,
        _answered_dropping_after_the_fin,
    ],
)
async def test_streams_we_are_done_with_give_their_credit_back(
    exchange: Callable[[QUICConnection, QUICConnection], Awaitable[None]],
) -> None:
    config = QUICConfig(initial_max_streams_bidi=LIMIT)
    async with open_pair(config) as pair:
        client_conn, server_conn = await pair.connect()
        with trio.fail_after(10):
            # Four times the limit: each stream must come back to the client.
            for _ in range(4 * LIMIT):
                await exchange(client_conn, server_conn)
            while server_conn.statistics().streams_closing:  # noqa: ASYNC110
                await trio.sleep(0.001)
        # Never a STOP_SENDING of ours (dropping asks the peer nothing).
        assert server_conn.quiche.stats().stopped_stream_count_local == 0
        assert client_conn.quiche.peer_streams_left_bidi() > 0
