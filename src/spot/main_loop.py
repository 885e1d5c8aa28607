"""The controller: open the database, run source → processor → queues → writers, shut down.

Read top to bottom, `run` is the pipeline. Shutdown order (SIGINT/SIGTERM, replay complete, or a
fatal source error): stop reading → close the queues → every writer drains its queue into
PostgreSQL → close the pool. A source error is raised only after everything it delivered is stored.

Delivery: every row accepted from the source ends in PostgreSQL once, or in fallback storage (the
spill) until it is recovered. Writers retry; a batch PostgreSQL does not take within
`fallback.spill_after_secs` is spilled, and so is everything still unwritten `shutdown_timeout_secs`
after the input ends (or a signal came). Spills are re-ingested in the background once PostgreSQL
answers, once more at shutdown, and by `spot recover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from spot.config import Settings, load_settings
from spot.data_processor import DataProcessor, ProcessorCounters
from spot.db_writer import PostgreSQLDatabase, QueueProcessor, WriterCounters
from spot.embedded_database import EmbeddedPostgres
from spot.errors import ConfigError, DatabaseUnavailable, SpotError
from spot.fallback_storage import FallbackStorage, SpillBuffer, open_fallback
from spot.file_replay import FileReplaySource
from spot.gaps import DisconnectGaps, GapRecorder
from spot.health import HealthServer
from spot.http_replay import HttpReplaySource
from spot.messages import Frame
from spot.queue_manager import Batch, QueueManager
from spot.recovery import Recoverer, RecoveryCounters, columns_of
from spot.stream_health import HealthSnapshot, PipelineView, StreamHealth, TableStatus
from spot.symbol_refresh import ConfigWatcher, Handover, RefreshPlan, plan_refresh
from spot.tables import Kind, Row, table_name
from spot.tickers import TickerNormalizer
from spot.websocket import Gap, TardisMachineSource

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
    rows_overflowed: int = 0  # stream mode: spilled from full queues, not through a writer
    rows_overflow_lost: int = 0
    recovery: RecoveryCounters = field(default_factory=RecoveryCounters)
    spills_left: bool = False  # spills still wait for PostgreSQL after this run
    gaps: int = 0

    @property
    def rows_inserted(self) -> int:
        return sum(counters.rows_inserted for counters in self.writers.values())

    @property
    def rows_spilled(self) -> int:
        """Rows written to fallback storage (some may have been recovered since)."""
        spilled = sum(counters.rows_spilled for counters in self.writers.values())
        return spilled + self.rows_overflowed

    @property
    def rows_lost(self) -> int:
        """Rows that reached neither PostgreSQL nor the spill (both failed at the deadline)."""
        lost = sum(counters.rows_lost for counters in self.writers.values())
        return lost + self.rows_overflow_lost


@dataclass
class Subscription:
    """One source with its own processor: derived trade ids are per-stream state."""

    settings: Settings
    source: Source
    processor: DataProcessor
    accept: Callable[[Kind, Row], bool] | None = None  # set while a refresh hands symbols over
    error: Exception | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def data_types(settings: Settings) -> list[str]:
    """Return the Tardis Machine data types spot asks for."""
    return ["trade", settings.book.data_type]


def tardis_source(settings: Settings) -> TardisMachineSource | HttpReplaySource:
    """Return the Tardis Machine source the settings describe (WebSocket, or HTTP replay)."""
    if not settings.exchanges:
        raise ConfigError(
            "no [[exchanges]] configured: Tardis Machine needs at least one exchange and its "
            "symbols (see spot.example.toml)"
        )
    if settings.tardis.transport == "http":
        return HttpReplaySource(settings.tardis, settings.exchanges, data_types(settings))
    return TardisMachineSource(settings.tardis, settings.exchanges, data_types(settings))


async def run(
    settings: Settings,
    source: Source | None = None,
    *,
    handle_signals: bool = False,
    prepare: Callable[[Pipeline], None] | None = None,
    config_path: Path | None = None,
) -> RunSummary:
    """Run the pipeline until the source ends or a signal stops it; return what happened.

    `prepare` sees the wired pipeline before it starts (file replay attaches its rows there).
    With `config_path`, a stream follows changes of its symbols (SIGHUP, or the file changing).
    """
    source = source or tardis_source(settings)  # config errors before any server starts
    async with _database_url(settings) as url:
        db = PostgreSQLDatabase(
            url,
            settings.book.orderbook_levels,
            pool_size=settings.database.pool_size,
            connect_timeout_secs=settings.database.connect_timeout_secs,
            # With a spill to fall back on, an outage at start is just an outage.
            require_connection=not settings.fallback.enabled,
        )
        async with db:
            pipeline = Pipeline(settings, db, source)
            if prepare is not None:
                prepare(pipeline)
            if config_path is not None:
                pipeline.watch_config(config_path, sighup=handle_signals)
            await pipeline.create_configured_tables()
            async with _health_endpoint(pipeline):
                with _signals_stop(pipeline, enabled=handle_signals):
                    return await pipeline.run()


@contextlib.asynccontextmanager
async def _health_endpoint(pipeline: Pipeline) -> AsyncIterator[HealthServer | None]:
    """Serve /metrics, /health and / while the pipeline runs (and drains)."""
    config = pipeline.settings.health
    if pipeline.monitor is None or not config.http:
        yield None
        return
    server = HealthServer(config, pipeline.health_snapshot)
    try:
        await server.start()
    except OSError as exc:  # ingesting matters more than being watched
        log.error("[✗] Health endpoint not started on %s:%d: %s", config.host, config.port, exc)
        yield None
        return
    try:
        yield server
    finally:
        await server.aclose()


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
        self.fallback: FallbackStorage | None = None
        self.overflow: SpillBuffer | None = None
        self.recoverer: Recoverer | None = None
        if settings.fallback.enabled:
            self.fallback = open_fallback(settings.fallback)
            self.overflow = SpillBuffer(
                self.fallback,
                self._columns,
                max_rows=settings.fallback.buffer_rows,
                max_age_secs=settings.fallback.buffer_secs,
            )
            self.recoverer = Recoverer(
                db,
                self.fallback,
                settings.book.orderbook_levels,
                settings.fallback.recover_interval_secs,
            )
        self.queues = QueueManager(
            settings.queue.capacity,
            settings.tardis.mode,
            stream_put_timeout_secs=settings.queue.stream_put_timeout_secs,
            on_new_queue=self._start_writer,
            on_overflow=self.overflow.add if self.overflow else None,
        )
        self.gaps = GapRecorder(db, self.fallback)
        self.monitor: StreamHealth | None = None
        if settings.health.enabled:
            names = [exchange.name for exchange in settings.exchanges]
            self.monitor = StreamHealth(settings.health, settings.tardis.mode, names)
        self._wire(source)
        self.current = Subscription(settings, source, self.processor)
        self.subscriptions = [self.current]
        self.watcher: ConfigWatcher | None = None
        self._sighup = False
        self._refreshing = asyncio.Lock()
        self._stopping = False
        self.writers: dict[str, QueueProcessor] = {}
        self._writer_tasks: dict[str, asyncio.Task[None]] = {}
        self._task_group: asyncio.TaskGroup | None = None
        self._pending_tables: list[str] = []
        self._deadline_at: float | None = None
        self._deadline_task: asyncio.Task[None] | None = None
        self._spilling_all = False
        self.summary = RunSummary()

    def __repr__(self) -> str:
        return f"<Pipeline {self.source!r} {self.queues!r} writers={len(self.writers)}>"

    async def create_configured_tables(self) -> None:
        """Create (and check) the tables of every configured symbol before reading anything."""
        tickers = self.processor.tickers
        try:
            for exchange in self.settings.exchanges:
                for symbol in exchange.symbols:
                    await self.db.ensure_table(table_name("orderbook", tickers(symbol)))
                    await self.db.ensure_table(table_name("trade", tickers(symbol)))
        except DatabaseUnavailable:
            if self.fallback is None:
                raise
            # Each table is created by its first write, whenever PostgreSQL is back.
            log.warning("[!] PostgreSQL is unavailable: spilling to %s", self.fallback.url)

    async def run(self) -> RunSummary:
        """Read until the source ends, then drain every queue; re-raise a source error after."""
        source_error: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as task_group:
                self._task_group = task_group
                for table in self._pending_tables:
                    self._start_writer(table)
                helpers = self._start_helpers(task_group)
                source_error = await self._read()
                if source_error is None:
                    self.summary.completed = not self.summary.stopped_by_signal
                else:  # stored rows first, then the error
                    log.error(
                        "Source failed: %s; storing what was received before stopping",
                        source_error,
                    )
                self._start_deadline()
                await self.queues.close()
                await self._drain(helpers)
        except ExceptionGroup as group:
            raise _first_spot_error(group) from group
        self._summarize()
        if source_error is not None:
            raise source_error
        return self.summary

    async def stop(self) -> None:
        """Stop reading; what was read is still written (or spilled by the deadline)."""
        self.summary.stopped_by_signal = True
        self._stopping = True
        self._start_deadline()
        for subscription in self.subscriptions:
            await subscription.source.stop()

    # Reading: one subscription at a time, two while a refresh hands symbols over.

    def _wire(self, source: Source) -> None:
        if isinstance(source, TardisMachineSource) and source.on_gap is None:
            source.on_gap = self._on_source_gap

    def _on_source_gap(self, gap: Gap) -> None:
        self.gaps.on_source_gap(gap)
        if self.monitor is not None:
            self.monitor.record_gap(gap.exchanges, (gap.end - gap.start).total_seconds())

    async def _read(self) -> Exception | None:
        """Read until the current subscription ends (a refresh replaces it); return its error."""
        assert self._task_group is not None
        operations = []
        if self.monitor is not None:
            watch = self.monitor.run_watch(self._watch_view)
            operations.append(self._task_group.create_task(watch, name="stream health"))
        if self.watcher is not None:
            operations.append(self._task_group.create_task(self.watcher.run(), name="config"))
        self._start_reading(self.current)
        sighup = self.watcher.on_sighup() if self.watcher and self._sighup else None
        with sighup or contextlib.nullcontext():
            while True:
                subscription = self.current
                await subscription.done.wait()
                if subscription is self.current:
                    break
        self._stopping = True
        for task in operations:
            task.cancel()
        for other in self.subscriptions:
            if not other.done.is_set():
                await other.source.stop()
                await other.done.wait()
        return self.current.error

    def _start_reading(self, subscription: Subscription) -> None:
        assert self._task_group is not None
        self._task_group.create_task(self._read_subscription(subscription), name="reader")

    async def _read_subscription(self, subscription: Subscription) -> None:
        processor = subscription.processor
        observe = self.monitor.observe if self.monitor is not None else None
        sink = DisconnectGaps(processor, self.queues, self.gaps.record)
        try:
            async for frame in subscription.source.frames():
                normalized = processor.process(frame)
                if normalized is None:
                    continue
                kind, row = normalized.kind, normalized.row
                if observe is not None:
                    observe(kind, row, frame.received_ns)
                # Read per row: a refresh sets and clears it while this loop runs.
                if subscription.accept is not None and not subscription.accept(kind, row):
                    continue
                await sink.put(kind, normalized.ticker, row)
        except Exception as exc:  # the pipeline raises it after storing what came before
            subscription.error = exc
        finally:
            sink.close()
            subscription.done.set()

    # Symbol refresh (stream mode): a new subscription, a handover, the old one stopped.

    def watch_config(self, path: Path, *, sighup: bool) -> None:
        """Refresh the symbols when `path` changes (polled) and, with `sighup`, on SIGHUP."""
        refresh = self.settings.refresh
        self.watcher = ConfigWatcher(
            path,
            lambda: load_settings(path, os.environ),
            self.refresh,
            poll_secs=refresh.poll_secs if refresh.watch_config else None,
        )
        self._sighup = sighup

    async def refresh(self, loaded: Settings) -> bool:
        """Switch to `loaded`'s exchanges and symbols; return False when nothing changed.

        Raises ConfigError when the change cannot be made live; the running set goes on.
        """
        if self.settings.tardis.mode != "stream":
            raise ConfigError(
                "symbol refresh works in stream mode only: a replay keeps its symbols"
            )
        async with self._refreshing:
            plan = plan_refresh(self.current.settings, loaded)
            if plan is None or self._stopping:
                log.info("[↻] Config read again: no change to exchanges, symbols or the source")
                return False
            if plan.needs_restart:
                log.warning("[↻] Not applied until a restart: %s", ", ".join(plan.needs_restart))
            started = time.monotonic()
            await self._switch(plan)
            log.info(
                "[↻] Symbols refreshed in %.1fs: added %s, removed %s, %d kept without a gap",
                time.monotonic() - started,
                _symbols_text(plan.added),
                _symbols_text(plan.removed),
                len(plan.kept),
            )
            return True

    async def _switch(self, plan: RefreshPlan) -> None:
        settings = plan.settings
        processor = DataProcessor(
            settings.book.orderbook_levels, TickerNormalizer(settings.ticker_overrides)
        )
        processor.counters = self.processor.counters  # one set of totals across subscriptions
        await self._create_tables(processor, plan)
        handover = Handover(plan.kept)
        old = self.current
        new = Subscription(settings, tardis_source(settings), processor, handover.accept_new)
        self._wire(new.source)
        old.accept = handover.accept_old
        self.subscriptions.append(new)
        if self.monitor is not None:
            self.monitor.watch(exchange.name for exchange in settings.exchanges)
        self._start_reading(new)
        timeout = self.settings.refresh.handover_timeout_secs
        if not await handover.wait(timeout) and not handover.new_live:
            await new.source.stop()
            old.accept = None
            raise ConfigError(f"the new subscription sent nothing in {timeout:.0f}s")
        if handover.pending():
            log.warning(
                "[↻] Not handed over in %.0fs, a gap is possible: %s", timeout, handover.pending()
            )
        handover.closing = True
        self.current = new
        await old.source.stop()
        await old.done.wait()  # its rows are queued: the writers store them
        new.accept = None
        self.settings = settings
        if self.monitor is not None:
            current = {exchange.name for exchange in settings.exchanges}
            self.monitor.unwatch(name for name, _ in plan.removed if name not in current)

    async def _create_tables(self, processor: DataProcessor, plan: RefreshPlan) -> None:
        try:
            for _, symbol in sorted(plan.added):
                ticker = processor.tickers(symbol)
                await self.db.ensure_table(table_name("orderbook", ticker))
                await self.db.ensure_table(table_name("trade", ticker))
        except DatabaseUnavailable as exc:  # each table is also created by its first write
            log.warning("[↻] Tables of the new symbols not created yet: %s", exc)

    # Health: read the counters that exist, when asked.

    def health_snapshot(self) -> HealthSnapshot:
        """Return the stream health with the pipeline's counters (for /health and /metrics)."""
        assert self.monitor is not None, "health is off ([health] enabled = false)"
        return self.monitor.snapshot(self._pipeline_view())

    def _connected(self) -> frozenset[str]:
        names: set[str] = set()
        for subscription in self.subscriptions:
            source = subscription.source
            if subscription.done.is_set():
                continue
            if not isinstance(source, TardisMachineSource):
                names.update(self.monitor.exchanges if self.monitor else ())  # files: always there
            elif source.connected:
                names.update(exchange.name for exchange in source.exchanges)
        return frozenset(names)

    def _watch_view(self) -> tuple[frozenset[str], dict[str, int]]:
        return self._connected(), dict(self.processor.counters.disconnects_by_exchange)

    def _pipeline_view(self) -> PipelineView:
        counters = self.processor.counters
        reconnects: dict[str, int] = {}
        for subscription in self.subscriptions:
            source = subscription.source
            if isinstance(source, TardisMachineSource):
                for exchange in source.exchanges:
                    reconnects[exchange.name] = reconnects.get(exchange.name, 0) + max(
                        source.connects - 1, 0
                    )
        return PipelineView(
            connected=self._connected(),
            reconnects=reconnects,
            disconnects=dict(counters.disconnects_by_exchange),
            frames=counters.frames,
            parse_errors=dict(counters.invalid),
            skipped_types=dict(counters.skipped_types),
            rows_overflowed=self.queues.overflowed_rows,
            config_reloads=dict(self.watcher.reloads) if self.watcher else {},
            tables=tuple(self._table_status(table) for table in sorted(self.writers)),
        )

    def _table_status(self, table: str) -> TableStatus:
        counters = self.writers[table].counters
        return TableStatus(
            table=table,
            queue_depth=self.queues.depth(table),
            batches=counters.batches,
            rows_inserted=counters.rows_inserted,
            rows_duplicate=counters.rows_duplicate,
            retries=counters.retries,
            rows_spilled=counters.rows_spilled,
            commit_lag=counters.commit_lag.view(),
        )

    def _start_helpers(self, task_group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        helpers = [task_group.create_task(self.gaps.run(), name="gaps")]
        if self.overflow is not None:
            helpers.append(task_group.create_task(self.overflow.run(), name="overflow spill"))
        if self.recoverer is not None:
            helpers.append(task_group.create_task(self.recoverer.run(), name="spill recovery"))
        return helpers

    def _start_deadline(self) -> None:
        if self._deadline_task is not None or self._task_group is None:
            return
        self._deadline_at = asyncio.get_running_loop().time() + self.settings.shutdown_timeout_secs
        self._deadline_task = self._task_group.create_task(
            self._spill_at_deadline(), name="shutdown deadline"
        )

    async def _spill_at_deadline(self) -> None:
        await asyncio.sleep(self.settings.shutdown_timeout_secs)
        self._spilling_all = True
        busy = [table for table, task in self._writer_tasks.items() if not task.done()]
        if busy:
            log.warning(
                "[!] PostgreSQL took not everything within %.0fs: spilling the rest of %s",
                self.settings.shutdown_timeout_secs,
                ", ".join(busy),
            )
        for writer in self.writers.values():
            writer.spill_now()

    async def _drain(self, helpers: list[asyncio.Task[None]]) -> None:
        """Wait for the writers (the deadline bounds them), then flush the spill and recover."""
        while not all(task.done() for task in self._writer_tasks.values()):
            await asyncio.wait(list(self._writer_tasks.values()))  # a writer may start meanwhile
        self.gaps.close()
        if self.overflow is not None:
            self.overflow.close()
        if self.recoverer is not None:
            self.recoverer.stop()
        await asyncio.wait(helpers)
        await self.gaps.finish()
        if self.recoverer is not None:
            remaining = (self._deadline_at or 0.0) - asyncio.get_running_loop().time()
            self.summary.spills_left = not await self.recoverer.finish(max(remaining, 0.0))
        if self._deadline_task is not None:
            self._deadline_task.cancel()

    def _columns(self, table: str) -> tuple[tuple[str, str], ...]:
        return columns_of(table, self.settings.book.orderbook_levels)

    async def _spill(self, table: str, rows: Batch) -> None:
        assert self.fallback is not None
        await self.fallback.write(
            table, self._columns(table), rows, reason="PostgreSQL unavailable"
        )

    async def _reject(self, table: str, rows: Batch, reason: str) -> None:
        assert self.fallback is not None
        await self.fallback.write(table, self._columns(table), rows, area="rejected", reason=reason)

    def _start_writer(self, table: str) -> None:
        if self._task_group is None:
            self._pending_tables.append(table)
            return
        queue = self.settings.queue
        fallback = self.fallback is not None
        writer = QueueProcessor(
            self.db,
            table,
            self.queues.batches(table, queue.batch_size, queue.flush_interval_secs),
            spill_after_secs=self.settings.fallback.spill_after_secs,
            spill=self._spill if fallback else None,
            reject=self._reject if fallback else None,
        )
        if self._spilling_all:
            writer.spill_now()
        self.writers[table] = writer
        task = self._task_group.create_task(writer.run(), name=f"writer {table}")
        self._writer_tasks[table] = task

    def _summarize(self) -> None:
        summary = self.summary
        summary.processor = self.processor.counters
        summary.writers = {table: w.counters for table, w in self.writers.items()}
        if self.overflow is not None:
            summary.rows_overflowed = self.overflow.rows_spilled
            summary.rows_overflow_lost = self.overflow.rows_lost
        if self.recoverer is not None:
            summary.recovery = self.recoverer.counters
        summary.gaps = self.gaps.recorded
        counters = self.processor.counters
        log.info(
            "Run finished: %d frames, %d trades, %d book snapshots, %d rows inserted, "
            "%d disconnects, skipped %s, invalid %s",
            counters.frames,
            counters.trades,
            counters.books,
            summary.rows_inserted,
            counters.disconnects,
            dict(counters.skipped_types) or "none",
            dict(counters.invalid) or "none",
        )
        self._log_delivery()

    def _log_delivery(self) -> None:
        summary = self.summary
        rejected = sum(w.rows_rejected for w in summary.writers.values())
        log.info(
            "Delivery: %d rows spilled, %d recovered from spills, %d rejected by PostgreSQL, "
            "%d lost, %d gaps; spills left: %s",
            summary.rows_spilled,
            summary.recovery.rows_inserted + summary.recovery.rows_duplicate,
            rejected,
            summary.rows_lost,
            summary.gaps,
            f"yes, at {self.fallback.url}" if summary.spills_left and self.fallback else "none",
        )


def _first_spot_error(group: ExceptionGroup[Exception]) -> Exception:
    """Return the SpotError that stopped a task (a writer's SchemaMismatch, say), or the group.

    The TaskGroup wraps it; callers and users want the error itself, with its message.
    """
    spot_errors = group.subgroup(SpotError)
    if spot_errors is None:
        return group
    first: BaseException = spot_errors
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, Exception)
    return first


def _symbols_text(symbols: frozenset[tuple[str, str]]) -> str:
    return ", ".join(f"{exchange}:{symbol}" for exchange, symbol in sorted(symbols)) or "none"


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
