"""Re-ingest spills into PostgreSQL exactly once: write, commit, then remove.

A spill is removed only after the transaction that stored its rows committed. If spot stops in
between, the spill is read again next time and the primary keys skip what is already stored, so a
spill recovered twice (or by `spot recover` while the service recovers it too) leaves one copy.
Rows PostgreSQL refuses are moved to the `rejected` area; a spill whose columns do not match the
configured table stays where it is, named in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from spot.db_writer import GAP_COLUMNS, GAPS_TABLE, PostgreSQLDatabase, copy_isolating
from spot.errors import DatabaseUnavailable, SchemaMismatch, SpillError
from spot.fallback_storage import Columns, FallbackStorage, Spill
from spot.tables import Row, layout_for

log = logging.getLogger(__name__)


@dataclass
class RecoveryCounters:
    """What re-ingesting spills did, over one pass or a whole run."""

    files: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    rows_rejected: int = 0
    files_failed: int = 0  # unreadable, or not matching the table: left in place

    def add(self, other: RecoveryCounters) -> None:
        self.files += other.files
        self.rows_inserted += other.rows_inserted
        self.rows_duplicate += other.rows_duplicate
        self.rows_rejected += other.rows_rejected
        self.files_failed += other.files_failed


def columns_of(table: str, orderbook_levels: int) -> Columns:
    """Return the (name, definition) columns of a table spot writes, spot_gaps included."""
    if table == GAPS_TABLE:
        return GAP_COLUMNS
    return layout_for(table, orderbook_levels).columns


async def recover_spills(
    db: PostgreSQLDatabase,
    storage: FallbackStorage,
    orderbook_levels: int,
    broken: set[str] | None = None,
) -> RecoveryCounters:
    """Store every pending spill and remove it; raise DatabaseUnavailable when PostgreSQL fails.

    Spills stored before the failure are removed and counted; the rest wait for the next pass.
    Spills that cannot be stored (unreadable, other columns) stay in place; their names are added
    to `broken`, and spills named there are not tried again.
    """
    broken = set() if broken is None else broken
    counters = RecoveryCounters()
    pending = [ref for ref in await storage.pending() if ref.name not in broken]
    if pending:
        log.info("Recovering %d spills from %s", len(pending), storage.url)
    for ref in pending:
        try:
            spill = await storage.read(ref)
            _check_columns(spill, orderbook_levels)
        except (SpillError, SchemaMismatch, ValueError) as exc:
            counters.files_failed += 1
            broken.add(ref.name)
            log.error("Cannot recover spill %s (left in place): %s", ref.name, exc)
            continue
        await _store(db, storage, spill, counters)
        await storage.remove(ref)
        counters.files += 1
    if counters.files:
        log.info(
            "[✅] Recovered %d spills: %d rows inserted, %d already stored, %d rejected",
            counters.files,
            counters.rows_inserted,
            counters.rows_duplicate,
            counters.rows_rejected,
        )
    return counters


def _check_columns(spill: Spill, orderbook_levels: int) -> None:
    header = spill.header
    expected = [name for name, _ in columns_of(header.table, orderbook_levels)]
    if header.columns != expected:
        raise SchemaMismatch(
            f"spill of {header.table} has {len(header.columns)} columns, the table has "
            f"{len(expected)} (orderbook_levels changed?)"
        )


async def _store(
    db: PostgreSQLDatabase, storage: FallbackStorage, spill: Spill, counters: RecoveryCounters
) -> None:
    table, rows = spill.header.table, spill.rows
    rejected: list[Row] = []
    if table == GAPS_TABLE:
        inserted = await db.insert_gaps(rows)
    else:
        inserted, rejected = await copy_isolating(db, table, rows)
    if rejected:
        await storage.write(
            table,
            columns_of(table, db.orderbook_levels),
            rejected,
            area="rejected",
            reason="rejected by PostgreSQL on recovery",
        )
    counters.rows_inserted += inserted
    counters.rows_duplicate += len(rows) - len(rejected) - inserted
    counters.rows_rejected += len(rejected)


class Recoverer:
    """The running service's spill recovery: a pass every interval while spills wait.

    It lists the store only when something may be there: at start (spills of earlier runs), after
    this process spilled, and while a pass left spills behind.
    """

    def __init__(
        self,
        db: PostgreSQLDatabase,
        storage: FallbackStorage,
        orderbook_levels: int,
        interval_secs: float,
    ) -> None:
        self.db = db
        self.storage = storage
        self.orderbook_levels = orderbook_levels
        self.interval_secs = interval_secs
        self.counters = RecoveryCounters()
        self._stopped = asyncio.Event()
        self._seen_written = -1  # storage.files_written at the last pass that left nothing
        self._broken: set[str] = set()

    def __repr__(self) -> str:
        c = self.counters
        return f"<Recoverer {self.storage.url} files={c.files} rows_inserted={c.rows_inserted}>"

    async def run(self) -> None:
        """Recover every `interval_secs` until `stop`."""
        while not self._stopped.is_set():
            if self._seen_written != self.storage.files_written:
                await self.attempt()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.interval_secs)

    def stop(self) -> None:
        """End `run` after the pass in progress."""
        self._stopped.set()

    async def attempt(self) -> bool:
        """Run one pass; return True when no spill is left pending."""
        written = self.storage.files_written
        try:
            self.counters.add(
                await recover_spills(self.db, self.storage, self.orderbook_levels, self._broken)
            )
            left = [ref for ref in await self.storage.pending() if ref.name not in self._broken]
        except (DatabaseUnavailable, SpillError) as exc:
            log.info("Spill recovery waits: %s", exc)
            return False
        if not left:
            self._seen_written = written
        return not left

    async def finish(self, deadline_secs: float) -> bool:
        """Retry passes until nothing is pending or `deadline_secs` passed; True when done."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + deadline_secs
        delay = 0.2
        while not await self.attempt():
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)
        return True
