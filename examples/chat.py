"""Two nodes exchange messages over a duplex call, found by NodeId alone.

Run it: ``.venv/bin/python examples/chat.py``. Both nodes run in this one
trio program on loopback (state in a temporary directory): "bob" serves a
``chat`` method; "alice" joins the network through bob, connects to him by
his NodeId (found, dialled, punched or relayed as the network requires) and
talks to him with a typed client. docs/embedding.md walks through it.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from polykey.agent import NodeSettings, PolykeyNode, SeedNode
from polykey.rpc import CallContext, ClientManifest, DuplexCaller, DuplexHandler


class Chat(DuplexHandler[dict[str, str], dict[str, str]]):
    """Answers each line; ``ctx.transport["node_id"]`` is the caller,
    verified by its certificate."""

    async def handle(
        self, input: AsyncIterator[dict[str, str]], ctx: CallContext
    ) -> AsyncIterator[dict[str, str]]:
        caller = str(ctx.transport["node_id"])[:8]
        async for message in input:
            yield {"reply": f"bob to {caller}...: you said {message['text']!r}"}


class ChatAPI(ClientManifest):
    chat = DuplexCaller[dict[str, str], dict[str, str]]()


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bob_settings = NodeSettings(
            state_dir=Path(tmp) / "bob",
            host="127.0.0.1",
            port=0,
            handlers={"chat": Chat()},
        )
        async with PolykeyNode(bob_settings) as bob:
            seed = SeedNode(bob.node_id, *bob.address)
            alice_settings = NodeSettings(
                state_dir=Path(tmp) / "alice", host="127.0.0.1", port=0, seeds=(seed,)
            )
            async with PolykeyNode(alice_settings) as alice:
                with trio.fail_after(30):
                    await alice.wait_joined()
                    client = await alice.client(bob.node_id, ChatAPI)  # by NodeId alone
                    conn = alice.connections.get(bob.node_id)
                    assert conn is not None
                    print(f"alice reached bob: {conn.path.value} at {conn.address}")
                    async with client.methods.chat() as call:
                        for text in ("hello", "how are you?"):
                            await call.send({"text": text})
                            print((await call.receive())["reply"])


if __name__ == "__main__":
    trio.run(main)
