import logging

import pytest

from spot.tables import table_name
from spot.tickers import MAX_TICKER_LENGTH, TickerNormalizer, ticker_for


@pytest.mark.parametrize(
    ("symbol", "ticker"),
    [
        ("BTCUSDT", "btc_usdt"),
        ("btcusdt", "btc_usdt"),
        ("ETHBTC", "eth_btc"),
        ("BTC-USD", "btc_usd"),
        ("ETH/USDT", "eth_usdt"),
        ("eth_usdc", "eth_usdc"),
        ("XBTUSD", "xbt_usd"),
        ("SOLFDUSD", "sol_fdusd"),
        ("USDCUSDT", "usdc_usdt"),
        ("BTC-PERPETUAL", "btc_perpetual"),
        ("PURR/USDC", "purr_usdc"),
        ("1000PEPEUSDT", "1000pepe_usdt"),
        ("tBTCUSD", "tbtc_usd"),
        ("BTCTUSD", "btc_tusd"),
        ("OPUSDT", "op_usdt"),
    ],
)
def test_ticker_for_splits_known_shapes_into_base_quote(symbol: str, ticker: str) -> None:
    assert ticker_for(symbol) == ticker


@pytest.mark.parametrize(
    "symbol",
    ['x"; DROP TABLE trade_btc_usdt; --', "@162", "ÉTÉ€", "", "a" * 200, "BTC USDT\n", "../../etc"],
)
def test_ticker_for_hostile_or_unsplittable_symbol_gives_a_safe_table_name(symbol: str) -> None:
    ticker = ticker_for(symbol)

    assert len(ticker) <= MAX_TICKER_LENGTH
    assert table_name("orderbook", ticker).startswith("orderbook_")
    assert table_name("trade", ticker).startswith("trade_")


def test_unsplittable_symbol_warns_and_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ticker = ticker_for("@162")

    assert ticker == "162"
    assert "Cannot split symbol '@162'" in caplog.text


def test_override_wins_and_results_are_remembered() -> None:
    tickers = TickerNormalizer({"XBTUSD": "btc_usd"})

    assert tickers("XBTUSD") == "btc_usd"
    assert tickers("xbtusd") == "xbt_usd"  # overrides match the exchange-native spelling
    assert tickers("ETHUSDT") == "eth_usdt"
    assert tickers("ETHUSDT") is tickers("ETHUSDT")


def test_long_symbols_are_cut_with_a_digest_so_distinct_ones_stay_distinct() -> None:
    first, second = ticker_for("A" * 80 + "USDT"), ticker_for("A" * 81 + "USDT")

    assert first != second
    assert len(first) <= MAX_TICKER_LENGTH and len(second) <= MAX_TICKER_LENGTH
