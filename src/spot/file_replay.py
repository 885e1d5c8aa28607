"""Replay files into the live pipeline: Tardis CSV datasets and NDJSON captures, plain or gzip.

`FileReplaySource.frames()` reads the files in the order given. Each file's format comes from its
contents (gzip magic bytes, then a JSON object or the CSV header), never from its name alone:

    NDJSON of normalized messages  each line is a Frame for DataProcessor, as if off the socket
    trades CSV                     one trade_<ticker> row a line; an empty id is derived by the
                                   pipeline's TradeIds from the trade as Tardis Machine prints it
    book_snapshot_N CSV            one orderbook_<ticker> row a line, cut or padded to the depth
    incremental_book_L2 CSV        the book rebuilt, sampled like Tardis Machine (incremental_book)
    quotes CSV                     recognised and skipped whole: spot stores no quotes

CSV lines have no wire message, so they are normalized here with data_processor's pure row
builders and go straight into the pipeline's queues (`attach`). Files are streamed: memory stays
flat whatever their size. A bad line is skipped, counted and logged with file:line; a file that
cannot be read (unknown header, truncated gzip) raises BadInputFile naming it, after the rows
already read were handed on — main_loop stores them before raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import glob
import gzip
import io
import logging
import math
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

from spot.data_processor import (
    DataProcessor,
    InvalidMessage,
    NormalizedRow,
    RowSink,
    book_row_us,
    datetime_from_ns,
    trade_row_us,
)
from spot.errors import BadInputFile
from spot.incremental_book import ComputedSnapshot, IncrementalBooks
from spot.messages import Frame
from spot.tables import Kind, table_name

log = logging.getLogger(__name__)

FileFormat = Literal["ndjson", "trades", "book_snapshot", "incremental_book_L2", "quotes"]

_KEY: Final = ("exchange", "symbol", "timestamp", "local_timestamp")
TRADES_HEADER: Final = (*_KEY, "id", "side", "price", "amount")
INCREMENTAL_HEADER: Final = (*_KEY, "is_snapshot", "side", "price", "amount")
QUOTES_HEADER: Final = (*_KEY, "ask_amount", "ask_price", "bid_price", "bid_amount")
DATA_SUFFIXES: Final = (".csv", ".ndjson", ".jsonl", ".json")
GZIP_MAGIC: Final = b"\x1f\x8b"
# Every this many lines the reader lets the writers run, refreshes received_at and progress,
# and notices stop(): a file never holds the event loop for long.
CHECKPOINT_LINES: Final = 1024
_LOGGED_SKIPS_PER_REASON: Final = 5
_READ_ERRORS: Final = (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error)
# Python's datetime range (years 1 to 9999) in Unix microseconds; PostgreSQL's is wider.
_FIRST_US: Final = -62_135_596_800_000_000
_LAST_US: Final = 253_402_300_799_999_999
_BOOL: Final = {"true": True, "false": False}
_SIDES: Final = {"bid": True, "ask": False}


def book_snapshot_header(levels: int) -> tuple[str, ...]:
    """Return the header of a Tardis `book_snapshot_{levels}` CSV (ask and bid interleaved)."""
    columns = [
        f"{side}[{i}].{part}" for i in range(levels) for side in ("asks", "bids")
        for part in ("price", "amount")
    ]  # fmt: skip
    return (*_KEY, *columns)


@dataclass(frozen=True)
class DetectedFormat:
    """What a file holds; `levels` is N of a book_snapshot_N file."""

    format: FileFormat
    levels: int = 0

    def __str__(self) -> str:
        if self.format == "book_snapshot":
            return f"book_snapshot_{self.levels} CSV"
        return "NDJSON" if self.format == "ndjson" else f"{self.format} CSV"


def detect_csv_format(header: Sequence[str]) -> DetectedFormat | None:
    """Return the format of a Tardis CSV header, or None for a header spot does not know."""
    columns = tuple(header)
    known: dict[tuple[str, ...], FileFormat] = {
        TRADES_HEADER: "trades",
        INCREMENTAL_HEADER: "incremental_book_L2",
        QUOTES_HEADER: "quotes",
    }
    if columns in known:
        return DetectedFormat(known[columns])
    levels, extra = divmod(len(columns) - len(_KEY), 4)
    if levels >= 1 and not extra and columns == book_snapshot_header(levels):
        return DetectedFormat("book_snapshot", levels)
    return None


def expand_paths(arguments: Sequence[str]) -> list[Path]:
    """Return the files named by `arguments` (files, globs, directories), each once, in order.

    A directory or glob contributes its data files (.csv, .ndjson, .jsonl, .json, each maybe .gz)
    sorted by name, so daily files replay in date order; a file named outright is always taken.
    """
    found: dict[Path, None] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            found[path] = None
            continue
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and _is_data_file(p))
        elif glob.has_magic(argument):
            matches = [p for p in map(Path, sorted(glob.glob(argument))) if p.is_file()]
        else:
            raise BadInputFile(f"{argument}: no such file or directory")
        if not matches:
            raise BadInputFile(f"{argument}: no data files there")
        found.update(dict.fromkeys(matches))
    return list(found)


def _is_data_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return not name.startswith(".") and name.endswith(DATA_SUFFIXES)


@dataclass
class FileReport:
    """What replaying one file did: lines read, rows handed on, lines skipped and why."""

    path: Path
    format: str = ""
    header_lines: int = 0  # 1 for CSV: file line numbers are header_lines + data lines
    lines: int = 0  # data lines read (CSV rows after the header, NDJSON lines)
    rows: int = 0  # rows put into the queues (CSV) or frames handed to the processor (NDJSON)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> lines
    skipped_by_table: Counter[tuple[str, str]] = field(default_factory=Counter)
    completed: bool = False
    note: str = ""  # why a readable file gave nothing (empty, quotes)
    error: str | None = None


@dataclass
class ReplayProgress:
    """Where a replay stands, for the progress display (read from another task; ints only)."""

    bytes_total: int = 0
    bytes_done: int = 0
    lines: int = 0
    files_total: int = 0
    files_done: int = 0
    current: str = ""


class _Skip(Exception):
    """A CSV line that cannot become a row: counted and logged, the replay goes on."""

    def __init__(self, reason: str, detail: str, symbol: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.symbol = symbol


Item = Frame | NormalizedRow | None  # None: a checkpoint
_Stream = io.BufferedReader | gzip.GzipFile


class _Reader(Protocol):
    """A csv.reader: rows, and the file line it has read up to."""

    line_num: int

    def __iter__(self) -> Iterator[list[str]]: ...

    def __next__(self) -> list[str]: ...


class FileReplaySource:
    """Frames and rows from replay files, in order; a `main_loop.Source`."""

    def __init__(self, paths: Sequence[Path], *, snapshot_interval_ms: int) -> None:
        self.paths = tuple(paths)
        self.snapshot_interval_ms = snapshot_interval_ms
        self.reports: list[FileReport] = []
        self.progress = ReplayProgress(files_total=len(self.paths))
        self.completed = False
        self._processor: DataProcessor | None = None
        self._sink: RowSink | None = None
        self._books: IncrementalBooks | None = None
        self._stopping = False
        self._received_at = datetime_from_ns(time.time_ns())

    def __repr__(self) -> str:
        return (
            f"<FileReplaySource files={self.progress.files_done}/{len(self.paths)}"
            f" lines={self.progress.lines} completed={self.completed}>"
        )

    def attach(self, processor: DataProcessor, sink: RowSink) -> None:
        """Use the pipeline's processor (depth, tickers, trade ids) and queues for CSV rows."""
        self._processor = processor
        self._sink = sink
        self._books = IncrementalBooks(processor.orderbook_levels, self.snapshot_interval_ms)

    async def stop(self) -> None:
        """Stop reading at the next checkpoint; what was read is still stored."""
        self._stopping = True

    async def frames(self) -> AsyncIterator[Frame]:
        """Yield NDJSON lines as frames and put CSV rows into the sink, file after file."""
        if self._processor is None or self._sink is None:
            raise RuntimeError("FileReplaySource.attach() must be called before frames()")
        self.progress.bytes_total = sum(_size(path) for path in self.paths)
        for path in self.paths:
            if self._stopping:
                return
            report = FileReport(path)
            self.reports.append(report)
            self.progress.current = str(path)
            async for frame in self._replay_file(path, report):
                yield frame
            if self._stopping:
                return
            report.completed = True
            self.progress.files_done += 1
            _log_file_done(report)
        self.completed = True

    async def _replay_file(self, path: Path, report: FileReport) -> AsyncIterator[Frame]:
        bytes_before = self.progress.bytes_done
        self._received_at = datetime_from_ns(time.time_ns())
        try:
            with contextlib.ExitStack() as open_files:
                stream, raw = open_files.enter_context(_open_decompressed(path))
                position = raw.tell
                for item in self._items(stream, report, open_files):
                    if item is None:
                        self.progress.bytes_done = bytes_before + position()
                        self._received_at = datetime_from_ns(time.time_ns())
                        await asyncio.sleep(0)
                        if self._stopping:
                            return
                    elif isinstance(item, Frame):
                        yield item
                    else:
                        await self._put(item)
        except BadInputFile as exc:
            report.error = str(exc)
            raise
        except _READ_ERRORS as exc:
            report.error = _read_error_text(path, report.header_lines + report.lines, exc)
            raise BadInputFile(report.error) from exc
        self.progress.bytes_done = bytes_before + _size(path)

    async def _put(self, item: NormalizedRow) -> None:
        assert self._sink is not None
        await self._sink.put(item.kind, item.ticker, item.row)

    def _items(
        self, stream: _Stream, report: FileReport, open_files: contextlib.ExitStack
    ) -> Iterator[Item]:
        """Detect the format of `stream` and return the generator that reads it."""
        head = stream.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head:
            report.note = "empty file, nothing to replay"
            log.warning("%s: %s", report.path, report.note)
            return iter(())
        if head.startswith(b"{"):
            report.format = "NDJSON"
            return self._ndjson_items(stream, report)
        text = open_files.enter_context(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""))
        reader: _Reader = csv.reader(text)
        header = next(reader, [])
        report.header_lines = reader.line_num
        detected = detect_csv_format(header)
        if detected is None:
            raise BadInputFile(
                f"{report.path}: line 1: unknown header {','.join(header)[:200]!r}; expected a "
                "Tardis CSV (trades, book_snapshot_N, incremental_book_L2) or NDJSON of "
                "normalized Tardis Machine messages"
            )
        report.format = str(detected)
        log.info("Replaying %s (%s)", report.path, detected)
        if detected.format == "trades":
            return self._csv_items(reader, report, "trade", self._trade_row)
        if detected.format == "book_snapshot":
            levels = detected.levels
            return self._csv_items(
                reader, report, "orderbook", lambda record: self._book_row(record, levels)
            )
        if detected.format == "incremental_book_L2":
            return self._incremental_items(reader, report)
        report.note = f"{detected}: spot stores no quotes, file skipped"
        log.warning("%s: %s", report.path, report.note)
        return iter(())

    def _ndjson_items(self, stream: _Stream, report: FileReport) -> Iterator[Item]:
        progress = self.progress
        for line in stream:
            report.lines += 1
            progress.lines += 1
            if report.lines % CHECKPOINT_LINES == 0:
                yield None
            data = line.rstrip(b"\r\n")
            if data.strip():
                report.rows += 1
                yield Frame(data, time.time_ns())

    def _csv_items(
        self,
        reader: _Reader,
        report: FileReport,
        kind: Kind,
        build: Callable[[list[str]], NormalizedRow],
    ) -> Iterator[Item]:
        assert self._processor is not None
        # CSV rows are normalized here, so they count where WebSocket rows count.
        counters, progress = self._processor.counters, self.progress
        for record in reader:
            report.lines += 1
            progress.lines += 1
            if report.lines % CHECKPOINT_LINES == 0:
                yield None
            try:
                row = build(record)
            except _Skip as skip:
                self._count_skip(report, kind, skip, reader)
                continue
            report.rows += 1
            if kind == "trade":
                counters.trades += 1
            else:
                counters.books += 1
            yield row

    def _incremental_items(self, reader: _Reader, report: FileReport) -> Iterator[Item]:
        assert self._books is not None
        books, progress = self._books, self.progress
        for record in reader:
            report.lines += 1
            progress.lines += 1
            if report.lines % CHECKPOINT_LINES == 0:
                yield None
            try:
                snapshots = books.add(*_level_change(record))
            except _Skip as skip:
                self._count_skip(report, "orderbook", skip, reader)
                continue
            yield from self._snapshot_rows(snapshots, report)
        # A file ends its last change: daily files given in order continue one another's books.
        yield from self._snapshot_rows(books.finish(), report)

    def _snapshot_rows(
        self, snapshots: list[ComputedSnapshot], report: FileReport
    ) -> Iterator[NormalizedRow]:
        assert self._processor is not None
        depth, tickers = self._processor.orderbook_levels, self._processor.tickers
        for snapshot in snapshots:
            row = book_row_us(
                snapshot.exchange,
                snapshot.symbol,
                snapshot.timestamp_us,
                snapshot.local_timestamp_us,
                _columns(snapshot.bids),
                _columns(snapshot.asks),
                depth,
                self._received_at,
            )
            report.rows += 1
            self._processor.counters.books += 1
            yield NormalizedRow("orderbook", tickers(snapshot.symbol), row)

    def _trade_row(self, record: list[str]) -> NormalizedRow:
        assert self._processor is not None
        if len(record) != len(TRADES_HEADER):
            raise _wrong_columns(record, len(TRADES_HEADER))
        exchange, symbol, _, _, trade_id, side, _, _ = record
        timestamp_us, local_timestamp_us = _timestamps(record)
        price = _number(record, 6, "price")
        amount = _number(record, 7, "amount")
        if not trade_id:
            # The pipeline's own TradeIds, so a CSV and a WebSocket replay of the same trades
            # store the same ids.
            trade_id = self._processor.trade_ids.derive(
                exchange, symbol, timestamp_us, price, amount, side
            )
        try:
            row = trade_row_us(
                exchange,
                symbol,
                trade_id,
                side,
                price,
                amount,
                timestamp_us,
                local_timestamp_us,
                self._received_at,
            )
        except InvalidMessage as invalid:
            raise _Skip(invalid.reason, str(invalid), symbol) from None
        return NormalizedRow("trade", self._processor.tickers(symbol), row)

    def _book_row(self, record: list[str], levels: int) -> NormalizedRow:
        assert self._processor is not None
        if len(record) != len(_KEY) + 4 * levels:
            raise _wrong_columns(record, len(_KEY) + 4 * levels)
        depth = self._processor.orderbook_levels
        timestamp_us, local_timestamp_us = _timestamps(record)
        # Columns repeat asks[i].price, asks[i].amount, bids[i].price, bids[i].amount from 4 on;
        # levels deeper than `depth` are neither parsed nor stored.
        asks = (_levels(record, 4, depth), _levels(record, 5, depth))
        bids = (_levels(record, 6, depth), _levels(record, 7, depth))
        exchange, symbol = record[0], record[1]
        row = book_row_us(
            exchange, symbol, timestamp_us, local_timestamp_us, bids, asks, depth, self._received_at
        )
        return NormalizedRow("orderbook", self._processor.tickers(symbol), row)

    def _count_skip(self, report: FileReport, kind: Kind, skip: _Skip, reader: _Reader) -> None:
        assert self._processor is not None
        report.skipped[skip.reason] += 1
        table = _table_or_unknown(kind, skip.symbol, self._processor.tickers)
        report.skipped_by_table[table, skip.reason] += 1
        count = report.skipped[skip.reason]
        # The first few of each reason with their line, then every 1000th: visible, not a flood.
        if count <= _LOGGED_SKIPS_PER_REASON or count % 1000 == 0:
            log.warning(
                "%s:%d: skipped line (%d so far): %s", report.path, reader.line_num, count, skip
            )


