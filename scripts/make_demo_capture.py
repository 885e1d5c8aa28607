"""Generate the demo capture: src/spot/data/demo_capture.ndjson.gz and its manifest.

Three minutes (2024-03-01T00:00:00Z to 00:03:00Z) of normalized Tardis Machine messages for
binance BTCUSDT/ETHUSDT/SOLUSDT and coinbase BTC-USD/ETH-USD, from a seeded random walk of real
order books. Deterministic: the same bytes on every run (gzip mtime 0).

The messages follow what tardis-machine 18 really sends (docs/tardis-machine.md and the sample
tardis_machine_18_offline_binance_synthetic.ndjson): trades, `book_snapshot_15_100ms` computed the
way tardis-dev computes them (timestamp aligned to the interval end, localTimestamp of the change
that triggered them, `{}` for levels a thin book does not have), a few `book_change` and `quote`
messages, one `derivative_ticker` and one `disconnect` per exchange — after which the book comes
back with a fresh snapshot, as after a real reconnect.

The manifest (demo_capture.json) holds the exact message counts per exchange, symbol and data type.

Usage: python scripts/make_demo_capture.py [output_dir]
"""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

SEED = 20240301
START = datetime(2024, 3, 1, tzinfo=UTC)
DURATION_US = 180_000_000
LAST_EVENT_US = DURATION_US - 400_000  # keeps every localTimestamp before `to`
DEPTH = 15
INTERVAL_MS = 100
SNAPSHOT_NAME = f"book_snapshot_{DEPTH}_{INTERVAL_MS}ms"
EXTRAS_UNTIL_US = 2_000_000  # book_change and quote messages: BTCUSDT's first two seconds only
OUTPUT_DIR = Path(__file__).resolve().parents[1] / "src" / "spot" / "data"

Level = tuple[int, int]  # (price in ticks of 0.01, amount in units of 10^-decimals)
Change = tuple[str, int, int]  # (side, price ticks, new amount units; 0 removes the level)
Fill = tuple[str, int, int, int | None]  # (taker side, price ticks, amount units, trade id)


@dataclass(frozen=True)
class Market:
    exchange: str
    symbol: str
    price: float
    decimals: int  # amount precision
    typical_size: float
    max_levels: int  # real levels per side; fewer than DEPTH makes a thin book
    trade_rate: float  # taker orders per second
    book_rate: float  # book updates per second
    first_trade_id: int
    volatility: float  # fair price random walk, ticks per √second
    spacing: float  # mean distance in ticks of a new level from the fair price


MARKETS = (
    Market("binance", "BTCUSDT", 61130.98, 5, 0.04, 40, 2.6, 2.2, 3445374963, 30, 1.5),
    Market("binance", "ETHUSDT", 3340.12, 4, 0.6, 40, 1.9, 1.6, 1363012345, 5, 1.5),
    Market("binance", "SOLUSDT", 126.43, 2, 9.0, 9, 0.9, 1.0, 488123456, 2, 2),
    Market("coinbase", "BTC-USD", 61135.42, 8, 0.03, 40, 2.0, 1.7, 612345678, 30, 1.5),
    Market("coinbase", "ETH-USD", 3341.05, 8, 0.5, 11, 1.0, 0.8, 491234567, 5, 3),
)
# (exchange, start of the outage µs, outage length µs): the recorder lost its connection.
OUTAGES = {"binance": (91_234_567, 2_800_000), "coinbase": (128_765_432, 4_100_000)}
LATENCY_US = {"binance": (800, 18_000), "coinbase": (3_000, 45_000)}
ID_LESS_TRADES = {"binance": 0.0, "coinbase": 0.08}  # share of trades sent without `id`
DERIVATIVE_TICKER_AT_US = 30_000_000


def iso(us: int, digits: int) -> str:
    """Format µs since START the way tardis-machine prints dates: 3 or 6 fractional digits."""
    moment = START + timedelta(microseconds=us)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text[: len(text) - 6 + digits] + "Z"


def number(value: float) -> float | int:
    """Return `value` as JavaScript's JSON.stringify spells it (61131, not 61131.0)."""
    return int(value) if value.is_integer() else value


@dataclass
class Book:
    """A price-level order book in integer ticks and amount units."""

    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)

    def side(self, name: str) -> dict[int, int]:
        return self.bids if name == "bid" else self.asks

    def top(self, name: str, depth: int) -> list[Level]:
        levels = self.side(name)
        prices = sorted(levels, reverse=name == "bid")[:depth]
        return [(price, levels[price]) for price in prices]

    def apply(self, changes: list[Change]) -> None:
        for side, price, amount in changes:
            if amount:
                self.side(side)[price] = amount
            else:
                self.side(side).pop(price, None)


