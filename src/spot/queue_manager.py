"""Bounded per-ticker queues between the normalizer and the database writers.

`order_book_queues` and `trade_queues` map a ticker to its `asyncio.Queue` of rows. A queue is
created the first time its ticker is seen (configured or not) and announced through `on_new_queue`
so that main_loop can start a writer for it. Memory is bounded by `capacity` rows per queue.

Backpressure depends on the mode. Replay: a full queue makes the reader wait (Tardis Machine waits
too). Stream: the exchange does not wait, so after `stream_put_timeout_secs` the row goes to
`on_overflow` (the spill) instead of holding the socket until Tardis Machine drops spot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, Literal

from spot.tables import Kind, Row, table_name

log = logging.getLogger(__name__)

_CLOSE: Final = object()  # end-of-queue marker put by close(); never a row
Batch = list[Row]
OverflowHandler = Callable[[str, Batch], Awaitable[None]]


class QueueManager:
    """Own the per-ticker queues; `put` rows in, take `batches(table)` out."""

    def __init__(
        self,
        capacity: int,
        mode: Literal["stream", "replay"],
        *,
        stream_put_timeout_secs: float = 2.0,
        on_new_queue: Callable[[str], None] | None = None,
        on_overflow: OverflowHandler | None = None,
    ) -> None:
        self.capacity = capacity
        self.mode = mode
        self.stream_put_timeout_secs = stream_put_timeout_secs
        self.order_book_queues: dict[str, asyncio.Queue[object]] = {}
        self.trade_queues: dict[str, asyncio.Queue[object]] = {}
        self._by_table: dict[str, asyncio.Queue[object]] = {}
        self._on_new_queue = on_new_queue
        self._on_overflow = on_overflow
        self.overflowed_rows = 0
        self._overflowing: set[str] = set()
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<QueueManager tables={len(self._by_table)} depth={self.depth()} closed={self.closed}>"
        )

    @property
    def tables(self) -> list[str]:
        return list(self._by_table)

    def depth(self, table: str | None = None) -> int:
        """Return the number of rows waiting in one table's queue, or in all of them."""
        if table is not None:
            return self._by_table[table].qsize()
        return sum(queue.qsize() for queue in self._by_table.values())

    def queue(self, kind: Kind, ticker: str) -> asyncio.Queue[object]:
        """Return the queue of `kind` rows for `ticker`, creating it on first sight."""
        queues = self.order_book_queues if kind == "orderbook" else self.trade_queues
        queue = queues.get(ticker)
        if queue is None:
            if self.closed:
                raise RuntimeError("QueueManager is closed")
            table = table_name(kind, ticker)
            queue = queues[ticker] = self._by_table[table] = asyncio.Queue(self.capacity)
            log.info("New table queue %s (capacity %d rows)", table, self.capacity)
            if self._on_new_queue is not None:
                self._on_new_queue(table)
        return queue

    async def put(self, kind: Kind, ticker: str, row: Row) -> None:
        """Queue one row, waiting (replay) or overflowing after a timeout (stream) when full."""
        queue = self.queue(kind, ticker)
        try:
            queue.put_nowait(row)
            return
        except asyncio.QueueFull:
            pass
        if self.mode == "replay" or self._on_overflow is None:
            await queue.put(row)
            return
        await self._put_or_overflow(table_name(kind, ticker), queue, row, self._on_overflow)

    async def _put_or_overflow(
        self, table: str, queue: asyncio.Queue[object], row: Row, overflow: OverflowHandler
    ) -> None:
        # Wait once per episode: while a queue stays full, later rows overflow at once, so the
        # socket is never held longer than the timeout.
        if table not in self._overflowing:
            try:
                await asyncio.wait_for(queue.put(row), self.stream_put_timeout_secs)
                return
            except TimeoutError:
                self._overflowing.add(table)
                log.warning(
                    "Queue %s stayed full for %.1fs: overflowing to the spill",
                    table,
                    self.stream_put_timeout_secs,
                )
        elif queue.qsize() < self.capacity // 2:
            self._overflowing.discard(table)
            log.info("Queue %s has room again: back to the database path", table)
            await queue.put(row)
            return
        self.overflowed_rows += 1
        await overflow(table, [row])

    async def batches(
        self, table: str, batch_size: int, flush_interval_secs: float
    ) -> AsyncIterator[Batch]:
        """Yield batches of up to `batch_size` rows, or fewer after `flush_interval_secs`.

        Ends after close() once the queue is drained: nothing queued is left behind.
        """
        queue = self._by_table[table]
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            if first is _CLOSE:
                return
            batch: Batch = [first]  # type: ignore[list-item]
            deadline = loop.time() + flush_interval_secs
            closing = await _fill(queue, batch, batch_size, deadline, loop)
            yield batch
            if closing:
                return

    async def close(self) -> None:
        """Mark the end of input: each batches() iterator ends after the rows already queued."""
        self.closed = True
        for queue in self._by_table.values():
            await queue.put(_CLOSE)


async def _fill(
    queue: asyncio.Queue[object],
    batch: Batch,
    batch_size: int,
    deadline: float,
    loop: asyncio.AbstractEventLoop,
) -> bool:
    """Add rows to `batch` until full or the deadline; return True when the close marker came."""
    while len(batch) < batch_size:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                item = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                return False
        if item is _CLOSE:
            return True
        batch.append(item)  # type: ignore[arg-type]
    return False