def _columns(
    levels: tuple[tuple[float, float], ...],
) -> tuple[list[float | None], list[float | None]]:
    return [price for price, _ in levels], [amount for _, amount in levels]


def _levels(record: list[str], start: int, depth: int) -> list[float | None]:
    cells = record[start : start + 4 * depth : 4]
    try:
        return [float(cell) if cell else None for cell in cells]
    except ValueError:
        bad = next(cell for cell in cells if cell and not _is_float(cell))
        raise _Skip("not_a_number", f"book level {bad!r}", record[1]) from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(record: list[str], index: int, name: str) -> float:
    try:
        return float(record[index])
    except ValueError:
        raise _Skip("not_a_number", f"{name} {record[index]!r}", record[1]) from None


def _timestamps(record: list[str]) -> tuple[int, int]:
    try:
        timestamp_us, local_timestamp_us = int(record[2]), int(record[3])
    except ValueError:
        raise _Skip("bad_timestamp", f"{record[2]!r}, {record[3]!r}", record[1]) from None
    if not (_FIRST_US <= timestamp_us <= _LAST_US and _FIRST_US <= local_timestamp_us <= _LAST_US):
        raise _Skip("bad_timestamp", f"{record[2]!r}, {record[3]!r}", record[1])
    return timestamp_us, local_timestamp_us


