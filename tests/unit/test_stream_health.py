from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from spot.config import HealthConfig
from spot.stream_health import (
    HistogramView,
    LatencyHistogram,
    PipelineView,
    StreamHealth,
    unix_us,
    worst,
)

T0_NS = 1_709_251_200_000_000_000  # 2024-03-01T00:00:00Z
SECOND_NS = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now_ns = T0_NS

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, secs: float) -> None:
        self.now_ns += int(secs * SECOND_NS)


def trade_row(exchange: str, symbol: str, timestamp_us: int, local_us: int) -> tuple[object, ...]:
    moment = datetime.fromtimestamp(timestamp_us / 1e6, UTC)
    return (exchange, symbol, "1", "buy", 1.0, 1.0, moment, moment, timestamp_us, local_us, moment)


def book_row(exchange: str, symbol: str, timestamp_us: int, local_us: int) -> tuple[object, ...]:
    moment = datetime.fromtimestamp(timestamp_us / 1e6, UTC)
    return (exchange, symbol, moment, moment, timestamp_us, local_us, 100.0, 1.0, moment)


def health(clock: Clock, mode: str = "stream", **config: float) -> StreamHealth:
    settings = HealthConfig(**{"stale_after_secs": 5.0, "max_drift_secs": 1.0, **config})  # type: ignore[arg-type]
    return StreamHealth(settings, mode, ["binance"], clock_ns=clock)


def test_histogram_counts_each_latency_in_its_le_bucket_and_sums_them() -> None:
    histogram = LatencyHistogram([0.001, 0.01])

    for value_us in (-5, 0, 1000, 1001, 10_000, 50_000):
        histogram.observe(value_us)

    view = histogram.view()
    assert view.counts == (3, 2, 1)  # ≤1ms (a negative one included), ≤10ms, +Inf
    assert view.sum_secs == pytest.approx(0.061996)


def test_quantile_interpolates_within_the_bucket_like_histogram_quantile() -> None:
    view = HistogramView(bounds_secs=(0.01, 0.02, 0.04), counts=(0, 10, 10, 0), sum_secs=0.0)

    assert view.quantile(0.5) == pytest.approx(0.02)
    assert view.quantile(0.75) == pytest.approx(0.03)
    assert view.quantile(0.25) == pytest.approx(0.015)
    assert HistogramView((1.0,), (0, 0), 0.0).quantile(0.5) is None
    assert HistogramView((1.0,), (0, 3), 0.0).quantile(0.5) == 1.0  # +Inf: the top bound


def test_observe_times_trades_on_both_hops_and_books_only_from_tardis_to_spot() -> None:
    clock = Clock()
    stream = health(clock)
    received_ns = T0_NS + 30_000_000  # 30 ms after the exchange time

    stream.observe(
        "trade", trade_row("binance", "BTCUSDT", T0_NS // 1000, T0_NS // 1000 + 2000), received_ns
    )
    stream.observe(
        "orderbook",
        book_row("binance", "BTCUSDT", T0_NS // 1000 - 10**6, T0_NS // 1000 + 5000),
        received_ns,
    )

    stats = stream.exchanges["binance"]
    assert (stats.trades, stats.books) == (1, 1)
    assert stats.exchange_lag.view().count == 1  # the snapshot's timestamp is no exchange event
    assert stats.exchange_lag.sum_us == 2000
    assert stats.source_lag.sum_us == 28_000 + 25_000
    assert stats.symbols == {"BTCUSDT": received_ns}


def test_replay_mode_does_not_time_tardis_to_spot() -> None:
    stream = health(Clock(), mode="replay")

    stream.observe("trade", trade_row("binance", "BTCUSDT", 1000, 3000), T0_NS)

    assert stream.exchanges["binance"].source_lag.view().count == 0
    assert stream.exchanges["binance"].exchange_lag.view().count == 1


def test_a_stream_turns_stale_after_the_threshold_and_down_without_connection() -> None:
    clock = Clock()
    stream = health(clock)
    connected = PipelineView(connected=frozenset({"binance"}))
    stream.observe("trade", trade_row("binance", "BTCUSDT", 1000, 2000), clock())

    clock.advance(4.9)
    assert stream.snapshot(connected).status == "ok"
    clock.advance(0.2)
    assert stream.snapshot(connected).exchanges[0].status == "stale"
    assert stream.snapshot(connected).status == "stale"
    assert stream.snapshot(PipelineView()).status == "down"
    stream.observe("trade", trade_row("binance", "BTCUSDT", 1000, 2000), clock())
    assert stream.snapshot(connected).status == "ok"


def test_an_exchange_that_never_sent_is_stale_after_the_threshold_from_when_it_was_watched() -> (
    None
):
    clock = Clock()
    stream = health(clock)
    connected = PipelineView(connected=frozenset({"binance"}))

    assert stream.snapshot(connected).status == "ok"
    clock.advance(6)
    assert stream.snapshot(connected).status == "stale"
    stream.unwatch(["binance"])
    assert stream.snapshot(connected).status == "ok"


def test_rates_and_recent_percentiles_cover_the_window() -> None:
    clock = Clock()
    stream = health(clock, rate_window_secs=10.0)
    connected = frozenset({"binance"})
    stream.tick(connected, {})
    for i in range(20):
        stream.observe("trade", trade_row("binance", "BTCUSDT", i, i + 3000), clock())
    clock.advance(2)

    exchange = stream.snapshot(PipelineView(connected=connected)).exchanges[0]

    assert exchange.rates["trade"] == pytest.approx(10.0)
    assert exchange.recent_exchange_lag.count == 20
    assert 0.0025 <= (exchange.recent_exchange_lag.quantile(0.5) or 0) <= 0.005


def test_status_changes_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    stream = health(clock)
    connected = frozenset({"binance"})
    stream.observe(
        "trade", trade_row("binance", "BTCUSDT", clock() // 1000, clock() // 1000), clock()
    )
    caplog.set_level(logging.INFO, logger="spot.stream_health")

    stream.tick(connected, {})
    clock.advance(6)
    stream.tick(connected, {})
    stream.tick(connected, {})
    stream.observe(
        "trade", trade_row("binance", "BTCUSDT", clock() // 1000, clock() // 1000), clock()
    )
    stream.tick(connected, {})

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "binance stream is stale: no message for 6.0 s" in messages[0]
    assert "binance stream is ok again (was stale)" in messages[1]


def test_drift_past_the_bound_is_logged_as_clock_skew_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = health(Clock())
    caplog.set_level(logging.WARNING, logger="spot.stream_health")
    received_ns = T0_NS
    local_us = T0_NS // 1000 + 3_000_000  # Tardis Machine stamps 3 s after spot received it

    for _ in range(3):
        stream.observe("orderbook", book_row("binance", "BTCUSDT", local_us, local_us), received_ns)

    assert stream.exchanges["binance"].drift_events["tardis_to_spot"] == 3
    [record] = caplog.records
    assert "Clock drift on binance: received_at − localTimestamp is -3.000 s" in record.getMessage()
    assert "clock skew" in record.getMessage()


def test_worst_status_wins_and_no_exchange_is_ok() -> None:
    assert worst(["ok", "down", "stale"]) == "down"
    assert worst(["ok", "stale"]) == "stale"
    assert worst([]) == "ok"


def test_unix_us_is_exact() -> None:
    assert unix_us(datetime(2024, 3, 1, 0, 0, 0, 123456, tzinfo=UTC)) == 1_709_251_200_123_456
