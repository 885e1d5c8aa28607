"""PostgreSQL sink: `PostgreSQLDatabase` (pool, schema, COPY) and `QueueProcessor` (batch writer).

Writes are binary COPY. Every table has a primary key, so a batch written twice (a retry after an
ambiguous failure, a replay run again, a spill recovered) leaves one copy of each row: the batch is
first COPYed straight into the table, and only when that hits a duplicate key is it written again
through a temporary table with `ON CONFLICT DO NOTHING` — a duplicate never costs other rows.

A batch PostgreSQL refuses for its contents (a data error: a NUL byte, a wrong type) is split in
halves until the bad rows are isolated; they go to `reject`, the rest is written. A batch that
cannot reach PostgreSQL is retried with backoff and jitter, then spilled (`spill`) once
`spill_after_secs` have passed or `spill_now()` was called (the shutdown deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from spot.errors import ConfigError, DatabaseUnavailable, RowsRejected, SpillError, SpotError
from spot.stream_health import LatencyHistogram, unix_us
from spot.tables import Row, TableLayout, check_book_levels, column_types, layout_for

log = logging.getLogger(__name__)

Batch = list[Row]

# What PostgreSQL (or psycopg's dumpers, client side) raise for the contents of a batch: retrying
# the same rows cannot help. Connection failures are OperationalError, translated separately.
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError, OverflowError)

# Refusals that pass by themselves: PostgreSQL restarting, recovering, or out of connections.
_TRANSIENT_REFUSALS = ("starting up", "shutting down", "in recovery", "too many", "slots")

GAPS_TABLE = "spot_gaps"
# Times without data: Tardis Machine `disconnect` messages and stream reconnects.
GAP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("exchange", "text NOT NULL"),
    ("gap_start", "timestamptz NOT NULL"),
    ("gap_end", "timestamptz NOT NULL"),
    ("reason", "text NOT NULL"),
    ("recorded_at", "timestamptz NOT NULL"),
)
_GAPS_DDL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (exchange text NOT NULL, gap_start timestamptz NOT NULL,"
    " gap_end timestamptz NOT NULL, reason text NOT NULL, recorded_at timestamptz NOT NULL,"
    " PRIMARY KEY (exchange, gap_start, reason))"
).format(sql.Identifier(GAPS_TABLE))
_GAPS_INSERT = sql.SQL(
    "INSERT INTO {} (exchange, gap_start, gap_end, reason, recorded_at)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
).format(sql.Identifier(GAPS_TABLE))


def redact_dsn(url: str) -> str:
    """Return `url` with any password replaced, for logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if info.get("password"):
        info["password"] = "***"
    return psycopg.conninfo.make_conninfo("", **info)


