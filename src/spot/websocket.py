"""Tardis Machine WebSocket source: connect, reconnect, resume, hand raw frames on.

`TardisMachineSource.frames()` yields every text frame with its receive time and knows nothing of
what happens to it. Replay ends when the server closes with 1000. A dropped replay resumes from the
last frame spot holds: Tardis Machine cuts `from` to the minute, so the source asks again from that
minute and skips what it already yielded (matched by localTimestamp and count). In stream mode a
drop is reported to `on_gap` as the time without data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast
from urllib.parse import quote

import aiohttp

from spot.config import ExchangeConfig, TardisConfig
from spot.errors import ServerClosedWithError, SourceError
from spot.messages import Frame

log = logging.getLogger(__name__)

REPLAY_PATH = "/ws-replay-normalized"
STREAM_PATH = "/ws-stream-normalized"
CLOSE_NORMAL = 1000
MAX_FRAME_BYTES = 16 * 1024 * 1024
_LOCAL_TS_KEY = '"localTimestamp":"'
_LOCAL_TS_KEY_BYTES = _LOCAL_TS_KEY.encode()
_WebSocket = aiohttp.ClientWebSocketResponse[Literal[False]]  # text frames kept as bytes


@dataclass(frozen=True)
class Gap:
    """A time without data from a stream: from the last frame before a drop to the reconnect."""

    exchanges: tuple[str, ...]
    start: datetime
    end: datetime
    reason: str


def build_options(
    tardis: TardisConfig,
    exchanges: Sequence[ExchangeConfig],
    data_types: Sequence[str],
    from_: str | None = None,
) -> list[dict[str, object]]:
    """Return the `options` array: one object per exchange, Tardis Machine's field names."""
    options: list[dict[str, object]] = []
    for exchange in exchanges:
        option: dict[str, object] = {
            "exchange": exchange.name,
            "symbols": list(exchange.symbols),
            "dataTypes": list(data_types),
            "withDisconnectMessages": tardis.with_disconnect_messages,
        }
        if tardis.mode == "replay":
            option["from"] = from_ or tardis.from_
            option["to"] = tardis.to
        options.append(option)
    return options


def source_url(base_url: str, mode: str, options: list[dict[str, object]]) -> str:
    """Return the WebSocket URL for `mode` with the url-encoded `options` query."""
    path = REPLAY_PATH if mode == "replay" else STREAM_PATH
    encoded = quote(json.dumps(options, separators=(",", ":")), safe="")
    return f"{base_url.rstrip('/')}{path}?options={encoded}"


def local_timestamp_of(data: str | bytes) -> str | None:
    """Return the raw `localTimestamp` string of a frame without decoding it (None if absent)."""
    # Searched from the end: Tardis Machine puts the key once, last, after a book's ~2 kB of
    # levels, so rfind reads a few bytes where find would read the whole frame.
    if isinstance(data, bytes):
        start = data.rfind(_LOCAL_TS_KEY_BYTES)
        if start < 0:
            return None
        start += len(_LOCAL_TS_KEY_BYTES)
        end = data.find(b'"', start)
        return data[start:end].decode(errors="replace") if end > 0 else None
    text = data
    start = text.rfind(_LOCAL_TS_KEY)
    if start < 0:
        return None
    start += len(_LOCAL_TS_KEY)
    end = text.find('"', start)
    return text[start:end] if end > 0 else None


def _to_microseconds(timestamp: str) -> int:
    moment = datetime.fromisoformat(timestamp)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


