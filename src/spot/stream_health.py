"""Stream health: per-exchange counts, last-message age, lag histograms and the stale flag.

The pipeline calls `StreamHealth.observe` once per normalized row: that is the only per-message
work (a few integer operations and two bucket increments, no metric objects, no locks).
Everything else — queue depths, writer counters, reconnects, parse errors — is read from the
objects that already count it, when a snapshot is taken (a /health request, a Prometheus scrape,
the watch tick). Times are Unix microseconds from the rows and `time.time_ns()`: the clock the
`received_at` column uses.

Three hops are timed, each as a histogram (seconds):
    exchange_to_tardis   localTimestamp - timestamp, trades only (on book snapshots `timestamp`
                         is the interval's end, not an exchange event: see docs/tardis-machine.md)
    tardis_to_spot       received_at - localTimestamp, stream mode only (in a replay it is the
                         age of the history)
    spot_to_postgres     commit time - received_at of a batch's oldest row (QueueProcessor)
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import msgspec

from spot.config import HealthConfig
from spot.tables import Kind, Row

log = logging.getLogger(__name__)

Status = Literal["ok", "stale", "down"]
Hop = Literal["exchange_to_tardis", "tardis_to_spot"]

# Latency bucket bounds, seconds: a loopback hop takes < 1 ms, an exchange feed 5-500 ms, a
# stalled one seconds to minutes. Values above the last bound land in +Inf.
LAG_BUCKETS_SECS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
DRIFT_LOG_EVERY_SECS: Final = 60.0
_STATUS_RANK: Final[dict[Status, int]] = {"ok": 0, "stale": 1, "down": 2}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)


def unix_us(moment: datetime) -> int:
    """Return an aware datetime as Unix microseconds."""
    return (moment - _EPOCH) // _ONE_US


class LatencyHistogram:
    """Counts of latencies in microseconds per `le` bucket, +Inf last, and their sum."""

    __slots__ = ("bounds_us", "counts", "sum_us")

    def __init__(self, bounds_secs: Iterable[float] = LAG_BUCKETS_SECS) -> None:
        self.bounds_us = [round(bound * 1e6) for bound in bounds_secs]
        self.counts = [0] * (len(self.bounds_us) + 1)
        self.sum_us = 0

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={sum(self.counts)} sum={self.sum_us / 1e6:.3f}s>"

    def observe(self, value_us: int) -> None:
        """Count one latency. Negative ones (clock skew) fall in the first bucket, as `le` says."""
        self.counts[bisect_left(self.bounds_us, value_us)] += 1
        self.sum_us += value_us

    def view(self) -> HistogramView:
        """Return a frozen copy, for a snapshot."""
        return HistogramView(
            bounds_secs=tuple(bound / 1e6 for bound in self.bounds_us),
            counts=tuple(self.counts),
            sum_secs=self.sum_us / 1e6,
        )


class HistogramView(msgspec.Struct, frozen=True):
    """A histogram at one moment: per-bucket (not cumulative) counts, +Inf last."""

    bounds_secs: tuple[float, ...]
    counts: tuple[int, ...]
    sum_secs: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def minus(self, earlier: HistogramView | None) -> HistogramView:
        """Return what was observed since `earlier` (a view of the same histogram)."""
        if earlier is None:
            return self
        counts = tuple(now - then for now, then in zip(self.counts, earlier.counts, strict=True))
        return HistogramView(self.bounds_secs, counts, self.sum_secs - earlier.sum_secs)

    def quantile(self, q: float) -> float | None:
        """Return the q-quantile in seconds, interpolated in its bucket like histogram_quantile."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index, in_bucket in enumerate(self.counts):
            if in_bucket and seen + in_bucket >= rank:
                if index == len(self.bounds_secs):  # +Inf: the highest finite bound is all we know
                    return self.bounds_secs[-1]
                upper = self.bounds_secs[index]
                lower = self.bounds_secs[index - 1] if index else min(0.0, upper)
                return lower + (upper - lower) * (rank - seen) / in_bucket
            seen += in_bucket
        return self.bounds_secs[-1]