class PostgreSQLDatabase:
    """A connection pool, the tables spot writes, and idempotent binary COPY into them."""

    def __init__(
        self,
        url: str,
        orderbook_levels: int,
        *,
        pool_size: int = 4,
        connect_timeout_secs: float = 10.0,
        require_connection: bool = True,
    ) -> None:
        self.url = url
        self.orderbook_levels = orderbook_levels
        self.connect_timeout_secs = connect_timeout_secs
        # False: open() succeeds with PostgreSQL down (batches go to the spill until it is back).
        self.require_connection = require_connection
        self._gaps_table_ready = False
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=connect_timeout_secs,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout_secs))},
            reconnect_timeout=0,  # keep trying: spot retries batches itself
            name="spot",
        )
        self._layouts: dict[str, TableLayout] = {}

    def __repr__(self) -> str:
        return f"<PostgreSQLDatabase {redact_dsn(self.url)} tables={len(self._layouts)}>"

    async def __aenter__(self) -> PostgreSQLDatabase:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the pool, failing with DatabaseUnavailable when PostgreSQL cannot be reached.

        Without `require_connection` an unreachable server is only logged: the pool keeps
        connecting whenever a connection is asked for.
        """
        if not self.require_connection:
            try:
                await self._probe()
            except DatabaseUnavailable as exc:
                log.warning("[!] Starting without PostgreSQL at %s: %s", redact_dsn(self.url), exc)
            await self._pool.open(wait=False)
            return
        try:
            await self._pool.open(wait=True, timeout=self.connect_timeout_secs)
        except (PoolTimeout, psycopg.OperationalError) as exc:
            await self._pool.close()
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {redact_dsn(self.url)}: {exc}"
            ) from exc
        log.info("Connected to PostgreSQL at %s", redact_dsn(self.url))

    async def _probe(self) -> None:
        """Connect once, outside the pool, to tell an outage from a refusal."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(1, int(self.connect_timeout_secs))
            )
        except psycopg.OperationalError as exc:
            text = str(exc)
            # The server answered and refused who we are (role, password, database): spilling
            # until it changes its mind would only hide a configuration error.
            if "FATAL:" in text and not any(word in text for word in _TRANSIENT_REFUSALS):
                raise ConfigError(
                    f"PostgreSQL at {redact_dsn(self.url)} refused spot: {text}"
                ) from None
            raise DatabaseUnavailable(f"cannot connect: {text}") from exc
        await conn.close()
        log.info("Connected to PostgreSQL at %s", redact_dsn(self.url))

    async def aclose(self) -> None:
        """Close the pool; connections still busy are closed after a short grace."""
        await self._pool.close(timeout=5.0)

    async def ensure_table(self, table: str) -> TableLayout:
        """Create `table` if missing; check an existing orderbook table's level count."""
        layout = self._layouts.get(table)
        if layout is not None:
            return layout
        layout = layout_for(table, self.orderbook_levels)
        async with self._connection() as conn:
            await conn.execute(layout.create_sql())  # identifiers validated and quoted
            if layout.kind == "orderbook":
                cursor = await conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = %s",
                    (table,),
                )
                check_book_levels(
                    table, [str(row[0]) for row in await cursor.fetchall()], self.orderbook_levels
                )
        self._layouts[table] = layout
        return layout

    async def copy_rows(self, table: str, rows: Sequence[Row]) -> int:
        """Write `rows` into `table` once; return how many were new (duplicates are skipped).

        Raise RowsRejected when PostgreSQL refuses the contents; nothing of the batch is stored.
        """
        layout = await self.ensure_table(table)
        async with self._connection() as conn:
            try:
                try:
                    return await _copy_into(conn, layout, layout.name, rows)
                except psycopg.errors.UniqueViolation:
                    return await _merge_into(conn, layout, rows)
            except _DATA_ERRORS as exc:
                raise RowsRejected(f"{table}: {type(exc).__name__}: {exc}") from exc

    async def insert_gaps(self, rows: Sequence[Row]) -> int:
        """Record gap rows (GAP_COLUMNS order) in spot_gaps once; return how many were new."""
        async with self._connection() as conn:
            if not self._gaps_table_ready:
                await conn.execute(_GAPS_DDL)
                self._gaps_table_ready = True
            async with conn.transaction(), conn.cursor() as cursor:
                await cursor.executemany(_GAPS_INSERT, rows)
                return max(cursor.rowcount, 0)

    async def execute(
        self, query: str, params: Sequence[object] | None = None
    ) -> list[tuple[object, ...]]:
        """Run one statement and return its rows (for reports, gaps and tests)."""
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall() if cursor.description else []

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """Lend a pooled connection; translate connection failures into DatabaseUnavailable."""
        try:
            async with self._pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise DatabaseUnavailable(f"PostgreSQL connection failed: {exc}") from exc


async def _copy_into(
    conn: psycopg.AsyncConnection[tuple[Any, ...]],
    layout: TableLayout,
    target: str,
    rows: Sequence[Row],
) -> int:
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(target), sql.SQL(", ").join(map(sql.Identifier, layout.column_names))
    )
    async with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(column_types(layout.columns))
        for row in rows:
            await copy.write_row(row)
    return len(rows)


async def _merge_into(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], layout: TableLayout, rows: Sequence[Row]
) -> int:
    stage = "spot_stage"
    async with conn.transaction():
        await conn.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                sql.Identifier(stage), sql.Identifier(layout.name)
            )
        )
        async with conn.cursor() as cursor:
            statement = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(sql.Identifier(stage))
            async with cursor.copy(statement) as copy:
                copy.set_types(column_types(layout.columns))
                for row in rows:
                    await copy.write_row(row)
            await cursor.execute(
                sql.SQL("INSERT INTO {} SELECT * FROM {} ON CONFLICT DO NOTHING").format(
                    sql.Identifier(layout.name), sql.Identifier(stage)
                )
            )
            inserted = cursor.rowcount
    log.info(
        "%s: %d of %d rows were already stored; skipped them",
        layout.name,
        len(rows) - inserted,
        len(rows),
    )
    return inserted