class ResumePoint:
    """Where a replay stands: the last localTimestamp yielded and how many frames carried it."""

    def __init__(self) -> None:
        self.timestamp: str | None = None
        self.count_at_timestamp = 0

    def advance(self, data: str | bytes) -> None:
        timestamp = local_timestamp_of(data)
        if timestamp is None:
            return
        if timestamp == self.timestamp:
            self.count_at_timestamp += 1
        else:
            self.timestamp, self.count_at_timestamp = timestamp, 1

    def from_minute(self) -> str | None:
        """Return the minute to ask the server to replay from, or None to start over."""
        if self.timestamp is None:
            return None
        return self.timestamp[:16] + ":00.000Z"

    def skipper(self) -> Callable[[str | bytes], bool]:
        """Return a predicate telling, frame by frame, whether a resumed frame was seen before."""
        if self.timestamp is None:
            return lambda data: False
        last, last_us = self.timestamp, _to_microseconds(self.timestamp)
        repeats_left = self.count_at_timestamp
        done = False

        def already_seen(data: str | bytes) -> bool:
            nonlocal repeats_left, done
            if done:
                return False
            timestamp = local_timestamp_of(data)
            if timestamp is None:
                return False
            if timestamp == last and repeats_left > 0:
                repeats_left -= 1
                return True
            if timestamp != last and _to_microseconds(timestamp) < last_us:
                return True
            done = True
            return False

        return already_seen


