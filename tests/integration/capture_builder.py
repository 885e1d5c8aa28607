"""Build NDJSON captures of normalized Tardis Machine messages with known contents."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

START = datetime(2024, 3, 1, tzinfo=UTC)


def iso(moment: datetime, digits: int = 6) -> str:
    text = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text[: len(text) - (6 - digits)] + "Z"


@dataclass
class Capture:
    """Lines of a capture and the rows they should produce, per table."""

    lines: list[str] = field(default_factory=list)
    expected_rows: Counter[str] = field(default_factory=Counter)
    garbage: int = 0

    def write(self, path: Path) -> Path:
        path.write_text("\n".join(self.lines) + "\n")
        return path


def book(exchange: str, symbol: str, at: datetime, real_levels: int, depth: int = 15) -> str:
    bids = [{"price": 100.0 - i, "amount": 1.0 + i} for i in range(real_levels)]
    asks = [{"price": 101.0 + i, "amount": 2.0 + i} for i in range(real_levels)]
    empty: list[dict[str, float]] = [{}] * (depth - real_levels)
    return json.dumps(
        {
            "type": "book_snapshot",
            "symbol": symbol,
            "exchange": exchange,
            "name": f"book_snapshot_{depth}_100ms",
            "depth": depth,
            "interval": 100,
            "bids": bids + empty,
            "asks": asks + empty,
            "timestamp": iso(at, 3),
            "localTimestamp": iso(at + timedelta(microseconds=1234)),
        },
        separators=(",", ":"),
    )


def trade(exchange: str, symbol: str, at: datetime, n: int, with_id: bool = True) -> str:
    message: dict[str, object] = {"type": "trade", "symbol": symbol, "exchange": exchange}
    if with_id:
        message["id"] = str(n)
    message.update(
        price=100.0 + n % 7,
        amount=0.5,
        side="buy" if n % 2 else "sell",
        timestamp=iso(at, 3),
        localTimestamp=iso(at + timedelta(microseconds=2345)),
    )
    return json.dumps(message, separators=(",", ":"))


def mixed_capture(messages_per_symbol: int, garbage_every: int = 0) -> Capture:
    """Trades and snapshots for 3 tickers on 2 exchanges, thin books, skipped types, garbage."""
    symbols = [("binance", "BTCUSDT", 15), ("binance", "ETHUSDT", 4), ("coinbase", "BTC-USD", 0)]
    tickers = {"BTCUSDT": "btc_usdt", "ETHUSDT": "eth_usdt", "BTC-USD": "btc_usd"}
    capture = Capture()
    for step in range(messages_per_symbol):
        at = START + timedelta(milliseconds=100 * step)
        for exchange, symbol, levels in symbols:
            ticker = tickers[symbol]
            if step % 2 == 0:
                capture.lines.append(book(exchange, symbol, at, levels))
                capture.expected_rows[f"orderbook_{ticker}"] += 1
            else:
                # coinbase trades come without ids, two at a time with the same timestamp
                with_id = exchange != "coinbase"
                capture.lines.append(trade(exchange, symbol, at, step, with_id))
                capture.expected_rows[f"trade_{ticker}"] += 1
                if not with_id:
                    capture.lines.append(trade(exchange, symbol, at, step, with_id))
                    capture.expected_rows[f"trade_{ticker}"] += 1
        if step % 50 == 0:
            capture.lines.append(
                json.dumps(
                    {
                        "type": "book_change",
                        "symbol": "BTCUSDT",
                        "exchange": "binance",
                        "isSnapshot": False,
                        "bids": [],
                        "asks": [],
                        "timestamp": iso(at, 3),
                        "localTimestamp": iso(at),
                    }
                )
            )
        if garbage_every and step % garbage_every == 0:
            capture.lines.append('{"type":"trade","symbol":"BTCUSDT","exchange":"binance"' + "}")
            capture.lines.append("this is not json " + iso(at))
            capture.garbage += 2
    return capture
