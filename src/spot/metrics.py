"""Every Prometheus metric spot exports, defined once, by name, built when Prometheus scrapes.

`SpotCollector` turns one `HealthSnapshot` into metric families at scrape time. Nothing here
runs per message: stream_health counts with plain integers and the pipeline's own counters
(queues, writers, sources) are read as they are, so metrics cost nothing between scrapes.

    spot_messages_total{exchange,type}              trade, book_snapshot, disconnect
    spot_last_message_age_seconds{exchange}         and ..._symbol_... {exchange,symbol}
    spot_stream_status{exchange,status}             1 for the current one of ok, stale, down
    spot_up                                         1 when every stream is ok (/health 200)
    spot_reconnects_total{exchange}, spot_gaps_total{exchange}, spot_gap_seconds_total{exchange}
    spot_drift_events_total{exchange,hop}           lags past health.max_drift_secs
    spot_lag_seconds{exchange,hop}                  histogram: exchange_to_tardis, tardis_to_spot
    spot_commit_lag_seconds{table}                  histogram: spot_to_postgres, per batch
    spot_queue_depth_rows{table}, spot_batches_total{table}, spot_rows_inserted_total{table},
    spot_rows_duplicate_total{table}, spot_batch_retries_total{table},
    spot_rows_spilled_total{table}
    spot_frames_total, spot_parse_errors_total{reason}, spot_skipped_messages_total{type},
    spot_rows_overflowed_total, spot_config_reloads_total{result}, spot_uptime_seconds
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from spot.stream_health import HealthSnapshot, HistogramView, Status

STATUSES: tuple[Status, ...] = ("ok", "stale", "down")


def histogram_buckets(view: HistogramView) -> list[tuple[str, float]]:
    """Return Prometheus' cumulative `(le, count)` pairs of a view, +Inf last."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*view.bounds_secs, float("inf")), view.counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return buckets


