"""PostgreSQL sink: `PostgreSQLDatabase` (pool, schema, COPY) and `QueueProcessor` (batch writer).

Writes are binary COPY. Every table has a primary key, so a batch written twice (a retry after an
ambiguous failure, a replay run again, a spill recovered) leaves one copy of each row: the batch is
first COPYed straight into the table, and only when that hits a duplicate key is it written again
through a temporary table with `ON CONFLICT DO NOTHING` — a duplicate never costs other rows.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from spot.errors import DatabaseUnavailable, SpotError
from spot.tables import Row, TableLayout, check_book_levels, column_types, layout_for

log = logging.getLogger(__name__)

Batch = list[Row]


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
    ) -> None:
        self.url = url
        self.orderbook_levels = orderbook_levels
        self.connect_timeout_secs = connect_timeout_secs
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
        """Open the pool, failing with DatabaseUnavailable when PostgreSQL cannot be reached."""
        try:
            await self._pool.open(wait=True, timeout=self.connect_timeout_secs)
        except (PoolTimeout, psycopg.OperationalError) as exc:
            await self._pool.close()
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {redact_dsn(self.url)}: {exc}"
            ) from exc
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
        """Write `rows` into `table` once; return how many were new (duplicates are skipped)."""
        layout = await self.ensure_table(table)
        async with self._connection() as conn:
            try:
                return await _copy_into(conn, layout, layout.name, rows)
            except psycopg.errors.UniqueViolation:
                return await _merge_into(conn, layout, rows)

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


@dataclass
class WriterCounters:
    """What one QueueProcessor did."""

    batches: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    retries: int = 0
    rows_spilled: int = 0


SpillHandler = Callable[[str, Batch], Awaitable[None]]


class QueueProcessor:
    """Drain one table's batches into PostgreSQL, retrying with backoff, spilling when told to."""

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
    ) -> None:
        self.db = db
        self.table = table
        self._batches = batches
        self.retry_initial_secs = retry_initial_secs
        self.retry_max_secs = retry_max_secs
        self.spill_after_secs = spill_after_secs
        self._spill = spill
        self.counters = WriterCounters()

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"<QueueProcessor {self.table} batches={c.batches} inserted={c.rows_inserted}"
            f" duplicate={c.rows_duplicate} retries={c.retries} spilled={c.rows_spilled}>"
        )

    async def run(self) -> None:
        """Write every batch until the queue is closed and drained."""
        async for batch in self._batches:
            await self.write(batch)

    async def write(self, batch: Batch) -> None:
        """Write one batch, retrying while PostgreSQL is unavailable."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = self.retry_initial_secs
        while True:
            try:
                inserted = await self.db.copy_rows(self.table, batch)
            except DatabaseUnavailable as exc:
                if self._should_spill(loop.time() - started):
                    await self._spill_batch(batch, exc)
                    return
                self.counters.retries += 1
                log.warning(
                    "Batch of %d rows for %s failed (%s); retrying in %.1fs",
                    len(batch),
                    self.table,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.retry_max_secs)
                continue
            self._count_written(len(batch), inserted)
            return

    def _should_spill(self, waited_secs: float) -> bool:
        return (
            self._spill is not None
            and self.spill_after_secs is not None
            and waited_secs >= self.spill_after_secs
        )

    async def _spill_batch(self, batch: Batch, cause: SpotError) -> None:
        assert self._spill is not None
        await self._spill(self.table, batch)
        self.counters.rows_spilled += len(batch)
        log.warning(
            "[⚠] Spilled %d rows for %s to fallback storage (%s)", len(batch), self.table, cause
        )

    def _count_written(self, rows: int, inserted: int) -> None:
        self.counters.batches += 1
        self.counters.rows_inserted += inserted
        self.counters.rows_duplicate += rows - inserted
        log.info("[✅] Inserted %d rows into %s", inserted, self.table)