def _level_change(record: list[str]) -> tuple[str, str, int, int, bool, tuple[bool, float, float]]:
    if len(record) != len(INCREMENTAL_HEADER):
        raise _wrong_columns(record, len(INCREMENTAL_HEADER))
    exchange, symbol, _, _, is_snapshot_text, side, _, _ = record
    timestamp_us, local_timestamp_us = _timestamps(record)
    is_snapshot = _BOOL.get(is_snapshot_text)
    if is_snapshot is None:
        raise _Skip("invalid_is_snapshot", repr(is_snapshot_text), symbol)
    is_bid = _SIDES.get(side)
    if is_bid is None:
        raise _Skip("invalid_side", repr(side), symbol)
    price = _number(record, 6, "price")
    amount = _number(record, 7, "amount")
    if not (price > 0 and math.isfinite(price)):
        raise _Skip("invalid_price", repr(price), symbol)
    if not (amount >= 0 and math.isfinite(amount)):
        raise _Skip("invalid_amount", repr(amount), symbol)
    return exchange, symbol, timestamp_us, local_timestamp_us, is_snapshot, (is_bid, price, amount)


def _wrong_columns(record: list[str], expected: int) -> _Skip:
    symbol = record[1] if len(record) > 1 else ""
    return _Skip("wrong_column_count", f"{len(record)} columns, expected {expected}", symbol)