class SpotCollector:
    """A prometheus-client custom collector over `snapshot()`."""

    def __init__(self, snapshot: Callable[[], HealthSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Return every spot metric family, from one snapshot."""
        snapshot = self._snapshot()
        yield from _stream_metrics(snapshot)
        yield from _lag_metrics(snapshot)
        yield from _table_metrics(snapshot)
        yield from _pipeline_metrics(snapshot)


def _stream_metrics(snapshot: HealthSnapshot) -> Iterator[Metric]:
    messages = CounterMetricFamily(
        "spot_messages", "Messages received, by exchange and type.", labels=["exchange", "type"]
    )
    age = GaugeMetricFamily(
        "spot_last_message_age_seconds", "Time since the last message.", labels=["exchange"]
    )
    symbol_age = GaugeMetricFamily(
        "spot_symbol_last_message_age_seconds",
        "Time since the last message of a symbol.",
        labels=["exchange", "symbol"],
    )
    status = GaugeMetricFamily(
        "spot_stream_status", "1 for the stream's current status.", labels=["exchange", "status"]
    )
    reconnects = CounterMetricFamily(
        "spot_reconnects", "Reconnects to Tardis Machine.", labels=["exchange"]
    )
    gaps = CounterMetricFamily(
        "spot_gaps", "Times without data (stream drops).", labels=["exchange"]
    )
    gap_secs = CounterMetricFamily("spot_gap_seconds", "Length of those gaps.", labels=["exchange"])
    drift = CounterMetricFamily(
        "spot_drift_events",
        "Messages whose lag passed health.max_drift_secs (clock skew or a late feed).",
        labels=["exchange", "hop"],
    )
    for exchange in snapshot.exchanges:
        name = exchange.exchange
        for kind, count in exchange.messages.items():
            messages.add_metric([name, kind], count)
        age.add_metric([name], exchange.last_message_age_secs)
        for symbol, secs in exchange.symbols.items():
            symbol_age.add_metric([name, symbol], secs)
        for candidate in STATUSES:
            status.add_metric([name, candidate], 1.0 if exchange.status == candidate else 0.0)
        reconnects.add_metric([name], exchange.reconnects)
        gaps.add_metric([name], exchange.gaps)
        gap_secs.add_metric([name], exchange.gap_secs)
        for hop, count in exchange.drift_events.items():
            drift.add_metric([name, hop], count)
    up = GaugeMetricFamily(
        "spot_up", "1 when every stream is ok.", 1.0 if snapshot.status == "ok" else 0.0
    )
    yield from (messages, age, symbol_age, status, reconnects, gaps, gap_secs, drift, up)


def _lag_metrics(snapshot: HealthSnapshot) -> Iterator[Metric]:
    lag = HistogramMetricFamily(
        "spot_lag_seconds",
        "Per message: exchange_to_tardis = localTimestamp - timestamp (trades), "
        "tardis_to_spot = received_at - localTimestamp (stream mode).",
        labels=["exchange", "hop"],
    )
    for exchange in snapshot.exchanges:
        for hop, view in (
            ("exchange_to_tardis", exchange.exchange_lag),
            ("tardis_to_spot", exchange.source_lag),
        ):
            lag.add_metric([exchange.exchange, hop], histogram_buckets(view), view.sum_secs)
    yield lag


def _table_metrics(snapshot: HealthSnapshot) -> Iterator[Metric]:
    tables = snapshot.pipeline.tables
    commit_lag = HistogramMetricFamily(
        "spot_commit_lag_seconds",
        "Per batch: commit time - received_at of its oldest row (spot_to_postgres).",
        labels=["table"],
    )
    depth = GaugeMetricFamily(
        "spot_queue_depth_rows", "Rows waiting in the queue.", labels=["table"]
    )
    counters = {
        "batches": CounterMetricFamily("spot_batches", "Batches written.", labels=["table"]),
        "rows_inserted": CounterMetricFamily(
            "spot_rows_inserted", "New rows stored.", labels=["table"]
        ),
        "rows_duplicate": CounterMetricFamily(
            "spot_rows_duplicate", "Rows already stored, skipped.", labels=["table"]
        ),
        "retries": CounterMetricFamily(
            "spot_batch_retries", "Batch writes retried.", labels=["table"]
        ),
        "rows_spilled": CounterMetricFamily(
            "spot_rows_spilled", "Rows written to fallback storage.", labels=["table"]
        ),
    }
    for table in tables:
        commit_lag.add_metric(
            [table.table], histogram_buckets(table.commit_lag), table.commit_lag.sum_secs
        )
        depth.add_metric([table.table], table.queue_depth)
        for field, family in counters.items():
            family.add_metric([table.table], getattr(table, field))
    yield from (commit_lag, depth, *counters.values())


def _pipeline_metrics(snapshot: HealthSnapshot) -> Iterator[Metric]:
    pipeline = snapshot.pipeline
    yield CounterMetricFamily("spot_frames", "Frames received from all sources.", pipeline.frames)
    parse_errors = CounterMetricFamily(
        "spot_parse_errors", "Frames that could not be stored, by reason.", labels=["reason"]
    )
    for reason, count in sorted(pipeline.parse_errors.items()):
        parse_errors.add_metric([reason], count)
    skipped = CounterMetricFamily(
        "spot_skipped_messages", "Messages of types spot does not store.", labels=["type"]
    )
    for kind, count in sorted(pipeline.skipped_types.items()):
        skipped.add_metric([kind], count)
    reloads = CounterMetricFamily(
        "spot_config_reloads", "Symbol refreshes, by result.", labels=["result"]
    )
    for result in ("applied", "rejected"):
        reloads.add_metric([result], pipeline.config_reloads.get(result, 0))
    yield from (parse_errors, skipped, reloads)
    yield CounterMetricFamily(
        "spot_rows_overflowed",
        "Stream-mode rows that found their queue full and went to the spill.",
        pipeline.rows_overflowed,
    )
    yield GaugeMetricFamily("spot_uptime_seconds", "Time since start.", snapshot.uptime_secs)


def metrics_registry(snapshot: Callable[[], HealthSnapshot]) -> CollectorRegistry:
    """Return a registry of spot's metrics plus the process, platform and GC ones.

    A registry of its own, not the global one: two pipelines in one process (the tests) must not
    collide, and nothing else in the process should leak into spot's /metrics.
    """
    registry = CollectorRegistry()
    registry.register(SpotCollector(snapshot))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
