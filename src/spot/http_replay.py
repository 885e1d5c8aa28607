"""Tardis Machine HTTP source: `GET /replay-normalized`, one streaming NDJSON response.

The alternative to the WebSocket replay (`tardis.transport = "http"`): the same options and the
same normalized lines, so the same rows. Each line becomes a Frame. A response that drops midway
resumes like the WebSocket source (from the minute of the last line held, skipping the lines
already yielded); an HTTP error status, or the JSON error Tardis Machine appends to a 200 body
that had started, raises SourceError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final
from urllib.parse import quote

import aiohttp
import msgspec

from spot.config import ExchangeConfig, TardisConfig
from spot.errors import SourceError
from spot.messages import Frame
from spot.websocket import Backoff, ResumePoint, build_options

log = logging.getLogger(__name__)

HTTP_REPLAY_PATH: Final = "/replay-normalized"
READ_CHUNK_BYTES: Final = 256 * 1024
_ERROR_BODY_BYTES: Final = 4096


def replay_http_url(base_url: str, options: list[dict[str, object]]) -> str:
    """Return the `/replay-normalized` URL with the url-encoded `options` array."""
    encoded = quote(msgspec.json.encode(options).decode(), safe="")
    return f"{base_url.rstrip('/')}{HTTP_REPLAY_PATH}?options={encoded}"


def error_message_of(line: bytes) -> str | None:
    """Return the text of a Tardis Machine error line (`{"message": …}`), None for a message."""
    if b'"type"' in line or b'"message"' not in line:
        return None
    try:
        decoded = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    if isinstance(decoded, dict) and "message" in decoded and "type" not in decoded:
        return str(decoded["message"])
    return None


def split_lines(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """Return the complete lines of `pending + chunk` and the unfinished rest."""
    data = pending + chunk if pending else chunk
    *lines, rest = data.split(b"\n")
    return lines, rest


class HttpReplaySource:
    """Frames of a Tardis Machine HTTP replay, across dropped responses; a `main_loop.Source`."""

    def __init__(
        self,
        tardis: TardisConfig,
        exchanges: Sequence[ExchangeConfig],
        data_types: Sequence[str],
    ) -> None:
        self.tardis = tardis
        self.exchanges = tuple(exchanges)
        self.data_types = tuple(data_types)
        self._resume = ResumePoint()
        self._stopping = False
        self._backoff = Backoff(
            tardis.reconnect_initial_secs, tardis.reconnect_max_secs, tardis.max_reconnect_attempts
        )
        self._response: aiohttp.ClientResponse | None = None
        self.connects = 0
        self.frames_received = 0
        self.frames_skipped_on_resume = 0
        self.completed = False

    def __repr__(self) -> str:
        return (
            f"<HttpReplaySource {self.tardis.url} connects={self.connects}"
            f" frames={self.frames_received} completed={self.completed}>"
        )

    def url(self) -> str:
        """Return the URL of the next request (a resumed replay starts at its resume minute)."""
        options = build_options(
            self.tardis, self.exchanges, self.data_types, self._resume.from_minute()
        )
        return replay_http_url(self.tardis.url, options)

    async def stop(self) -> None:
        """Stop reading: frames() ends after the frame in hand, or at once during a backoff."""
        self._stopping = True
        self._backoff.stop()
        if self._response is not None:
            self._response.close()

    async def frames(self) -> AsyncIterator[Frame]:
        """Yield every line of the replay until it completes or stop() is called."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stopping:
                received_before = self.frames_received
                try:
                    async for frame in self._request(session):
                        yield frame
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    self.completed = not self._stopping
                    if self.completed:
                        log.info("HTTP replay complete after %d lines", self.frames_received)
                    return
                if self._stopping:
                    return
                if self.frames_received > received_before:
                    self._backoff.progressed()
                wait = self._backoff.next_wait(reason)
                log.warning("[-] HTTP replay dropped (%s); resuming in %.1fs", reason, wait)
                await self._backoff.sleep(wait)

    async def _request(self, session: aiohttp.ClientSession) -> AsyncIterator[Frame]:
        async with session.get(self.url()) as response:
            self._response = response
            try:
                self.connects += 1
                log.info(
                    "[+] GET %s%s (request %d)", self.tardis.url, HTTP_REPLAY_PATH, self.connects
                )
                await _raise_for_status(response)
                async for frame in self._read(response):
                    yield frame
            finally:
                self._response = None

    async def _read(self, response: aiohttp.ClientResponse) -> AsyncIterator[Frame]:
        seen_before = self._resume.skipper()
        pending = b""
        async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
            lines, pending = split_lines(pending, chunk)
            for line in lines:
                frame = self._frame(line, seen_before)
                if frame is not None:
                    yield frame
            if self._stopping:
                return
        frame = self._frame(pending, seen_before)  # a body may end without a final newline
        if frame is not None:
            yield frame

    def _frame(self, line: bytes, seen_before: Callable[[bytes], bool]) -> Frame | None:
        line = line.rstrip(b"\r")
        if not line.strip():
            return None
        error = error_message_of(line)
        if error is not None:
            raise SourceError(f"Tardis Machine reported an error during the replay: {error}")
        if seen_before(line):
            self.frames_skipped_on_resume += 1
            return None
        self._resume.advance(line)
        self.frames_received += 1
        return Frame(line, time.time_ns())


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status == 200:
        return
    body = await response.content.read(_ERROR_BODY_BYTES)
    message = error_message_of(body.strip()) or body.decode(errors="replace").strip()
    raise SourceError(
        f"GET {HTTP_REPLAY_PATH} answered {response.status} {response.reason}: {message}"
    )