async def copy_isolating(db: PostgreSQLDatabase, table: str, rows: Batch) -> tuple[int, Batch]:
    """Write `rows`; return (rows inserted, rows PostgreSQL refused).

    A refused batch is split in halves until the bad rows are alone: they never cost good rows.
    """
    try:
        return await db.copy_rows(table, rows), []
    except RowsRejected as exc:
        if len(rows) == 1:
            log.warning("Rejected a row of %s: %s", table, exc)
            return 0, rows
    middle = len(rows) // 2
    first, first_rejected = await copy_isolating(db, table, rows[:middle])
    second, second_rejected = await copy_isolating(db, table, rows[middle:])
    return first + second, first_rejected + second_rejected


@dataclass
class WriterCounters:
    """What one QueueProcessor did."""

    batches: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    retries: int = 0
    rows_spilled: int = 0
    rows_rejected: int = 0
    rows_lost: int = 0  # could reach neither PostgreSQL nor the spill by the shutdown deadline
    # spot → PostgreSQL: commit time - received_at of each batch's oldest row (stream_health).
    commit_lag: LatencyHistogram = field(default_factory=LatencyHistogram)


SpillHandler = Callable[[str, Batch], Awaitable[None]]
RejectHandler = Callable[[str, Batch, str], Awaitable[None]]