class Simulator:
    """One market's order book and trades, following a seeded random walk of its fair price."""

    def __init__(self, market: Market, rng: random.Random) -> None:
        self.market = market
        self.rng = rng
        self.book = Book()
        self.unit: int = 10**market.decimals
        self.min_units: int = max(1, self.unit // 10_000)  # ≥ 0.0001: printed without an exponent
        self.next_id = market.first_trade_id
        self.taker_side = "buy"
        self.thin = market.max_levels < DEPTH
        self.min_levels = 4 if self.thin else 20
        self.fair = market.price * 100  # in ticks
        self.at_us = 0
        mid = round(self.fair)
        for side, direction in (("bid", -1), ("ask", 1)):
            price = mid + direction
            for _ in range(6 if self.thin else market.max_levels):
                self.book.side(side)[price] = self.size()
                price += direction * self.gap()

    def advance(self, at_us: int) -> None:
        """Move the fair price on to `at_us`."""
        elapsed_secs = (at_us - self.at_us) / 1e6
        self.at_us = at_us
        self.fair += self.rng.gauss(0, self.market.volatility * elapsed_secs**0.5)

    def gap(self) -> int:
        if self.thin:
            return self.rng.randint(1, 6)
        return 1 if self.rng.random() < 0.6 else self.rng.randint(2, 4)

    def size(self) -> int:
        amount = self.market.typical_size * self.rng.lognormvariate(0, 0.9)
        return max(self.min_units, round(amount * self.unit))

    def best(self, side: str) -> int:
        levels = self.book.side(side)
        return max(levels) if side == "bid" else min(levels)

    def worst(self, side: str) -> int:
        levels = self.book.side(side)
        return min(levels) if side == "bid" else max(levels)

    def update(self) -> list[Change]:
        """Return one book update: a level added, resized or removed near the top."""
        side = self.rng.choice(("bid", "ask"))
        roll = self.rng.random()
        top = self.book.top(side, DEPTH)
        if roll < 0.4:
            price, amount = self.rng.choice(top)
            changes = [(side, price, max(self.min_units, round(amount * self.rng.uniform(0.3, 2))))]
        elif roll < 0.75 or len(self.book.side(side)) <= self.min_levels:
            changes = [(side, self._free_price(side), self.size())]
        else:
            changes = [(side, self.rng.choice(top)[0], 0)]
        changes += self._keep_depth(side, changes)
        self.book.apply(changes)
        return changes

    def _free_price(self, side: str) -> int:
        """Return a price with no level yet, near the fair price, not crossing the other side."""
        direction = -1 if side == "bid" else 1
        anchor = math.floor(self.fair) if side == "bid" else math.ceil(self.fair)
        other = self.best("ask" if side == "bid" else "bid")
        levels = self.book.side(side)
        for _ in range(50):
            price = anchor + direction * int(self.rng.expovariate(1 / self.market.spacing))
            if price not in levels and (price < other if side == "bid" else price > other):
                return price
        return self.worst(side) + direction * self.gap()

    def _keep_depth(self, side: str, changes: list[Change]) -> list[Change]:
        count = len(self.book.side(side)) + sum(1 if amount else -1 for _, _, amount in changes)
        if count <= self.market.max_levels:
            return []
        return [(side, self.worst(side), 0)]

    def trade(self) -> tuple[list[Fill], list[Change]]:
        """Return one taker order's fills and the book changes they make.

        A taker sweeps the levels a moved fair price left behind: several fills, one timestamp.
        """
        maker = self._maker_side()
        remaining = dict(self.book.top(maker, DEPTH))
        count = 1 if self.rng.random() < 0.7 else self.rng.randint(2, 4)
        fills: list[Fill] = []
        while len(remaining) > 1 and len(fills) < 8:
            price = max(remaining) if maker == "bid" else min(remaining)
            stale = price < self.fair if maker == "ask" else price > self.fair
            if len(fills) >= count and not stale:
                break
            amount = remaining[price] if stale else min(remaining[price], self.size())
            remaining[price] -= amount
            if not remaining[price]:
                del remaining[price]
            fills.append((self.taker_side, price, amount, self._trade_id()))
        changes = self._fill_changes(maker, remaining)
        self.book.apply(changes)
        # Makers quote again at the touch right away: spreads stay a few ticks wide.
        refill = [(maker, self._free_price(maker), self.size())]
        self.book.apply(refill)
        refill += self._refill(maker)
        self.book.apply(refill[1:])
        return fills, changes + refill

    def _maker_side(self) -> str:
        if self.fair > self.best("ask"):
            self.taker_side = "buy"
        elif self.fair < self.best("bid"):
            self.taker_side = "sell"
        elif self.rng.random() < 0.4:
            self.taker_side = "sell" if self.taker_side == "buy" else "buy"
        return "ask" if self.taker_side == "buy" else "bid"

    def _trade_id(self) -> int | None:
        if self.rng.random() < ID_LESS_TRADES[self.market.exchange]:
            return None
        self.next_id += 1
        return self.next_id - 1

    def _fill_changes(self, maker: str, remaining: dict[int, int]) -> list[Change]:
        before = dict(self.book.top(maker, DEPTH))
        return [
            (maker, price, remaining.get(price, 0))
            for price, amount in before.items()
            if remaining.get(price, 0) != amount
        ]

    def _refill(self, maker: str) -> list[Change]:
        direction = -1 if maker == "bid" else 1
        price = self.worst(maker)
        changes: list[Change] = []
        for _ in range(self.min_levels - len(self.book.side(maker))):
            price += direction * self.gap()
            changes.append((maker, price, self.size()))
        return changes


class SnapshotComputer:
    """tardis-dev's BookSnapshotComputable: emit when the top `depth` changed, once an interval."""

    def __init__(self, name: str, depth: int, interval_ms: int) -> None:
        self.name = name
        self.depth = depth
        self.interval_ms = interval_ms
        self.initialized = False
        self.changed = False
        self.bids: list[Level] = []
        self.asks: list[Level] = []
        self.last_update = (-1, "")  # (µs, printed timestamp)

    def compute(self, book: Book, ts: tuple[int, str], local_us: int) -> Iterator[dict[str, Any]]:
        """Yield the snapshots a book change at exchange time `ts` triggers.

        `book` already holds the change; a snapshot due before it shows the stored top levels,
        i.e. the book as it was at the end of the interval, as in tardis-dev.
        """
        if self._has_new(ts[0]):
            yield self._snapshot(local_us)
        self._update(book, ts)
        if self._has_new(ts[0]):
            yield self._snapshot(local_us)
            self.initialized = True

    def _has_new(self, ts_us: int) -> bool:
        if not self.changed:
            return False
        if self.interval_ms == 0 or not self.initialized:
            return True
        bucket = (ts_us // 1000) // self.interval_ms
        last_bucket = (self.last_update[0] // 1000) // self.interval_ms
        if bucket > last_bucket:
            end_us = (last_bucket + 1) * self.interval_ms * 1000
            self.last_update = (end_us, iso(end_us, 3))  # a Date built from ms: 3 digits
            return True
        return False

    def _update(self, book: Book, ts: tuple[int, str]) -> None:
        bids, asks = book.top("bid", self.depth), book.top("ask", self.depth)
        if bids != self.bids or asks != self.asks:
            self.bids, self.asks, self.changed = bids, asks, True
        self.last_update = ts

    def _snapshot(self, local_us: int) -> dict[str, Any]:
        self.changed = False
        return {
            "name": self.name,
            "depth": self.depth,
            "interval": self.interval_ms,
            "bids": self.bids,
            "asks": self.asks,
            "timestamp": self.last_update[1],
            "localTimestamp": iso(local_us, 6),
        }


@dataclass
class Capture:
    """Messages of one exchange, with the recorder's monotonic receive clock."""

    exchange: str
    rng: random.Random
    messages: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    clock_us: int = 0

    def receive(self, ts_us: int) -> int:
        low, high = LATENCY_US[self.exchange]
        latency = min(high, int(low + self.rng.expovariate(1 / (low * 3))))
        self.clock_us = max(self.clock_us + self.rng.randint(3, 40), ts_us + latency)
        return self.clock_us

    def add(self, local_us: int, message: dict[str, Any]) -> None:
        self.messages.append((local_us, len(self.messages), message))


def level_json(levels: list[Level], market: Market, pad: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"price": number(price / 100), "amount": number(amount / 10**market.decimals)}
        for price, amount in levels
    ]
    return out + [{}] * (pad - len(out))


class ExchangeRun:
    """Drive every market of one exchange through the three minutes."""

    def __init__(self, exchange: str, rng: random.Random) -> None:
        self.markets = [m for m in MARKETS if m.exchange == exchange]
        self.rng = rng
        self.capture = Capture(exchange, rng)
        self.sims = {m.symbol: Simulator(m, rng) for m in self.markets}
        self.digits = 3 if exchange == "binance" else 6
        self.computers: dict[str, list[SnapshotComputer]] = {}

    def run(self) -> list[tuple[int, int, dict[str, Any]]]:
        outage_start, outage_length = OUTAGES[self.capture.exchange]
        outage_end = outage_start + outage_length
        reconnected = False
        self._snapshot_all(2_123)
        for ts_us, symbol, kind in self._events():
            if ts_us >= outage_end and not reconnected:
                self._reconnect(outage_end)
                reconnected = True
            # The books keep moving while the recorder is away; only its messages are lost.
            self._event(ts_us, symbol, kind, emit=reconnected or ts_us < outage_start)
        return self.capture.messages

    def _events(self) -> Iterator[tuple[int, str, str]]:
        events = []
        for market in self.markets:
            for kind, rate in (("trade", market.trade_rate), ("book", market.book_rate)):
                at = 20_000.0
                while (at := at + self.rng.expovariate(rate) * 1e6) < LAST_EVENT_US:
                    ts = int(at) // 1000 * 1000 if self.digits == 3 else int(at)
                    events.append((ts, market.symbol, kind))
        events.sort()
        return iter(events)

    def _event(self, ts_us: int, symbol: str, kind: str, *, emit: bool) -> None:
        sim = self.sims[symbol]
        sim.advance(ts_us)
        if kind == "trade":
            fills, changes = sim.trade()
            if emit:
                self._emit_trades(sim.market, ts_us, fills)
        else:
            changes = sim.update()
        if emit:
            change_ts = ts_us + (self.rng.randint(0, 2) * 1000 if kind == "trade" else 0)
            self._emit_change(sim, changes, (change_ts, iso(change_ts, self.digits)))

    def _emit_trades(self, market: Market, ts_us: int, fills: list[Fill]) -> None:
        for side, price, amount, trade_id in fills:
            local_us = self.capture.receive(ts_us)
            message: dict[str, Any] = {
                "type": "trade",
                "symbol": market.symbol,
                "exchange": market.exchange,
            }
            if trade_id is not None:
                message["id"] = str(trade_id)
            message |= {
                "price": number(price / 100),
                "amount": number(amount / 10**market.decimals),
                "side": side,
                "timestamp": iso(ts_us, self.digits),
                "localTimestamp": iso(local_us, 6),
            }
            self.capture.add(local_us, message)

    def _emit_change(
        self, sim: Simulator, changes: list[Change], ts: tuple[int, str], snapshot: bool = False
    ) -> None:
        market = sim.market
        local_us = ts[0] if snapshot else self.capture.receive(ts[0])
        self.capture.clock_us = max(self.capture.clock_us, local_us)
        extras = market.symbol == "BTCUSDT" and local_us < EXTRAS_UNTIL_US
        if extras:
            message = self._book_change(market, changes, ts, snapshot)
            self.capture.add(local_us, message | {"localTimestamp": iso(local_us, 6)})
        for computer in self.computers.setdefault(market.symbol, self._new_computers()):
            for fields in computer.compute(sim.book, ts, local_us):
                if computer.name == SNAPSHOT_NAME or extras:
                    self.capture.add(local_us, self._snapshot(market, fields))

    @staticmethod
    def _new_computers() -> list[SnapshotComputer]:
        return [
            SnapshotComputer(SNAPSHOT_NAME, DEPTH, INTERVAL_MS),
            SnapshotComputer("quote", 1, 0),
        ]

    def _book_change(
        self, market: Market, changes: list[Change], ts: tuple[int, str], snapshot: bool
    ) -> dict[str, Any]:
        bids = [(p, a) for side, p, a in changes if side == "bid"]
        asks = [(p, a) for side, p, a in changes if side == "ask"]
        return {
            "type": "book_change",
            "symbol": market.symbol,
            "exchange": market.exchange,
            "isSnapshot": snapshot,
            "bids": level_json(bids, market, 0),
            "asks": level_json(asks, market, 0),
            "timestamp": ts[1],
            "localTimestamp": "",
        }

    def _snapshot(self, market: Market, fields: dict[str, Any]) -> dict[str, Any]:
        depth = fields["depth"]
        return {
            "type": "book_snapshot",
            "symbol": market.symbol,
            "exchange": market.exchange,
            "name": fields["name"],
            "depth": depth,
            "interval": fields["interval"],
            "bids": level_json(fields["bids"], market, depth),
            "asks": level_json(fields["asks"], market, depth),
            "timestamp": fields["timestamp"],
            "localTimestamp": fields["localTimestamp"],
        }

    def _snapshot_all(self, at_us: int) -> None:
        """Send each book whole, as after connecting: the exchange's REST snapshot has no time."""
        for sim in self.sims.values():
            at_us = max(at_us, self.capture.clock_us + self.rng.randint(50, 400))
            changes = [(s, p, a) for s in ("bid", "ask") for p, a in sim.book.top(s, 10**6)]
            self._emit_change(sim, changes, (at_us, iso(at_us, 6)), snapshot=True)

    def _reconnect(self, at_us: int) -> None:
        # tardis-dev resets computed snapshots on a disconnect: the next one is an initial one.
        noticed_us = self.capture.clock_us + self.rng.randint(150_000, 600_000)
        self.capture.add(noticed_us, self._disconnect(noticed_us))
        self.capture.clock_us = noticed_us
        self.computers.clear()
        self._snapshot_all(at_us)

    def _disconnect(self, local_us: int) -> dict[str, Any]:
        return {
            "type": "disconnect",
            "exchange": self.capture.exchange,
            "localTimestamp": iso(local_us, 6),
        }


def derivative_ticker(messages: list[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
    """Return one message of a type the ingester must skip, priced from the trades around it."""
    last = next(
        m
        for at, _, m in reversed(messages)
        if at < DERIVATIVE_TICKER_AT_US and m["type"] == "trade" and m["symbol"] == "BTCUSDT"
    )
    price = last["price"]
    return {
        "type": "derivative_ticker",
        "symbol": "BTCUSDT",
        "exchange": "binance",
        "lastPrice": price,
        "openInterest": 81234.567,
        "fundingRate": 0.00031,
        "indexPrice": number(round(price - 3.21, 2)),
        "markPrice": number(round(price + 1.07, 2)),
        "timestamp": iso(DERIVATIVE_TICKER_AT_US - 7_000, 3),
        "localTimestamp": iso(DERIVATIVE_TICKER_AT_US, 6),
    }


def generate() -> list[dict[str, Any]]:
    """Return every message of the capture, sorted by localTimestamp."""
    rng = random.Random(SEED)
    rows: list[tuple[int, int, int, dict[str, Any]]] = []
    for rank, exchange in enumerate(("binance", "coinbase")):
        for local_us, seq, message in ExchangeRun(exchange, rng).run():
            rows.append((local_us, rank, seq, message))
    binance = [(at, seq, m) for at, rank, seq, m in rows if rank == 0]
    rows.append((DERIVATIVE_TICKER_AT_US, 0, 10**9, derivative_ticker(binance)))
    rows.sort(key=lambda row: row[:3])
    return [message for *_, message in rows]


def data_type(message: dict[str, Any]) -> str:
    if message["type"] == "book_snapshot":
        return str(message["name"])
    return str(message["type"])


def manifest(messages: list[dict[str, Any]], capture_name: str) -> dict[str, Any]:
    """Return the exact counts tests and `spot demo` assert against."""
    exchanges: dict[str, Any] = {}
    for market in MARKETS:
        entry = exchanges.setdefault(
            market.exchange,
            {"symbols": [], "messages": 0, "disconnect": 0, "counts": {}, "trades_without_id": {}},
        )
        entry["symbols"].append(market.symbol)
        entry["counts"][market.symbol] = Counter()
        entry["trades_without_id"][market.symbol] = 0
        entry.setdefault("max_levels", {})[market.symbol] = min(market.max_levels, DEPTH)
    for message in messages:
        entry = exchanges[message["exchange"]]
        entry["messages"] += 1
        if message["type"] == "disconnect":
            entry["disconnect"] += 1
            continue
        entry["counts"][message["symbol"]][data_type(message)] += 1
        if message["type"] == "trade" and "id" not in message:
            entry["trades_without_id"][message["symbol"]] += 1
    for entry in exchanges.values():
        entry["counts"] = {s: dict(sorted(c.items())) for s, c in entry["counts"].items()}
    return {
        "capture": capture_name,
        "from": iso(0, 3),
        "to": iso(DURATION_US, 3),
        "messages": len(messages),
        "exchanges": exchanges,
    }


def main(output_dir: Path) -> None:
    messages = generate()
    output_dir.mkdir(parents=True, exist_ok=True)
    capture = output_dir / "demo_capture.ndjson.gz"
    body = b"".join(msgspec.json.encode(message) + b"\n" for message in messages)
    with capture.open("wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as packed:
        packed.write(body)
    summary = manifest(messages, capture.name)
    (output_dir / "demo_capture.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{capture}: {len(messages)} messages, {len(body)} bytes, "
        f"{capture.stat().st_size} bytes gzipped"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT_DIR)
