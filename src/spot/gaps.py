"""Gaps: times without data, recorded in the spot_gaps table and in the log.

Two kinds. A stream-mode reconnect: the WebSocket source reports the time it had no connection
(`on_source_gap`). A Tardis Machine `disconnect` message: its recorder lost the exchange there,
and the gap lasts until the exchange's next row (`DisconnectGaps`, between the processor and the
queues, so that normalizing stays pure). Gaps are written in the background; while PostgreSQL is
down they wait in memory, and at shutdown they are spilled like any batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from spot.data_processor import InvalidMessage, RowSink, parse_timestamp
from spot.db_writer import GAP_COLUMNS, GAPS_TABLE, PostgreSQLDatabase
from spot.errors import DatabaseUnavailable, SpillError
from spot.fallback_storage import FallbackStorage
from spot.messages import Disconnect
from spot.tables import TRADE_COLUMNS, Kind, Row, book_columns
from spot.websocket import Gap

log = logging.getLogger(__name__)

# Where the exchange and local_timestamp sit in each kind of row.
_LOCAL_TIMESTAMP = {
    "trade": [name for name, _ in TRADE_COLUMNS].index("local_timestamp"),
    "orderbook": [name for name, _ in book_columns(1)].index("local_timestamp"),
}
_MAX_RETRY_SECS = 30.0


class GapRecorder:
    """Log each gap and store it in spot_gaps, retrying while PostgreSQL is down."""

    def __init__(self, db: PostgreSQLDatabase, fallback: FallbackStorage | None = None) -> None:
        self.db = db
        self.fallback = fallback
        self._pending: list[Row] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.recorded = 0
        self.stored = 0

    def __repr__(self) -> str:
        return f"<GapRecorder recorded={self.recorded} pending={len(self._pending)}>"

    def record(self, exchange: str, start: datetime, end: datetime, reason: str) -> None:
        """Note one gap of `exchange`; it is stored by `run` or `finish`."""
        log.warning(
            "[!] Gap in %s data from %s to %s (%.1fs, %s)",
            exchange,
            start.isoformat(),
            end.isoformat(),
            (end - start).total_seconds(),
            reason,
        )
        self._pending.append((exchange, start, end, reason, datetime.now(UTC)))
        self.recorded += 1
        self._wake.set()

    def on_source_gap(self, gap: Gap) -> None:
        """Record a WebSocket source's gap (stream reconnect) for each of its exchanges."""
        for exchange in gap.exchanges:
            self.record(exchange, gap.start, gap.end, gap.reason)

    async def run(self) -> None:
        """Store gaps as they come until `close`."""
        delay = 1.0
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if await self.flush():
                delay = 1.0
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.set()  # try again, whether woken or timed out
            delay = min(delay * 2, _MAX_RETRY_SECS)

    def close(self) -> None:
        """End `run`."""
        self._closed = True
        self._wake.set()

    async def flush(self) -> bool:
        """Store the pending gaps; return False when PostgreSQL is unavailable."""
        rows, self._pending = self._pending, []
        if not rows:
            return True
        try:
            self.stored += await self.db.insert_gaps(rows)
        except DatabaseUnavailable as exc:
            self._pending[:0] = rows
            log.info("%d gaps wait for PostgreSQL: %s", len(rows), exc)
            return False
        return True

    async def finish(self) -> None:
        """Store what is pending, or spill it when PostgreSQL is unavailable."""
        if await self.flush() or self.fallback is None:
            return
        rows, self._pending = self._pending, []
        try:
            await self.fallback.write(GAPS_TABLE, GAP_COLUMNS, rows, reason="PostgreSQL down")
        except SpillError as exc:
            log.error("Cannot keep %d gaps (they are in this log only): %s", len(rows), exc)


class _DisconnectSeen(Protocol):
    @property
    def pending_disconnects(self) -> deque[Disconnect]: ...


class DisconnectGaps:
    """A row sink in front of the queues that turns `disconnect` messages into gaps.

    The processor queues the disconnects it sees; this sink takes them at the next row and closes
    each exchange's gap at that exchange's next row. It costs one length check per row while no
    gap is open.
    """

    def __init__(
        self,
        processor: _DisconnectSeen,
        sink: RowSink,
        record: Callable[[str, datetime, datetime, str], None],
    ) -> None:
        self._processor = processor
        self._sink = sink
        self._record = record
        self._open: dict[str, datetime] = {}

    async def put(self, kind: Kind, ticker: str, row: Row) -> None:
        """Pass the row on, after noting a new disconnect or closing its exchange's gap."""
        if self._open or self._processor.pending_disconnects:
            self._observe(kind, row)
        await self._sink.put(kind, ticker, row)

    def _observe(self, kind: Kind, row: Row) -> None:
        pending = self._processor.pending_disconnects
        while pending:
            disconnect = pending.popleft()
            with contextlib.suppress(InvalidMessage):  # no time, no gap: counted as disconnect
                start, _ = parse_timestamp(disconnect.local_timestamp)
                # A second disconnect before the exchange's next row extends the same gap.
                self._open.setdefault(disconnect.exchange, start)
        exchange: str = row[0]
        if exchange in self._open:
            start = self._open.pop(exchange)
            self._record(exchange, start, row[_LOCAL_TIMESTAMP[kind]], "disconnect")

    def close(self) -> None:
        """Record gaps no row closed (the input ended first) as ending where they started."""
        for exchange, start in self._open.items():
            self._record(exchange, start, start, "disconnect")
        self._open.clear()