class QueueProcessor:
    """Drain one table's batches into PostgreSQL, retrying with backoff, spilling when told to.

    After a batch was spilled because PostgreSQL stayed unreachable, later batches get one try
    each before they are spilled too, until a write succeeds: a long outage does not make every
    batch wait `spill_after_secs`, so memory and the socket keep moving.
    """

    def __init__(
        self,
        db: PostgreSQLDatabase,
        table: str,
        batches: AsyncIterator[Batch],
        *,
        retry_initial_secs: float = 0.2,
        retry_max_secs: float = 10.0,
        spill_after_secs: float | None = None,
        spill: SpillHandler | None = None,
        reject: RejectHandler | None = None,
    ) -> None:
        self.db = db
        self.table = table
        self._batches = batches
        self.retry_initial_secs = retry_initial_secs
        self.retry_max_secs = retry_max_secs
        self.spill_after_secs = spill_after_secs
        self._spill = spill
        self._reject = reject
        self._give_up = asyncio.Event()
        self._outage = False
        self._outage_delay = retry_initial_secs
        self._next_try_at = 0.0
        self._orphans: set[asyncio.Task[tuple[int, Batch]]] = set()
        self.counters = WriterCounters()

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"<QueueProcessor {self.table} batches={c.batches} inserted={c.rows_inserted}"
            f" duplicate={c.rows_duplicate} retries={c.retries} spilled={c.rows_spilled}"
            f" rejected={c.rows_rejected} lost={c.rows_lost}>"
        )

    async def run(self) -> None:
        """Write every batch until the queue is closed and drained."""
        async for batch in self._batches:
            await self.write(batch)

    def spill_now(self) -> None:
        """Stop waiting for PostgreSQL: spill the batch in hand and every later one."""
        self._give_up.set()

    async def write(self, batch: Batch) -> None:
        """Write one batch, retrying while PostgreSQL is unavailable, spilling when due."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = self.retry_initial_secs
        while True:
            outcome, cause = await self._try(batch, loop.time())
            if outcome is not None:
                await self._count_written(batch, *outcome)
                return
            if self._should_spill(loop.time() - started) and await self._spill_batch(batch, cause):
                return
            if self._give_up.is_set() and self._spill is None:
                self._count_lost(batch, "no fallback storage is configured")
                return
            self.counters.retries += 1
            log.warning(
                "Batch of %d rows for %s failed (%s); retrying in %.1fs",
                len(batch),
                self.table,
                cause or "spill failed",
                delay,
            )
            await self._pause(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.retry_max_secs)

    async def _try(
        self, batch: Batch, now: float
    ) -> tuple[tuple[int, Batch] | None, SpotError | None]:
        """Return (outcome, None), or (None, why not) when the batch was not written."""
        if self._give_up.is_set():
            return None, None
        if self._outage and now < self._next_try_at:
            # During an outage only one try per backoff step: the others spill at once.
            return None, DatabaseUnavailable("PostgreSQL was unavailable moments ago")
        try:
            return await self._attempt(batch), None
        except DatabaseUnavailable as exc:
            if self._outage:
                self._outage_delay = min(self._outage_delay * 2, self.retry_max_secs)
                self._next_try_at = now + self._outage_delay
            return None, exc

    async def _attempt(self, batch: Batch) -> tuple[int, Batch] | None:
        """Return (inserted, rejected rows), or None when the deadline came first."""
        attempt = asyncio.ensure_future(copy_isolating(self.db, self.table, batch))
        deadline = asyncio.ensure_future(self._give_up.wait())
        try:
            await asyncio.wait((attempt, deadline), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            attempt.cancel()  # the run is being torn down: no write may outlive the pool
            raise
        finally:
            deadline.cancel()
        if attempt.done():
            return attempt.result()
        # The deadline passed mid-write. Let the write finish on its own: the batch is spilled as
        # well, and re-ingesting a spill that was also written skips the duplicates.
        self._orphans.add(attempt)
        attempt.add_done_callback(self._forget)
        return None

    def _forget(self, attempt: asyncio.Task[tuple[int, Batch]]) -> None:
        self._orphans.discard(attempt)
        if not attempt.cancelled() and attempt.exception() is not None:
            log.debug("Write of %s abandoned at the deadline failed: %s", self.table, attempt)

    async def _pause(self, secs: float) -> None:
        # Sleeps like asyncio.sleep, but the shutdown deadline cuts it short.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._give_up.wait(), secs)

    def _should_spill(self, waited_secs: float) -> bool:
        if self._spill is None:
            return False
        if self._give_up.is_set() or self._outage:
            return True
        return self.spill_after_secs is not None and waited_secs >= self.spill_after_secs

    async def _spill_batch(self, batch: Batch, cause: SpotError | None) -> bool:
        assert self._spill is not None
        try:
            await self._spill(self.table, batch)
        except SpillError as exc:
            log.error("Cannot spill %d rows of %s: %s", len(batch), self.table, exc)
            if self._give_up.is_set():
                self._count_lost(batch, str(exc))
                return True
            return False
        if cause is not None and not self._outage:
            self._outage = True
            self._outage_delay = self.retry_initial_secs
            self._next_try_at = asyncio.get_running_loop().time() + self._outage_delay
        self.counters.rows_spilled += len(batch)
        log.warning(
            "[⚠] Spilled %d rows for %s to fallback storage (%s)",
            len(batch),
            self.table,
            cause or "shutdown deadline",
        )
        return True

    def _count_lost(self, batch: Batch, why: str) -> None:
        self.counters.rows_lost += len(batch)
        log.error(
            "[✗] Lost %d rows of %s at the shutdown deadline: %s", len(batch), self.table, why
        )

    async def _count_written(self, batch: Batch, inserted: int, rejected: Batch) -> None:
        if self._outage:
            log.info("PostgreSQL takes batches for %s again", self.table)
        self._outage = False
        self._outage_delay = self.retry_initial_secs
        self.counters.batches += 1
        # After the commit; queues are FIFO, so the first row waited longest (received_at last).
        self.counters.commit_lag.observe(time.time_ns() // 1000 - unix_us(batch[0][-1]))
        self.counters.rows_inserted += inserted
        self.counters.rows_duplicate += len(batch) - len(rejected) - inserted
        log.info("[✅] Inserted %d rows into %s", inserted, self.table)
        if rejected:
            await self._reject_rows(rejected)

    async def _reject_rows(self, rows: Batch) -> None:
        self.counters.rows_rejected += len(rows)
        log.error(
            "[✗] PostgreSQL refused %d rows of %s (%d so far); the rest of the batch is stored",
            len(rows),
            self.table,
            self.counters.rows_rejected,
        )
        if self._reject is not None:
            try:
                await self._reject(self.table, rows, "rejected by PostgreSQL")
            except SpillError as exc:
                log.error("Cannot keep the %d rejected rows of %s: %s", len(rows), self.table, exc)
