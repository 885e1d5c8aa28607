"""Serve capture files the way Tardis Machine serves its normalized data.

`spot serve`, `spot demo` and the test-suite talk to this server exactly as they would talk to a
real tardis-machine (docs/tardis-machine.md): the same routes, options, filters, frames and close
codes. A capture is an NDJSON file of normalized messages, plain or gzip, sorted by
`localTimestamp`; each matching line is sent unchanged, so a client receives byte for byte what
was recorded.

    WS   /ws-replay-normalized?options=…   replay, ends with close 1000; bad options → 1011
    WS   /ws-stream-normalized?options=…   stream, optionally paced (`speed`) and looped (`loop`)
    GET  /replay-normalized?options=…      the replay as chunked NDJSON; bad options → 500
    GET  /health-check                     200 JSON
    WS   any other path                    closed with 1008
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import heapq
import io
import logging
import re
import time
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Self

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["ServeOptions", "TardisMachineServer", "serve_forever"]

log = logging.getLogger(__name__)

_HTTP_BATCH_LINES: Final = 32  # tardis-machine writes its NDJSON response 32 lines at a time
_YIELD_EVERY: Final = 256  # a fast reader never makes send() wait: let other clients run too
_CLOSE_REASON_MAX_BYTES: Final = 123  # RFC 6455: control payload ≤ 125 bytes, 2 are the code
_FLUSH_TIMEOUT_SECS: Final = 5.0
_CLOSE_TIMEOUT_SECS: Final = 1.0
_SHIFTED_FIELDS: Final = ("timestamp", "localTimestamp", "openTimestamp", "closeTimestamp")
_CAPTURE_ERRORS: Final = (OSError, EOFError, zlib.error)
_EPOCH: Final = datetime(1970, 1, 1)
# Merging, windows, pacing and re-stamping all read the timestamp's characters by position.
_TIMESTAMP: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?")


@dataclass(frozen=True)
class ServeOptions:
    """What to serve and how: captures, stream pacing and looping, injected faults."""

    captures: tuple[Path, ...]  # NDJSON of normalized messages sorted by localTimestamp, or .gz
    speed: float | None = None  # stream pacing: 2.0 = twice real time; None = as fast as read
    loop: bool = False  # stream: start again at the end, timestamps shifted to be new data
    drop_every: int | None = None  # abort each connection (no close frame) after N messages
    passthrough_invalid: bool = False  # send lines that are not messages as they are

    def __post_init__(self) -> None:
        if not self.captures:
            raise ValueError("ServeOptions.captures: at least one capture file is needed")
        if self.speed is not None and not self.speed > 0:
            raise ValueError(f"ServeOptions.speed must be > 0, got {self.speed}")
        if self.drop_every is not None and self.drop_every < 1:
            raise ValueError(f"ServeOptions.drop_every must be >= 1, got {self.drop_every}")


class _OptionsError(ValueError):
    """Request options the server rejects; the text goes back to the client."""


class _Head(msgspec.Struct):
    """The fields filtering needs; msgspec skips the rest of the line without building it."""

    type: str = ""
    exchange: str = ""
    symbol: str = ""
    name: str = ""
    timestamp: str = ""
    local_timestamp: str = msgspec.field(default="", name="localTimestamp")


class _RequestOptions(msgspec.Struct, frozen=True, rename="camel"):
    exchange: str
    data_types: list[str]
    symbols: list[str] | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    with_disconnect_messages: bool = False


_HEAD_DECODER: Final = msgspec.json.Decoder(_Head)
_OPTIONS_DECODER: Final = msgspec.json.Decoder(_RequestOptions | list[_RequestOptions])
# Floats stay msgspec.Raw so a re-stamped line keeps the recorder's number spelling.
_RESTAMP_DECODER: Final = msgspec.json.Decoder(float_hook=lambda text: msgspec.Raw(text.encode()))


class _Entry(NamedTuple):
    key: str  # localTimestamp with 9 fractional digits: merge order across captures
    raw: bytes
    head: _Head | None  # None: the line is not a normalized message


@dataclass(frozen=True)
class _Selection:
    """One options object: which messages of one exchange a client asked for."""

    exchange: str
    symbols: frozenset[str]
    kinds: frozenset[tuple[str, str]]  # (type, name); name "" matches any name
    with_disconnects: bool
    first_minute: str  # "YYYY-MM-DDTHH:MM", inclusive; "" in stream mode
    end_minute: str  # exclusive

    def matches(self, head: _Head) -> bool:
        minute = head.local_timestamp[:16]
        if self.first_minute and not self.first_minute <= minute < self.end_minute:
            return False
        if head.type == "disconnect":
            return self.with_disconnects
        if self.symbols and head.symbol.upper() not in self.symbols:
            return False
        return (head.type, "") in self.kinds or (head.type, head.name) in self.kinds


class _Filter:
    def __init__(self, selections: tuple[_Selection, ...]) -> None:
        self._by_exchange: dict[str, list[_Selection]] = {}
        for selection in selections:
            self._by_exchange.setdefault(selection.exchange, []).append(selection)

    def __call__(self, head: _Head) -> bool:
        return any(s.matches(head) for s in self._by_exchange.get(head.exchange, ()))


def _parse_filter(text: str | None, *, replay: bool) -> _Filter:
    if text is None:
        raise _OptionsError('Missing "options" query parameter')
    try:
        decoded = _OPTIONS_DECODER.decode(text)
    except msgspec.DecodeError as exc:
        raise _OptionsError(f"Invalid options: {exc}") from None
    requests = decoded if isinstance(decoded, list) else [decoded]
    if not requests:
        raise _OptionsError("Invalid options: empty array")
    return _Filter(tuple(_selection(request, replay=replay) for request in requests))


def _selection(request: _RequestOptions, *, replay: bool) -> _Selection:
    if not request.exchange:
        raise _OptionsError('Invalid "exchange" argument: empty string')
    first_minute = end_minute = ""
    if replay:  # a stream has no period: tardis-machine ignores from/to there too
        first_minute = _minute(request.from_, "from")
        end_minute = _minute(request.to, "to")
        if first_minute >= end_minute:
            raise _OptionsError(
                'Invalid "to" and "from" arguments combination. '
                'Please provide "to" date that is later than "from" date.'
            )
    return _Selection(
        exchange=request.exchange,
        symbols=frozenset(symbol.upper() for symbol in request.symbols or ()),
        kinds=frozenset(_kind(data_type) for data_type in request.data_types),
        with_disconnects=request.with_disconnect_messages,
        first_minute=first_minute,
        end_minute=end_minute,
    )


def _kind(data_type: str) -> tuple[str, str]:
    # Computed data types arrive under their family's type, told apart by `name` only.
    if data_type.startswith(("book_snapshot_", "quote")):
        return ("book_snapshot", data_type)
    if data_type.startswith("trade_bar_"):
        return ("trade_bar", data_type)
    return (data_type, "")


def _minute(value: str | None, argument: str) -> str:
    """Return `value` as a UTC minute key: tardis-machine replays whole minutes."""
    try:
        moment = datetime.fromisoformat(value or "")
    except ValueError:
        raise _OptionsError(
            f'Invalid "{argument}" argument: {"missing" if value is None else value}. '
            "Please provide valid date string."
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="minutes")


def _sort_key(timestamp: str) -> str:
    # Captures may print 3, 6 or 7 fractional digits; padding makes string order time order.
    whole, _, fraction = timestamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"


def _key_us(key: str) -> int:
    return (datetime.fromisoformat(key[:26]) - _EPOCH) // timedelta(microseconds=1)


def _open_capture(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.GzipFile(path, "rb")
    return path.open("rb")


def _decode_head(raw: bytes) -> _Head | None:
    try:
        head = _HEAD_DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # invalid UTF-8 inside a JSON string
        return None
    return head if _TIMESTAMP.fullmatch(head.local_timestamp) else None


def _entries(path: Path) -> Generator[_Entry]:
    key = ""  # an invalid line keeps the place of the line before it
    with _open_capture(path) as lines:
        for line in lines:
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            head = _decode_head(raw)
            if head is not None:
                key = _sort_key(head.local_timestamp)
            yield _Entry(key, raw, head)


class _Feed:
    """One pass over the captures for one client: merged by localTimestamp, filtered, counted."""

    def __init__(self, options: ServeOptions, matches: _Filter, *, track_span: bool) -> None:
        self._options = options
        self._matches = matches
        self._track_span = track_span
        self.passthrough_invalid = options.passthrough_invalid
        self.matched = 0
        self.invalid = 0
        self.first_key = ""
        self.last_key = ""

    def entries(self) -> Generator[_Entry]:
        sources = [_entries(path) for path in self._options.captures]
        merged: Iterator[_Entry] = (
            sources[0] if len(sources) == 1 else heapq.merge(*sources, key=itemgetter(0))
        )
        try:
            for entry in merged:
                if entry.head is None:
                    self.invalid += 1
                    log.debug("Invalid line in capture: %.80r", entry.raw)
                    if self.passthrough_invalid:
                        yield entry
                    continue
                if self._track_span:
                    self._widen_span(entry.head)
                if self._matches(entry.head):
                    self.matched += 1
                    yield entry
        finally:
            for source in sources:
                source.close()

    def _widen_span(self, head: _Head) -> None:
        for timestamp in (head.timestamp, head.local_timestamp):
            if _TIMESTAMP.fullmatch(timestamp):
                key = _sort_key(timestamp)
                self.first_key = min(self.first_key or key, key)
                self.last_key = max(self.last_key, key)

    def span_minutes(self) -> int:
        """Return whole minutes that move every timestamp of this pass past its last one."""
        if not self.first_key:
            return 1
        span = datetime.fromisoformat(self.last_key[:26]) - datetime.fromisoformat(
            self.first_key[:26]
        )
        return span // timedelta(minutes=1) + 1


def _restamp(raw: bytes, minutes: int) -> bytes:
    message = _RESTAMP_DECODER.decode(raw)
    if not isinstance(message, dict):
        return raw
    for field in _SHIFTED_FIELDS:
        value = message.get(field)
        if isinstance(value, str) and _TIMESTAMP.fullmatch(value):
            message[field] = _shift(value, minutes)
    return msgspec.json.encode(message)


def _shift(timestamp: str, minutes: int) -> str:
    # Shifting whole minutes leaves seconds and fraction untouched, whatever their precision.
    moment = datetime.fromisoformat(timestamp[:16]) + timedelta(minutes=minutes)
    return moment.isoformat(timespec="minutes") + timestamp[16:]


class _Pacer:
    """Sleep so messages leave `speed` times as fast as their localTimestamps advance."""

    def __init__(self, speed: float | None) -> None:
        self._speed = speed
        self._origin: tuple[float, int] | None = None  # (loop time, capture µs)

    async def wait(self, key: str) -> None:
        if self._speed is None:
            return
        at_us = _key_us(key)
        now = asyncio.get_running_loop().time()
        if self._origin is None:
            self._origin = (now, at_us)
            return
        due = self._origin[0] + (at_us - self._origin[1]) / 1e6 / self._speed
        if due > now:
            await asyncio.sleep(due - now)


def _close_reason(text: str) -> bytes:
    return text.encode()[:_CLOSE_REASON_MAX_BYTES].decode(errors="ignore").encode()


async def _discard_incoming(ws: web.WebSocketResponse) -> None:
    # Reading is what answers the client's pings and close frame while we send.
    async for _ in ws:
        pass


class _Link:
    """One client connection: counts what it was sent and injects the configured drop."""

    def __init__(self, request: web.Request, drop_every: int | None) -> None:
        self._transport = request.transport
        self._drop_every = drop_every
        self.sent = 0

    async def count_one(self) -> bool:
        """Count one sent message; return True when the drop is due now."""
        self.sent += 1
        if self.sent % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        return self._drop_every is not None and self.sent % self._drop_every == 0

    async def drop(self) -> None:
        """End the TCP connection with no close frame, after what was sent reached the kernel."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        deadline = time.monotonic() + _FLUSH_TIMEOUT_SECS
        # A transport has no "buffer empty" event to wait on: poll it.
        while transport.get_write_buffer_size() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        log.info("Dropping connection after %d messages (drop_every)", self.sent)
        transport.abort()


