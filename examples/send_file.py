"""Send a file over a raw stream: a JSON header, then bytes, then a digest.

Run it: ``.venv/bin/python examples/send_file.py [FILE]`` (a few MiB of
random bytes without one). The receiving node serves a raw ``upload``
method: it accepts with a leading JSON reply, reads the bytes to their end,
writes the file, and answers with the SHA-256 it computed; the sender checks
it against its own.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import trio

from polykey.agent import NodeSettings, PolykeyNode
from polykey.rpc import CallContext, RawCall, RawHandler


class Upload(RawHandler):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        name = Path(str(call.params.get("name", "upload"))).name  # no paths from peers
        stream = await call.accept({"ready": True})
        digest = hashlib.sha256()
        data = bytearray()
        while chunk := await stream.receive_some():
            digest.update(chunk)
            data += chunk
        await trio.Path(self.directory / name).write_bytes(bytes(data))
        await stream.send_all(digest.hexdigest().encode())
        await stream.send_eof()


async def main(source: Path | None) -> None:
    body = await trio.Path(source).read_bytes() if source else os.urandom(4 << 20)
    name = source.name if source else "random.bin"
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "inbox"
        await trio.Path(inbox).mkdir()
        receiver_settings = NodeSettings(
            state_dir=Path(tmp) / "receiver",
            host="127.0.0.1",
            port=0,
            handlers={"upload": Upload(inbox)},
        )
        async with PolykeyNode(receiver_settings) as receiver:
            sender_settings = NodeSettings(
                state_dir=Path(tmp) / "sender", host="127.0.0.1", port=0
            )
            async with PolykeyNode(sender_settings) as sender:
                with trio.fail_after(60):
                    conn = await sender.connect(receiver.node_id, receiver.address)
                    async with conn.rpc.raw("upload", {"name": name}) as call:
                        assert call.header == {"ready": True}
                        await call.stream.send_all(body)
                        await call.stream.send_eof()
                        answer = b""
                        while chunk := await call.stream.receive_some():
                            answer += chunk
            ours = hashlib.sha256(body).hexdigest()
            assert answer.decode() == ours, "the digests differ"
            assert await trio.Path(inbox / name).read_bytes() == body
            print(f"sent {len(body):,} bytes as {name}; sha256 {ours[:16]}... checked")


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]) if len(sys.argv) > 1 else None)