def _table_or_unknown(kind: Kind, symbol: str, tickers: Callable[[str], str]) -> str:
    if not symbol:
        return "(unknown)"
    try:
        return table_name(kind, tickers(symbol))
    except ValueError:
        return "(unknown)"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@contextlib.contextmanager
def _open_decompressed(path: Path) -> Iterator[tuple[_Stream, io.BufferedReader]]:
    """Open `path` as a byte stream, gunzipped when its first bytes say gzip; also the raw file."""
    with open(path, "rb") as raw:
        if raw.peek(2)[:2] != GZIP_MAGIC:
            yield raw, raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped, raw


def _read_error_text(path: Path, lines: int, exc: BaseException) -> str:
    if isinstance(exc, EOFError | zlib.error | gzip.BadGzipFile):
        what = "truncated or corrupt gzip"
    elif isinstance(exc, UnicodeDecodeError):
        what = "not UTF-8 text"
    elif isinstance(exc, csv.Error):
        what = "unreadable CSV"
    else:
        what = "cannot read"
    return f"{path}: {what} after line {lines + 1}: {exc}"


def _log_file_done(report: FileReport) -> None:
    log.info(
        "Replayed %s (%s): %d lines, %d rows, skipped %s",
        report.path,
        report.format or "empty",
        report.lines,
        report.rows,
        dict(report.skipped) or "none",
    )