class Backoff:
    """Waits between reconnects: exponential with jitter, reset by progress, cut short by stop().

    With `give_up_after`, the attempt after that many failures in a row raises SourceError.
    """

    def __init__(self, initial_secs: float, max_secs: float, give_up_after: int | None) -> None:
        self.initial_secs = initial_secs
        self.max_secs = max_secs
        self.give_up_after = give_up_after
        self.failures = 0
        self._delay = initial_secs
        self._stopped = asyncio.Event()

    def progressed(self) -> None:
        """The last connection delivered something: start the backoff over."""
        self.failures, self._delay = 0, self.initial_secs

    def next_wait(self, reason: str) -> float:
        """Count a failure and return how long to wait before the next attempt."""
        self.failures += 1
        if self.give_up_after is not None and self.failures > self.give_up_after:
            raise SourceError(f"gave up after {self.failures - 1} reconnects in a row: {reason}")
        wait = self._delay * random.uniform(0.5, 1.5)
        self._delay = min(self._delay * 2, self.max_secs)
        return wait

    async def sleep(self, secs: float) -> None:
        """Sleep `secs`, or less when stop() is called meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), secs)

    def stop(self) -> None:
        self._stopped.set()


class TardisMachineSource:
    """Frames from Tardis Machine's normalized WebSocket API, across reconnects."""

    def __init__(
        self,
        tardis: TardisConfig,
        exchanges: Sequence[ExchangeConfig],
        data_types: Sequence[str],
        *,
        on_gap: Callable[[Gap], None] | None = None,
    ) -> None:
        self.tardis = tardis
        self.exchanges = tuple(exchanges)
        self.data_types = tuple(data_types)
        self.on_gap = on_gap
        self._resume = ResumePoint()
        self._stopping = False
        give_up_after = tardis.max_reconnect_attempts if tardis.mode == "replay" else None
        self._backoff = Backoff(
            tardis.reconnect_initial_secs, tardis.reconnect_max_secs, give_up_after
        )
        self._ws: _WebSocket | None = None
        self.connects = 0
        self.frames_received = 0
        self.frames_skipped_on_resume = 0
        self.oversized_frames = 0
        self.completed = False
        self._close_message: aiohttp.WSMessage | None = None
        self._last_frame_at: datetime | None = None

    def __repr__(self) -> str:
        return (
            f"<TardisMachineSource {self.tardis.mode} {self.tardis.url} connects={self.connects}"
            f" frames={self.frames_received} completed={self.completed}>"
        )

    @property
    def connected(self) -> bool:
        """Return whether a connection to Tardis Machine is open now (stream health: `down`)."""
        return self._ws is not None and not self._ws.closed

    def url(self) -> str:
        """Return the URL of the next connection (a resumed replay starts at its resume minute)."""
        options = build_options(
            self.tardis, self.exchanges, self.data_types, self._resume.from_minute()
        )
        return source_url(self.tardis.url, self.tardis.mode, options)

    async def stop(self) -> None:
        """Stop reading: frames() ends after the frame in hand, or at once during a backoff."""
        self._stopping = True
        self._backoff.stop()
        if self._ws is not None:
            await self._ws.close()

    async def frames(self) -> AsyncIterator[Frame]:
        """Yield frames until the replay completes or stop() is called; reconnect on drops."""
        # A connect that hangs (a black-holed host) must not outlast a stop for long.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stopping:
                received_before = self.frames_received
                dropped_at = datetime.now(UTC)
                reason = "connection failed"
                try:
                    # Text frames stay bytes: the decoder checks UTF-8 and counts a bad frame,
                    # where aiohttp would drop the whole connection over it (close 1007).
                    async with session.ws_connect(
                        self.url(), max_msg_size=MAX_FRAME_BYTES, autoping=True, decode_text=False
                    ) as ws:
                        self._ws = ws
                        self._on_connected(dropped_at if self.connects else None)
                        async for frame in self._read(ws):
                            yield frame
                        reason = self._after_close(ws)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                finally:
                    self._ws = None
                if self.completed or self._stopping:
                    return
                if self.frames_received > received_before:
                    self._backoff.progressed()
                wait = self._backoff.next_wait(reason)
                log.warning("[-] WebSocket dropped (%s); reconnecting in %.1fs", reason, wait)
                await self._backoff.sleep(wait)

    def _on_connected(self, dropped_at: datetime | None) -> None:
        self.connects += 1
        log.info(
            "[+] Connected to WebSocket %s (%s mode, connection %d)",
            self.tardis.url,
            self.tardis.mode,
            self.connects,
        )
        if dropped_at is not None and self.tardis.mode == "stream" and self.on_gap is not None:
            exchanges = tuple(exchange.name for exchange in self.exchanges)
            start = self._last_frame_at or dropped_at
            self.on_gap(Gap(exchanges, start, datetime.now(UTC), "reconnect"))

    async def _read(self, ws: _WebSocket) -> AsyncIterator[Frame]:
        replay = self.tardis.mode == "replay"
        seen_before = self._resume.skipper() if replay else None
        while True:
            message = await ws.receive()
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                self._close_message = cast(aiohttp.WSMessage, message)  # close or error, not text
                return
            received_ns = time.time_ns()
            data = message.data
            if seen_before is not None:
                if seen_before(data):
                    self.frames_skipped_on_resume += 1
                    continue
                self._resume.advance(data)
            self.frames_received += 1
            yield Frame(data, received_ns)

    def _after_close(self, ws: _WebSocket) -> str:
        """Decide what a closed connection means; return the reason to reconnect."""
        self._last_frame_at = datetime.now(UTC)
        message = self._close_message
        code = ws.close_code
        reason = ""
        if message is not None and message.type == aiohttp.WSMsgType.CLOSE:
            reason = str(message.extra or "")
        if code == CLOSE_NORMAL and self.tardis.mode == "replay":
            self.completed = True
            log.info(
                "Replay complete: the server closed with 1000 after %d frames", self.frames_received
            )
            return "complete"
        if code in (1008, 1011):
            log.error("Tardis Machine closed the WebSocket with %s: %s", code, reason)
            if self.tardis.mode == "replay":
                raise ServerClosedWithError(code, reason)
        if message is not None and message.type == aiohttp.WSMsgType.ERROR:
            # aiohttp hands the error over in the message; ws.exception() may be unset.
            error = message.data if isinstance(message.data, Exception) else ws.exception()
            if getattr(error, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                # The frame cannot be read, so it cannot be skipped: a replay meets it again.
                self.oversized_frames += 1
                log.error("Frame over %d bytes refused (%s)", MAX_FRAME_BYTES, error)
            return f"error: {error}"
        return f"closed with code {code}" + (f": {reason}" if reason else "")