class ExchangeStats:
    """What one exchange's stream delivered, updated per row; plain attributes on purpose."""

    __slots__ = (
        "books",
        "drift_events",
        "exchange_lag",
        "gap_secs",
        "gaps",
        "last_received_ns",
        "name",
        "next_drift_log",
        "source_lag",
        "symbols",
        "trades",
        "watched_since_ns",
    )

    def __init__(self, name: str, since_ns: int) -> None:
        self.name = name
        self.watched_since_ns = since_ns
        self.trades = 0
        self.books = 0
        self.last_received_ns = 0
        self.symbols: dict[str, int] = {}  # exchange-native symbol -> last received, ns
        self.exchange_lag = LatencyHistogram()
        self.source_lag = LatencyHistogram()
        self.gaps = 0
        self.gap_secs = 0.0
        self.drift_events: dict[Hop, int] = {"exchange_to_tardis": 0, "tardis_to_spot": 0}
        self.next_drift_log: dict[Hop, float] = {"exchange_to_tardis": 0.0, "tardis_to_spot": 0.0}

    def __repr__(self) -> str:
        return (
            f"<ExchangeStats {self.name} trades={self.trades} books={self.books}"
            f" gaps={self.gaps} drift={sum(self.drift_events.values())}>"
        )


class ExchangeStatus(msgspec.Struct, frozen=True):
    """One exchange in a snapshot."""

    exchange: str
    status: Status
    last_message_age_secs: float
    messages: dict[str, int]  # by type: trade, book_snapshot, disconnect
    rates: dict[str, float]  # messages/s by type over the rate window
    reconnects: int
    gaps: int
    gap_secs: float
    drift_events: dict[str, int]
    exchange_lag: HistogramView
    source_lag: HistogramView
    recent_exchange_lag: HistogramView  # over the rate window, for percentiles
    recent_source_lag: HistogramView
    symbols: dict[str, float]  # last message age per symbol, seconds


class TableStatus(msgspec.Struct, frozen=True):
    """One table's queue and writer in a snapshot."""

    table: str
    queue_depth: int
    batches: int
    rows_inserted: int
    rows_duplicate: int
    retries: int
    rows_spilled: int
    commit_lag: HistogramView


class PipelineView(msgspec.Struct, frozen=True):
    """What the pipeline's own counters say at snapshot time (read, never copied per message)."""

    connected: frozenset[str] = frozenset()  # exchanges with an open source connection
    reconnects: dict[str, int] = {}
    disconnects: dict[str, int] = {}  # Tardis Machine `disconnect` messages per exchange
    frames: int = 0
    parse_errors: dict[str, int] = {}  # by reason; a broken frame names no exchange
    skipped_types: dict[str, int] = {}
    rows_overflowed: int = 0
    config_reloads: dict[str, int] = {}  # applied / rejected
    tables: tuple[TableStatus, ...] = ()


class HealthSnapshot(msgspec.Struct, frozen=True):
    """Everything /health, /metrics and the status page show, taken at one moment."""

    status: Status
    mode: str
    uptime_secs: float
    stale_after_secs: float
    exchanges: tuple[ExchangeStatus, ...]
    pipeline: PipelineView


class _Sample(msgspec.Struct, frozen=True):
    at_ns: int
    messages: dict[str, tuple[int, int, int]]  # exchange -> (trades, books, disconnects)
    lags: dict[str, tuple[HistogramView, HistogramView]]


def worst(statuses: Iterable[Status]) -> Status:
    """Return the worst of `statuses` (down > stale > ok); ok when there are none."""
    return max(statuses, key=_STATUS_RANK.__getitem__, default="ok")


