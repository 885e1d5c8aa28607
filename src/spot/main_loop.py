"""The controller: open the database, run source → processor → queues → writers, shut down.

Read top to bottom, `run` is the pipeline. Shutdown order (SIGINT/SIGTERM, replay complete, or a
fatal source error): stop reading → close the queues → every writer drains its queue into
PostgreSQL → close the pool. A source error is raised only after everything it delivered is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from spot.config import Settings
from spot.data_processor import DataProcessor, ProcessorCounters
from spot.db_writer import PostgreSQLDatabase, QueueProcessor, WriterCounters
from spot.embedded_database import EmbeddedPostgres
from spot.file_replay import FileReplaySource
from spot.http_replay import HttpReplaySource
from spot.messages import Frame
from spot.queue_manager import QueueManager
from spot.tables import table_name
from spot.tickers import TickerNormalizer
from spot.websocket import TardisMachineSource

log = logging.getLogger(__name__)


class Source(Protocol):
    """What main_loop needs of a source: frames, and a way to stop them."""

    def frames(self) -> AsyncIterator[Frame]: ...

    async def stop(self) -> None: ...


@dataclass
class RunSummary:
    """What one run did, for the CLI, the tests and the exit code."""

    completed: bool = False
    stopped_by_signal: bool = False
    processor: ProcessorCounters = field(default_factory=ProcessorCounters)
    writers: dict[str, WriterCounters] = field(default_factory=dict)

    @property
    def rows_inserted(self) -> int:
        return sum(counters.rows_inserted for counters in self.writers.values())


def data_types(settings: Settings) -> list[str]:
    """Return the Tardis Machine data types spot asks for."""
    return ["trade", settings.book.data_type]


def tardis_source(settings: Settings) -> TardisMachineSource | HttpReplaySource:
    """Return the Tardis Machine source the settings describe (WebSocket, or HTTP replay)."""
    if settings.tardis.transport == "http":
        return HttpReplaySource(settings.tardis, settings.exchanges, data_types(settings))
    return TardisMachineSource(settings.tardis, settings.exchanges, data_types(settings))


async def run(
    settings: Settings,
    source: Source | None = None,
    *,
    handle_signals: bool = False,
    prepare: Callable[[Pipeline], None] | None = None,
) -> RunSummary:
    """Run the pipeline until the source ends or a signal stops it; return what happened.

    `prepare` sees the wired pipeline before it starts (file replay attaches its rows there).
    """
    async with _database_url(settings) as url:
        db = PostgreSQLDatabase(
            url,
            settings.book.orderbook_levels,
            pool_size=settings.database.pool_size,
            connect_timeout_secs=settings.database.connect_timeout_secs,
        )
        async with db:
            pipeline = Pipeline(settings, db, source or tardis_source(settings))
            if prepare is not None:
                prepare(pipeline)
            await pipeline.create_configured_tables()
            with _signals_stop(pipeline, enabled=handle_signals):
                return await pipeline.run()


async def run_files(
    settings: Settings,
    source: FileReplaySource,
    *,
    handle_signals: bool = False,
    on_start: Callable[[Pipeline], None] | None = None,
) -> RunSummary:
    """Replay files through the same pipeline: NDJSON lines as frames, CSV rows into the queues.

    A bad file raises BadInputFile after the rows read before it are stored.
    """

    def prepare(pipeline: Pipeline) -> None:
        # A file waits for the database, whatever tardis.mode says: nothing may overflow.
        pipeline.queues.mode = "replay"
        source.attach(pipeline.processor, pipeline.queues)
        if on_start is not None:
            on_start(pipeline)

    return await run(settings, source, handle_signals=handle_signals, prepare=prepare)


@contextlib.asynccontextmanager
async def _database_url(settings: Settings) -> AsyncIterator[str]:
    if settings.database.url:
        yield settings.database.url
        return
    data_dir = settings.database.embedded_data_dir
    async with EmbeddedPostgres(Path(data_dir) if data_dir else None) as embedded:
        log.info("[+] No database.url configured: using embedded PostgreSQL at %s", embedded.url)
        yield embedded.url


class Pipeline:
    """One run's parts, wired: source → processor → queues → one writer per table."""

    def __init__(self, settings: Settings, db: PostgreSQLDatabase, source: Source) -> None:
        self.settings = settings
        self.db = db
        self.source = source
        self.processor = DataProcessor(
            settings.book.orderbook_levels, TickerNormalizer(settings.ticker_overrides)
        )
        self.queues = QueueManager(
            settings.queue.capacity,
            settings.tardis.mode,
            stream_put_timeout_secs=settings.queue.stream_put_timeout_secs,
            on_new_queue=self._start_writer,
        )
        self.writers: dict[str, QueueProcessor] = {}
        self._task_group: asyncio.TaskGroup | None = None
        self._pending_tables: list[str] = []
        self.summary = RunSummary()

    def __repr__(self) -> str:
        return f"<Pipeline {self.source!r} {self.queues!r} writers={len(self.writers)}>"

    async def create_configured_tables(self) -> None:
        """Create (and check) the tables of every configured symbol before reading anything."""
        tickers = self.processor.tickers
        for exchange in self.settings.exchanges:
            for symbol in exchange.symbols:
                await self.db.ensure_table(table_name("orderbook", tickers(symbol)))
                await self.db.ensure_table(table_name("trade", tickers(symbol)))

    async def run(self) -> RunSummary:
        """Read until the source ends, then drain every queue; re-raise a source error after."""
        source_error: BaseException | None = None
        async with asyncio.TaskGroup() as task_group:
            self._task_group = task_group
            for table in self._pending_tables:
                self._start_writer(table)
            try:
                await self.processor.run(self.source.frames(), self.queues)
                self.summary.completed = not self.summary.stopped_by_signal
            except Exception as exc:  # stored rows first, then the error
                source_error = exc
                log.error("Source failed: %s; storing what was received before stopping", exc)
            await self.queues.close()
        self._summarize()
        if source_error is not None:
            raise source_error
        return self.summary

    async def stop(self) -> None:
        """Stop reading; what was read is still written."""
        self.summary.stopped_by_signal = True
        await self.source.stop()

    def _start_writer(self, table: str) -> None:
        if self._task_group is None:
            self._pending_tables.append(table)
            return
        queue = self.settings.queue
        writer = QueueProcessor(
            self.db,
            table,
            self.queues.batches(table, queue.batch_size, queue.flush_interval_secs),
        )
        self.writers[table] = writer
        self._task_group.create_task(writer.run(), name=f"writer {table}")

    def _summarize(self) -> None:
        self.summary.processor = self.processor.counters
        self.summary.writers = {table: w.counters for table, w in self.writers.items()}
        counters = self.processor.counters
        log.info(
            "Run finished: %d frames, %d trades, %d book snapshots, %d rows inserted, "
            "%d disconnects, skipped %s, invalid %s",
            counters.frames,
            counters.trades,
            counters.books,
            self.summary.rows_inserted,
            counters.disconnects,
            dict(counters.skipped_types) or "none",
            dict(counters.invalid) or "none",
        )


@contextlib.contextmanager
def _signals_stop(pipeline: Pipeline, *, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def request_stop(signum: signal.Signals) -> None:
        log.warning("[!] %s: stop reading, drain the queues, flush, close", signum.name)
        stopping.append(loop.create_task(pipeline.stop()))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_stop, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
