"""The benchmark's data: deterministic Tardis Machine messages for 10 tickers, and their rows.

Every message is unique under spot's primary keys (message i has its own exchange time and
trade id), so no run ever takes the duplicate path. `frames(kind, n)` yields the exact bytes the
loopback server sends; `rows(kind, n)` are the rows spot builds from them (spot's own normalizer),
which is what the raw-COPY ceiling writes; `write_csv_gz` writes the same data as Tardis CSV.
"""

from __future__ import annotations

import csv
import gzip
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["books", "trades", "mixed"]
KINDS: tuple[Kind, ...] = ("books", "trades", "mixed")
DEPTH = 15
# 10 tickers on 3 exchanges; see ticker_index() for which message goes where.
SYMBOLS: tuple[tuple[str, str], ...] = (
    ("binance", "BTCUSDT"),
    ("binance", "ETHUSDT"),
    ("binance", "SOLUSDT"),
    ("binance", "XRPUSDT"),
    ("coinbase", "BTC-USD"),
    ("coinbase", "ETH-USD"),
    ("coinbase", "SOL-USD"),
    ("bybit", "DOGEUSDT"),
    ("bybit", "ADAUSDT"),
    ("bybit", "AVAXUSDT"),
)
START_US = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
STEP_US = 100  # message i happens at START_US + i * STEP_US
LOCAL_DELAY_US = 1_234
TRADES_HEADER = (
    "exchange",
    "symbol",
    "timestamp",
    "local_timestamp",
    "id",
    "side",
    "price",
    "amount",
)
_VARIANTS = 97  # distinct price ladders per ticker, cycled: realistic number spellings, cheap


def exchanges() -> dict[str, list[str]]:
    """Return the symbols of each exchange, for spot's settings."""
    result: dict[str, list[str]] = {}
    for exchange, symbol in SYMBOLS:
        result.setdefault(exchange, []).append(symbol)
    return result


def ticker_index(kind: Kind, i: int) -> int:
    """Return the ticker of message i: round robin; mixed sends each ticker a book, then a trade."""
    return (i // 2 if kind == "mixed" else i) % len(SYMBOLS)


def is_book(kind: Kind, i: int) -> bool:
    """Return whether message i of a `kind` workload is a book snapshot (mixed alternates)."""
    return kind == "books" or (kind == "mixed" and i % 2 == 0)


class _Clock:
    """ISO-8601 text of increasing Unix microseconds, reusing the seconds prefix."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def text(self, unix_us: int, digits: int) -> str:
        second, micros = divmod(unix_us, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if digits == 3:
            return f"{self._prefix}.{micros // 1000:03d}Z"
        return f"{self._prefix}.{micros:06d}Z"


@dataclass(frozen=True)
class _Ladder:
    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]
    json: str  # '"bids":[...],"asks":[...]'


def _ladders(seed: int, base_price: float) -> list[_Ladder]:
    rng = random.Random(seed)
    ladders = []
    for _ in range(_VARIANTS):
        mid = round(base_price * (1 + rng.uniform(-0.01, 0.01)), 2)
        bids = [
            (round(mid - 0.01 * (i + 1), 2), round(rng.uniform(0.001, 5), 5)) for i in range(DEPTH)
        ]
        asks = [
            (round(mid + 0.01 * (i + 1), 2), round(rng.uniform(0.001, 5), 5)) for i in range(DEPTH)
        ]
        side_json = [
            "[" + ",".join(f'{{"price":{p!r},"amount":{a!r}}}' for p, a in side) + "]"
            for side in (bids, asks)
        ]
        ladders.append(_Ladder(bids, asks, f'"bids":{side_json[0]},"asks":{side_json[1]}'))
    return ladders


class Workload:
    """Messages of one kind: `frames()` as wire bytes, `records()` as CSV-ready values."""

    def __init__(self, kind: Kind, messages: int, first: int = 0) -> None:
        self.kind = kind
        self.messages = messages
        self.first = first
        self._ladders = [_ladders(t, 100.0 * (t + 1)) for t in range(len(SYMBOLS))]

    def books(self) -> int:
        return sum(
            1 for i in range(self.first, self.first + self.messages) if is_book(self.kind, i)
        )

    def frames(self) -> Iterator[bytes]:
        """Yield each message as the UTF-8 JSON text Tardis Machine would send."""
        clock = _Clock()
        name = f"book_snapshot_{DEPTH}_100ms"
        kind = self.kind
        for i in range(self.first, self.first + self.messages):
            t = ticker_index(kind, i)
            exchange, symbol = SYMBOLS[t]
            at_us = START_US + i * STEP_US
            timestamp = clock.text(at_us - at_us % 1000, 3)
            local = clock.text(at_us + LOCAL_DELAY_US, 6)
            head = f'{{"symbol":"{symbol}","exchange":"{exchange}"'
            if is_book(kind, i):
                ladder = self._ladder(i)
                text = (
                    f'{{"type":"book_snapshot",{head[1:]},"name":"{name}","depth":{DEPTH},'
                    f'"interval":100,{ladder.json},"timestamp":"{timestamp}",'
                    f'"localTimestamp":"{local}"}}'
                )
            else:
                price, amount = self._trade_values(i)
                text = (
                    f'{{"type":"trade",{head[1:]},"id":"{i}","price":{price!r},'
                    f'"amount":{amount!r},"side":"{"buy" if i % 3 else "sell"}",'
                    f'"timestamp":"{timestamp}","localTimestamp":"{local}"}}'
                )
            yield text.encode()

    def _ladder(self, i: int) -> _Ladder:
        return self._ladders[ticker_index(self.kind, i)][(i // 10) % _VARIANTS]

    def _trade_values(self, i: int) -> tuple[float, float]:
        ladder = self._ladder(i)
        return ladder.asks[0][0], ladder.bids[i % DEPTH][1]

    def write_csv_gz(self, directory: Path) -> list[Path]:
        """Write the workload as Tardis CSV datasets: a trades and a book_snapshot_15 file."""
        directory.mkdir(parents=True, exist_ok=True)
        trades_path = directory / "bench_trades.csv.gz"
        books_path = directory / f"bench_book_snapshot_{DEPTH}.csv.gz"
        book_header = ["exchange", "symbol", "timestamp", "local_timestamp"]
        for level in range(DEPTH):
            for side in ("asks", "bids"):
                book_header += [f"{side}[{level}].price", f"{side}[{level}].amount"]
        counts = {trades_path: 0, books_path: 0}
        with (
            gzip.open(trades_path, "wt", newline="", compresslevel=1) as trades_file,
            gzip.open(books_path, "wt", newline="", compresslevel=1) as books_file,
        ):
            trades, books = csv.writer(trades_file), csv.writer(books_file)
            trades.writerow(TRADES_HEADER)
            books.writerow(book_header)
            for i in range(self.first, self.first + self.messages):
                exchange, symbol = SYMBOLS[ticker_index(self.kind, i)]
                at_us = START_US + i * STEP_US
                key = [exchange, symbol, at_us - at_us % 1000, at_us + LOCAL_DELAY_US]
                if is_book(self.kind, i):
                    ladder = self._ladder(i)
                    levels: list[float] = []
                    for ask, bid in zip(ladder.asks, ladder.bids, strict=True):
                        levels += [*ask, *bid]
                    books.writerow(key + levels)
                    counts[books_path] += 1
                else:
                    price, amount = self._trade_values(i)
                    trades.writerow([*key, i, "buy" if i % 3 else "sell", price, amount])
                    counts[trades_path] += 1
        for path, count in counts.items():
            if not count:
                path.unlink()
        return [path for path, count in counts.items() if count]
