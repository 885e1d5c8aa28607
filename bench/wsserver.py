"""A minimal Tardis-Machine-protocol WebSocket server that blasts pre-encoded frames.

Run as its own process (`python -m bench.wsserver KIND N [--rate R]`), so the client under test
has the other core, as in production. It accepts the replay and stream routes with any options,
sends the workload's N messages as text frames, then closes with 1000 (end of a replay). Frames
are built once, WebSocket header included, and written in large chunks: sending costs the server
a memcpy, not a Python call per message. With `--rate` it paces the messages (latency runs).

It prints `READY <port>` when it listens and `SENT <json>` per connection: messages, bytes,
seconds, and `started_ns`, the wall-clock time of its first byte.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct
import sys
import time
from collections.abc import Iterator

from bench.workload import KINDS, Kind, Workload

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CHUNK_BYTES = 256 * 1024
PREENCODE_LIMIT = 2_000_000  # above this many messages, frames are built while sending


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """Return one unmasked, final server frame."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 65_536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def chunks(frames: Iterator[bytes], chunk_bytes: int = _CHUNK_BYTES) -> Iterator[tuple[bytes, int]]:
    """Yield (bytes of consecutive frames, how many) of about `chunk_bytes`."""
    parts: list[bytes] = []
    size = 0
    for payload in frames:
        frame = ws_frame(payload)
        parts.append(frame)
        size += len(frame)
        if size >= chunk_bytes:
            yield b"".join(parts), len(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts), len(parts)


class BlastServer:
    """Serve one workload to every connection: as fast as read, or at `rate` messages/s."""

    def __init__(self, kind: Kind, messages: int, rate: float | None = None) -> None:
        self.workload = Workload(kind, messages)
        self.rate = rate
        self._encoded: list[tuple[bytes, int]] | None = None
        if rate is None and messages <= PREENCODE_LIMIT:
            self._encoded = list(chunks(self.workload.frames()))

    def _stream(self) -> Iterator[tuple[bytes, int]]:
        if self._encoded is not None:
            return iter(self._encoded)
        chunk_bytes = 1 if self.rate else _CHUNK_BYTES  # paced: one frame at a time
        return chunks(self.workload.frames(), chunk_bytes)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not await _handshake(reader, writer):
                return
            drain = asyncio.create_task(_discard(reader))
            started = time.perf_counter()
            started_ns = time.time_ns()
            sent = sent_bytes = 0
            if self.rate:
                sent, sent_bytes = await self._send_paced(writer)
            else:
                for chunk, count in self._stream():
                    writer.write(chunk)
                    await writer.drain()
                    sent += count
                    sent_bytes += len(chunk)
            writer.write(ws_frame(struct.pack("!H", 1000), opcode=0x8))
            await writer.drain()
            seconds = time.perf_counter() - started
            report = {
                "messages": sent,
                "bytes": sent_bytes,
                "seconds": seconds,
                "started_ns": started_ns,
            }
            print("SENT " + json.dumps(report), flush=True)
            await asyncio.wait_for(drain, 30)  # the client's close frame, then EOF
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _send_paced(self, writer: asyncio.StreamWriter) -> tuple[int, int]:
        assert self.rate is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = sent_bytes = 0
        pending: list[bytes] = []
        for frame, _count in self._stream():
            pending.append(frame)
            sent += 1
            due = start + sent / self.rate
            if due > loop.time():  # write what is due, then sleep until the next one is
                data = b"".join(pending)
                pending.clear()
                writer.write(data)
                sent_bytes += len(data)
                await writer.drain()
                await asyncio.sleep(max(0.0, due - loop.time()))
        data = b"".join(pending)
        writer.write(data)
        return sent, sent_bytes + len(data)


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    request = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in request.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    key = headers.get("sec-websocket-key")
    if key is None:
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
        return False
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
    writer.write(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    return True


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65_536):
        pass


async def serve(kind: Kind, messages: int, rate: float | None, port: int) -> None:
    server = BlastServer(kind, messages, rate)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
    bound = listener.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("messages", type=int)
    parser.add_argument("--rate", type=float, default=None, help="messages per second")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.kind, args.messages, args.rate, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
