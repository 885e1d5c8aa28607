"""Rebuild L2 books from Tardis `incremental_book_L2` rows and sample them as Tardis Machine does.

Pure: no I/O, no clock. Consecutive rows of one exchange and symbol that share `timestamp`,
`local_timestamp` and `is_snapshot` are one book change (a `book_change` message flattened one
level a row). The sampling rule is tardis-dev's book snapshot computation
(tardis-node src/computable/booksnapshot.ts; its output is tests/fixtures/tardis/
tardis_node_compute_sequence.ndjson):

- a snapshot is due only when the top `depth` levels (price or amount) changed;
- the first snapshot, and every snapshot when the interval is 0, is taken right after the change
  that made it due, with that change's `timestamp` and `local_timestamp`;
- otherwise at most one per interval: it is taken just BEFORE the first change whose `timestamp`
  falls in a later interval, stamped with the END of the interval of the last applied change,
  and with the `local_timestamp` of that later change;
- a run of is_snapshot rows starts a fresh book; changes before the first snapshot are ignored
  (the book is unknown until then); amount 0 removes a level.

A book that changed after its last snapshot is not sampled at the end of the input: Tardis Machine
ends its replay the same way. State carries across files, so daily files given in order behave
like one replay.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

PriceLevel = tuple[float, float]  # price, amount


class BookSide:
    """One side of a book: the amount at each price, and the prices in best-first order."""

    def __init__(self, *, descending: bool) -> None:
        # Sort keys ascend; bids use -price so that index 0 is the best level on both sides.
        self._sign = -1.0 if descending else 1.0
        self._keys: list[float] = []
        self._amounts: dict[float, float] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def clear(self) -> None:
        self._keys.clear()
        self._amounts.clear()

    def set(self, price: float, amount: float, depth: int) -> bool:
        """Set the amount at `price` (0 removes it); return True if a top-`depth` level moved."""
        key = price * self._sign
        index = bisect_left(self._keys, key)
        if amount == 0:
            if self._amounts.pop(price, None) is None:
                return False
            del self._keys[index]
        else:
            if price not in self._amounts:
                self._keys.insert(index, key)
            self._amounts[price] = amount
        return index < depth

    def top(self, depth: int) -> tuple[PriceLevel, ...]:
        """Return up to `depth` (price, amount) levels, best first."""
        sign, amounts = self._sign, self._amounts
        return tuple((key * sign, amounts[key * sign]) for key in self._keys[:depth])


@dataclass(frozen=True, slots=True)
class BookChange:
    """One book change: levels as (is_bid, price, amount), amount 0 = remove."""

    exchange: str
    symbol: str
    timestamp_us: int
    local_timestamp_us: int
    is_snapshot: bool
    levels: list[tuple[bool, float, float]]


@dataclass(frozen=True, slots=True)
class ComputedSnapshot:
    """A sampled book: up to `depth` levels a side, best first (fewer when the book is thinner)."""

    exchange: str
    symbol: str
    timestamp_us: int
    local_timestamp_us: int
    bids: tuple[PriceLevel, ...]
    asks: tuple[PriceLevel, ...]


@dataclass
class SnapshotSampler:
    """The book of one exchange and symbol, and when to sample it (see the module docstring)."""

    depth: int
    interval_ms: int
    bids: BookSide = field(default_factory=lambda: BookSide(descending=True))
    asks: BookSide = field(default_factory=lambda: BookSide(descending=False))
    top_bids: tuple[PriceLevel, ...] = ()
    top_asks: tuple[PriceLevel, ...] = ()
    has_snapshot: bool = False  # a snapshot run was seen: the book is known
    in_snapshot_run: bool = False
    changed: bool = False  # the top levels changed since the last sample
    initialized: bool = False  # the first sample was taken
    last_update_us: int = -1000

    def update(self, change: BookChange) -> list[ComputedSnapshot]:
        """Apply one change; return the snapshots it makes due (0, 1 or 2)."""
        due: list[ComputedSnapshot] = []
        if self._due(change.timestamp_us):
            due.append(self._sample(change))
        self._apply(change)
        self.last_update_us = change.timestamp_us
        if self._due(change.timestamp_us):
            due.append(self._sample(change))
            self.initialized = True
        return due

    def _apply(self, change: BookChange) -> None:
        moved = False
        if change.is_snapshot and not self.in_snapshot_run:
            self.bids.clear()
            self.asks.clear()
            self.has_snapshot = moved = True
        self.in_snapshot_run = change.is_snapshot
        if not self.has_snapshot:
            return
        depth = self.depth
        for is_bid, price, amount in change.levels:
            side = self.bids if is_bid else self.asks
            moved = side.set(price, amount, depth) or moved
        if moved:
            self._refresh_top()

    def _refresh_top(self) -> None:
        top_bids, top_asks = self.bids.top(self.depth), self.asks.top(self.depth)
        if top_bids != self.top_bids or top_asks != self.top_asks:
            self.top_bids, self.top_asks = top_bids, top_asks
            self.changed = True

    def _due(self, timestamp_us: int) -> bool:
        if not self.changed:
            return False
        if self.interval_ms == 0 or not self.initialized:
            return True
        interval_us = self.interval_ms * 1000
        bucket = self.last_update_us // interval_us
        if timestamp_us // interval_us > bucket:
            # The sample describes the book as it stood at the end of the last change's interval.
            self.last_update_us = (bucket + 1) * interval_us
            return True
        return False

    def _sample(self, change: BookChange) -> ComputedSnapshot:
        self.changed = False
        return ComputedSnapshot(
            change.exchange,
            change.symbol,
            self.last_update_us,
            change.local_timestamp_us,
            self.top_bids,
            self.top_asks,
        )


_ChangeKey = tuple[str, str, int, int, bool]


class IncrementalBooks:
    """Group `incremental_book_L2` rows into changes and sample every symbol's book."""

    def __init__(self, depth: int, interval_ms: int) -> None:
        if depth < 1 or interval_ms < 0:
            raise ValueError(f"need depth >= 1 and interval_ms >= 0, got {depth}, {interval_ms}")
        self.depth = depth
        self.interval_ms = interval_ms
        self.samplers: dict[tuple[str, str], SnapshotSampler] = {}
        self.changes = 0
        self._key: _ChangeKey | None = None
        self._levels: list[tuple[bool, float, float]] = []

    def __repr__(self) -> str:
        return (
            f"<IncrementalBooks depth={self.depth} interval={self.interval_ms}ms"
            f" books={len(self.samplers)} changes={self.changes}>"
        )

    def add(
        self,
        exchange: str,
        symbol: str,
        timestamp_us: int,
        local_timestamp_us: int,
        is_snapshot: bool,
        level: tuple[bool, float, float],
    ) -> list[ComputedSnapshot]:
        """Add one row; return the snapshots completed by the change the row closes, if any."""
        key = (exchange, symbol, timestamp_us, local_timestamp_us, is_snapshot)
        if key == self._key:
            self._levels.append(level)
            return []
        snapshots = self.finish()
        self._key, self._levels = key, [level]
        return snapshots

    def finish(self) -> list[ComputedSnapshot]:
        """Apply the change still being grouped (end of a file); return what it makes due."""
        if self._key is None:
            return []
        exchange, symbol, timestamp_us, local_timestamp_us, is_snapshot = self._key
        change = BookChange(
            exchange, symbol, timestamp_us, local_timestamp_us, is_snapshot, self._levels
        )
        self._key, self._levels = None, []
        self.changes += 1
        return self.sampler(exchange, symbol).update(change)

    def sampler(self, exchange: str, symbol: str) -> SnapshotSampler:
        """Return the sampler of one book, created on first sight."""
        sampler = self.samplers.get((exchange, symbol))
        if sampler is None:
            sampler = self.samplers[exchange, symbol] = SnapshotSampler(
                self.depth, self.interval_ms
            )
        return sampler