class TardisMachineServer:
    """A Tardis-Machine-compatible server over capture files; `async with` starts and stops it."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.messages_sent = 0
        self.connections = 0
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._started_at = time.monotonic()
        self._sockets: set[web.WebSocketResponse] = set()
        self._streams: set[asyncio.Task[object]] = set()

    def __repr__(self) -> str:
        return (
            f"<TardisMachineServer {self.ws_url if self._runner else 'stopped'} "
            f"connections={self.connections} messages_sent={self.messages_sent}>"
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 = an ephemeral port)."""
        for capture in self.options.captures:
            if not capture.is_file():
                raise FileNotFoundError(f"Capture file not found: {capture}")
        app = web.Application()
        app.router.add_get("/ws-replay-normalized", self._ws_replay)
        app.router.add_get("/ws-stream-normalized", self._ws_stream)
        app.router.add_get("/replay-normalized", self._http_replay)
        app.router.add_get("/health-check", self._health_check)
        app.router.add_get("/{tail:.*}", self._unknown_path)
        self._runner = web.AppRunner(app, shutdown_timeout=_CLOSE_TIMEOUT_SECS, access_log=None)
        await self._runner.setup()
        try:
            self._port = await self._listen(host, port)
        except BaseException:
            await self.aclose()
            raise
        self._host = host
        self._started_at = time.monotonic()

    async def _listen(self, host: str, port: int) -> int:
        assert self._runner is not None, "start() first"
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound: int = self._runner.addresses[-1][1]
        return bound

    @property
    def port(self) -> int:
        """Return the bound port."""
        return self._port

    @property
    def ws_url(self) -> str:
        """Return the base WebSocket URL, e.g. ws://127.0.0.1:8001."""
        return f"ws://{_url_host(self._host)}:{self._port}"

    @property
    def http_url(self) -> str:
        """Return the base HTTP URL, e.g. http://127.0.0.1:8000."""
        return f"http://{_url_host(self._host)}:{self._port}"

    async def aclose(self) -> None:
        """Close every client connection and stop listening."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await self._close_clients()
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _close_clients(self) -> None:
        # Before the runner's own shutdown, which would cut WebSockets without a close frame.
        for task in self._streams:
            task.cancel()
        closing = [
            asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY), _CLOSE_TIMEOUT_SECS)
            for ws in self._sockets
        ]
        await asyncio.gather(*closing, return_exceptions=True)

    async def _health_check(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "Healthy",
                "uptimeHours": round((time.monotonic() - self._started_at) / 3600, 2),
                "timestampMs": int(time.time() * 1000),
                "connections": self.connections,
                "messagesSent": self.messages_sent,
            }
        )

    async def _unknown_path(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False)
        if not ws.can_prepare(request).ok:
            raise web.HTTPNotFound()
        await ws.prepare(request)
        self.connections += 1
        log.warning("WebSocket to unknown path %s closed with 1008", request.path)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"unknown path")
        return ws

    async def _ws_replay(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_ws(request, stream=False)

    async def _ws_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_ws(request, stream=True)

    async def _serve_ws(self, request: web.Request, *, stream: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text="Upgrade Required")
        await ws.prepare(request)
        self.connections += 1
        self._sockets.add(ws)
        reader = asyncio.create_task(_discard_incoming(ws))
        started = time.monotonic()
        link = _Link(request, self.options.drop_every)
        try:
            code, reason = await self._ws_outcome(request, ws, link, stream=stream)
            if code is not None:
                await ws.close(code=code, message=_close_reason(reason))
        finally:
            self._sockets.discard(ws)
            reader.cancel()  # it ends by itself once closed; this covers a cancelled handler
        log.info(
            "%s finished: %d messages sent in %.2f s, %s",
            request.path,
            link.sent,
            time.monotonic() - started,
            f"closed with {code}" if code else "client gone or dropped",
        )
        return ws

    async def _ws_outcome(
        self, request: web.Request, ws: web.WebSocketResponse, link: _Link, *, stream: bool
    ) -> tuple[int | None, str]:
        """Send the requested messages; return the close code to send (None: nothing to send)."""
        log.debug("%s options: %s", request.path, request.query.get("options"))
        try:
            matches = _parse_filter(request.query.get("options"), replay=not stream)
        except _OptionsError as exc:
            log.warning("%s rejected: %s", request.path, exc)
            return WSCloseCode.INTERNAL_ERROR, str(exc)
        try:
            if stream:
                finished = await self._stream(ws, link, matches)
            else:
                feed = _Feed(self.options, matches, track_span=False)
                finished = await self._send_pass(ws, link, feed, _Pacer(None), 0)
                _log_invalid(feed)
        except _CAPTURE_ERRORS as exc:
            log.error("%s failed reading a capture: %s", request.path, exc)
            return WSCloseCode.INTERNAL_ERROR, str(exc)
        return (WSCloseCode.OK, "") if finished else (None, "")

    async def _stream(self, ws: web.WebSocketResponse, link: _Link, matches: _Filter) -> bool:
        offset_minutes = step_minutes = 0
        while True:
            feed = _Feed(self.options, matches, track_span=self.options.loop and not step_minutes)
            pacer = _Pacer(self.options.speed)
            if not await self._send_pass(ws, link, feed, pacer, offset_minutes):
                return False
            _log_invalid(feed)
            if not self.options.loop or feed.matched == 0:
                return True
            step_minutes = step_minutes or feed.span_minutes()
            offset_minutes += step_minutes
            log.info("Stream looping: timestamps now shifted by %d minutes", offset_minutes)

    async def _send_pass(
        self,
        ws: web.WebSocketResponse,
        link: _Link,
        feed: _Feed,
        pacer: _Pacer,
        offset_minutes: int,
    ) -> bool:
        """Send one pass of `feed`; return False when the client left or was dropped."""
        with contextlib.closing(feed.entries()) as entries:
            for key, raw, head in entries:
                if head is not None:
                    await pacer.wait(key)
                    if offset_minutes:
                        raw = _restamp(raw, offset_minutes)
                if not await self._send_frame(ws, link, raw):
                    return False
        return True

    async def _send_frame(self, ws: web.WebSocketResponse, link: _Link, raw: bytes) -> bool:
        if ws.closed:
            return False
        try:
            # The original bytes go out as they are: no decode/encode round trip.
            await ws.send_frame(raw, WSMsgType.TEXT)
        except ConnectionResetError:
            return False
        self.messages_sent += 1
        if await link.count_one():
            await link.drop()
            return False
        return True

    async def _http_replay(self, request: web.Request) -> web.StreamResponse:
        try:
            matches = _parse_filter(request.query.get("options"), replay=True)
        except _OptionsError as exc:
            log.warning("%s rejected: %s", request.path, exc)
            return web.json_response({"message": str(exc)}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "application/x-json-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        link = _Link(request, self.options.drop_every)
        feed = _Feed(self.options, matches, track_span=False)
        try:
            if await self._write_lines(response, link, feed):
                await response.write_eof()
        except _CAPTURE_ERRORS as exc:
            # Like tardis-machine: once the 200 went out, the error ends the body as JSON.
            log.error("%s failed reading a capture: %s", request.path, exc)
            with contextlib.suppress(ConnectionResetError):
                await response.write(msgspec.json.encode({"message": str(exc)}) + b"\n")
                await response.write_eof()
        finally:
            self._streams.discard(task)
        log.info("%s finished: %d messages sent", request.path, link.sent)
        _log_invalid(feed)
        return response

    async def _write_lines(self, response: web.StreamResponse, link: _Link, feed: _Feed) -> bool:
        """Write the feed as NDJSON; return False when the client left or was dropped."""
        batch: list[bytes] = []
        drop = False
        with contextlib.closing(feed.entries()) as entries:
            for entry in entries:
                batch.append(entry.raw)
                drop = await link.count_one()
                if len(batch) == _HTTP_BATCH_LINES or drop:
                    if not await self._write_batch(response, batch):
                        return False
                    batch = []
                if drop:
                    await link.drop()
                    return False
        return await self._write_batch(response, batch)

    async def _write_batch(self, response: web.StreamResponse, batch: list[bytes]) -> bool:
        if not batch:
            return True
        try:
            await response.write(b"\n".join(batch) + b"\n")
        except ConnectionResetError:
            return False
        self.messages_sent += len(batch)
        return True


def _log_invalid(feed: _Feed) -> None:
    if feed.invalid:
        how = "Sent as they are" if feed.passthrough_invalid else "Skipped"
        log.warning("%s: %d capture lines that are not normalized messages", how, feed.invalid)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve_forever(options: ServeOptions, host: str, port: int) -> None:
    """Serve HTTP on `port` and WebSocket on `port + 1`, like tardis-machine, until cancelled."""
    server = TardisMachineServer(options)
    await server.start(host, port)
    try:
        ws_port = await server._listen(host, port + 1 if port else 0)
        log.info("Tardis Machine compatible server serving %d capture(s)", len(options.captures))
        log.info("--> HTTP endpoint: %s/replay-normalized", server.http_url)
        log.info(
            "--> WebSocket endpoint: ws://%s:%d/ws-replay-normalized", _url_host(host), ws_port
        )
        await asyncio.Event().wait()
    finally:
        await server.aclose()