class StreamHealth:
    """Per-exchange stream state; `observe` on the hot path, `snapshot` when asked."""

    def __init__(
        self,
        config: HealthConfig,
        mode: str,
        exchanges: Iterable[str] = (),
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self.mode = mode
        self._clock_ns = clock_ns
        self._started_ns = clock_ns()
        self._stream = mode == "stream"
        self._max_drift_us = round(config.max_drift_secs * 1e6)
        self.exchanges: dict[str, ExchangeStats] = {}
        self._samples: deque[_Sample] = deque()
        self._last_status: dict[str, Status] = {}
        self.watch(exchanges)

    def __repr__(self) -> str:
        return f"<StreamHealth {self.mode} {list(self.exchanges.values())!r}>"

    def watch(self, exchanges: Iterable[str]) -> None:
        """Expect messages from `exchanges` from now on (configured or added by a refresh)."""
        now_ns = self._clock_ns()
        for name in exchanges:
            stats = self.exchanges.get(name)
            if stats is None:
                self.exchanges[name] = ExchangeStats(name, now_ns)
            elif stats.last_received_ns == 0:
                stats.watched_since_ns = now_ns

    def unwatch(self, exchanges: Iterable[str]) -> None:
        """Forget exchanges a refresh removed: their silence is expected now."""
        for name in exchanges:
            self.exchanges.pop(name, None)
            self._last_status.pop(name, None)

    def observe(self, kind: Kind, row: Row, received_ns: int) -> None:
        """Count one row; time its hops (row layout: tables.py)."""
        stats = self.exchanges.get(row[0])
        if stats is None:  # an exchange nobody configured: still worth seeing
            stats = self.exchanges[row[0]] = ExchangeStats(row[0], received_ns)
        stats.last_received_ns = received_ns
        stats.symbols[row[1]] = received_ns
        bound = self._max_drift_us
        # The histograms' observe() inlined: this runs for every message (~0.3 µs in all).
        if kind == "trade":
            stats.trades += 1
            local_us = row[9]
            lag_us = local_us - row[8]
            histogram = stats.exchange_lag
            histogram.counts[bisect_left(histogram.bounds_us, lag_us)] += 1
            histogram.sum_us += lag_us
            if not -bound <= lag_us <= bound:
                self._drifted(stats, "exchange_to_tardis", lag_us)
        else:
            stats.books += 1
            local_us = row[5]
        if self._stream:
            lag_us = received_ns // 1000 - local_us
            histogram = stats.source_lag
            histogram.counts[bisect_left(histogram.bounds_us, lag_us)] += 1
            histogram.sum_us += lag_us
            if not -bound <= lag_us <= bound:
                self._drifted(stats, "tardis_to_spot", lag_us)

    def record_gap(self, exchanges: Iterable[str], secs: float) -> None:
        """Count a time without data reported by the source (a reconnect in stream mode)."""
        for name in exchanges:
            stats = self.exchanges.get(name)
            if stats is not None:
                stats.gaps += 1
                stats.gap_secs += secs

    def _drifted(self, stats: ExchangeStats, hop: Hop, lag_us: int) -> None:
        stats.drift_events[hop] += 1
        now = time.monotonic()
        if now < stats.next_drift_log[hop]:
            return
        stats.next_drift_log[hop] = now + DRIFT_LOG_EVERY_SECS
        log.warning(
            "[!] Clock drift on %s: %s is %+.3f s, past the %.1f s bound (%d times so far). %s",
            stats.name,
            "a trade's localTimestamp − timestamp"
            if hop == "exchange_to_tardis"
            else "received_at − localTimestamp",
            lag_us / 1e6,
            self.config.max_drift_secs,
            stats.drift_events[hop],
            _drift_cause(hop, lag_us),
        )

    def status_of(self, stats: ExchangeStats, now_ns: int, connected: bool) -> Status:
        """Return `down` without a connection, `stale` after `stale_after_secs` of silence."""
        if not connected:
            return "down"
        since_ns = stats.last_received_ns or stats.watched_since_ns
        return "stale" if (now_ns - since_ns) / 1e9 > self.config.stale_after_secs else "ok"

    def tick(self, connected: frozenset[str], disconnects: Mapping[str, int]) -> None:
        """Record a rate sample and log status changes; call about once a second."""
        now_ns = self._clock_ns()
        self._samples.append(self._sample(now_ns, disconnects))
        window_ns = self.config.rate_window_secs * 1e9
        while len(self._samples) > 2 and now_ns - self._samples[1].at_ns >= window_ns:
            self._samples.popleft()
        for stats in self.exchanges.values():
            self._log_transition(stats, self.status_of(stats, now_ns, stats.name in connected))

    def _log_transition(self, stats: ExchangeStats, status: Status) -> None:
        before = self._last_status.get(stats.name)
        self._last_status[stats.name] = status
        if before is None and status != "ok":
            return  # starting up: not news
        if status == before or (before is None and status == "ok"):
            return
        age = (self._clock_ns() - (stats.last_received_ns or stats.watched_since_ns)) / 1e9
        if status == "ok":
            log.info("[+] %s stream is ok again (was %s)", stats.name, before)
        elif status == "stale":
            log.warning(
                "[!] %s stream is stale: no message for %.1f s (stale_after_secs = %.1f)",
                stats.name,
                age,
                self.config.stale_after_secs,
            )
        else:
            log.warning("[!] %s stream is down: no connection to Tardis Machine", stats.name)

    async def run_watch(
        self,
        view: Callable[[], tuple[frozenset[str], Mapping[str, int]]],
        interval_secs: float = 1.0,
    ) -> None:
        """Tick every `interval_secs` until cancelled; `view` returns (connected, disconnects)."""
        while True:
            connected, disconnects = view()
            self.tick(connected, disconnects)
            await asyncio.sleep(interval_secs)

    def _sample(self, now_ns: int, disconnects: Mapping[str, int]) -> _Sample:
        return _Sample(
            at_ns=now_ns,
            messages={
                name: (s.trades, s.books, disconnects.get(name, 0))
                for name, s in self.exchanges.items()
            },
            lags={
                name: (s.exchange_lag.view(), s.source_lag.view())
                for name, s in self.exchanges.items()
            },
        )

    def snapshot(self, pipeline: PipelineView) -> HealthSnapshot:
        """Return the state of every stream now, with `pipeline`'s counters alongside."""
        now_ns = self._clock_ns()
        now = self._sample(now_ns, pipeline.disconnects)
        oldest = self._samples[0] if self._samples else None
        exchanges = tuple(
            self._exchange_status(stats, now, oldest, pipeline) for stats in self.exchanges.values()
        )
        return HealthSnapshot(
            status=worst(exchange.status for exchange in exchanges),
            mode=self.mode,
            uptime_secs=(now_ns - self._started_ns) / 1e9,
            stale_after_secs=self.config.stale_after_secs,
            exchanges=exchanges,
            pipeline=pipeline,
        )

    def _exchange_status(
        self, stats: ExchangeStats, now: _Sample, oldest: _Sample | None, pipeline: PipelineView
    ) -> ExchangeStatus:
        name = stats.name
        trades, books, disconnects = now.messages[name]
        exchange_lag, source_lag = now.lags[name]
        earlier = oldest.lags.get(name) if oldest is not None else None
        return ExchangeStatus(
            exchange=name,
            status=self.status_of(stats, now.at_ns, name in pipeline.connected),
            last_message_age_secs=(now.at_ns - (stats.last_received_ns or stats.watched_since_ns))
            / 1e9,
            messages={"trade": trades, "book_snapshot": books, "disconnect": disconnects},
            rates=_rates(name, now, oldest),
            reconnects=pipeline.reconnects.get(name, 0),
            gaps=stats.gaps,
            gap_secs=stats.gap_secs,
            drift_events={str(hop): n for hop, n in stats.drift_events.items()},
            exchange_lag=exchange_lag,
            source_lag=source_lag,
            recent_exchange_lag=exchange_lag.minus(earlier[0] if earlier else None),
            recent_source_lag=source_lag.minus(earlier[1] if earlier else None),
            symbols={
                symbol: (now.at_ns - at_ns) / 1e9 for symbol, at_ns in sorted(stats.symbols.items())
            },
        )


def _rates(name: str, now: _Sample, oldest: _Sample | None) -> dict[str, float]:
    before = oldest.messages.get(name) if oldest is not None else None
    elapsed = (now.at_ns - oldest.at_ns) / 1e9 if oldest is not None else 0.0
    if before is None or elapsed <= 0:
        return {"trade": 0.0, "book_snapshot": 0.0, "disconnect": 0.0}
    current = now.messages[name]
    return {
        kind: (current[i] - before[i]) / elapsed
        for i, kind in enumerate(("trade", "book_snapshot", "disconnect"))
    }


def _drift_cause(hop: Hop, lag_us: int) -> str:
    if hop == "exchange_to_tardis":
        if lag_us < 0:
            return (
                "Tardis Machine stamped the trade before the exchange did: the clock of Tardis "
                "Machine's host is behind the exchange's (clock skew: check NTP there)."
            )
        return (
            "The exchange feed reaches Tardis Machine late, or the clock of Tardis Machine's "
            "host runs ahead (clock skew: check NTP there)."
        )
    if lag_us < 0:
        return (
            "spot received the message before Tardis Machine stamped it: spot's host clock is "
            "behind Tardis Machine's (clock skew between the hosts: check NTP on both)."
        )
    return (
        "spot reads behind Tardis Machine (a busy reader), or spot's host clock runs ahead of "
        "Tardis Machine's (clock skew between the hosts: check NTP on both)."
    )
