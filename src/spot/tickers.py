"""Exchange-native symbols to lowercase `base_quote` tickers: BTCUSDT, BTC-USD, ETH/USDT.

A symbol with a separator splits there; otherwise the longest known quote asset at its end is the
quote. An explicit override in the configuration wins. Anything else gets a safe lowercase name
and one warning: never a KeyError, never a dropped message.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Longest first, so USDT wins over USD and FDUSD over USD.
KNOWN_QUOTES = tuple(
    sorted(
        (
            "usdt",
            "usdc",
            "fdusd",
            "busd",
            "tusd",
            "usdd",
            "usde",
            "pyusd",
            "dai",
            "usd",
            "eur",
            "gbp",
            "jpy",
            "try",
            "brl",
            "aud",
            "cad",
            "chf",
            "krw",
            "idr",
            "zar",
            "uah",
            "btc",
            "xbt",
            "eth",
            "bnb",
            "sol",
            "trx",
            "dot",
            "xrp",
        ),
        key=len,
        reverse=True,
    )
)
# Tables are `orderbook_<ticker>` in a 63-byte identifier; keep tickers within 53.
MAX_TICKER_LENGTH = 53
_SEPARATORS = re.compile(r"[-/_:]")
_UNSAFE = re.compile(r"[^a-z0-9]+")


class TickerNormalizer:
    """Map symbols to tickers, remembering each answer (the hot path calls it per message)."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self._known: dict[str, str] = {}
        for symbol, ticker in (overrides or {}).items():
            self._known[symbol] = ticker
            self._known[symbol.upper()] = ticker

    def __call__(self, symbol: str) -> str:
        ticker = self._known.get(symbol)
        if ticker is None:
            ticker = self._known[symbol] = ticker_for(symbol)
        return ticker


def ticker_for(symbol: str) -> str:
    """Return the `base_quote` ticker of an exchange-native symbol (pure; warns on a guess)."""
    lowered = symbol.strip().lower()
    parts = [_UNSAFE.sub("", part) for part in _SEPARATORS.split(lowered, maxsplit=1)]
    if len(parts) == 2 and parts[0] and parts[1]:
        return _fit(f"{parts[0]}_{parts[1]}")
    compact = _UNSAFE.sub("", lowered)
    quote = _quote_of(compact)
    if quote:
        return _fit(f"{compact[: -len(quote)]}_{quote}")
    safe = _UNSAFE.sub("_", lowered).strip("_") or "unknown"
    log.warning(
        "Cannot split symbol %r into base and quote; storing it as ticker %r "
        "(set ticker_overrides in the config to name it)",
        symbol,
        _fit(safe),
    )
    return _fit(safe)


def _quote_of(compact: str) -> str | None:
    # The longest quote that leaves a base of 3+ letters: XBTUSD is xbt_usd, not xb_tusd, while
    # BTCTUSD stays btc_tusd. Failing that, the longest that leaves any base (OPUSDT: op_usdt).
    matches = [q for q in KNOWN_QUOTES if compact.endswith(q) and len(compact) > len(q)]
    for quote in matches:
        if len(compact) - len(quote) >= 3:
            return quote
    return matches[0] if matches else None


def _fit(ticker: str) -> str:
    if len(ticker) <= MAX_TICKER_LENGTH:
        return ticker
    digest = hashlib.blake2b(ticker.encode(), digest_size=4).hexdigest()
    return f"{ticker[: MAX_TICKER_LENGTH - 9]}_{digest}"
