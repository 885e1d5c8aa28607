"""Completeness report: what the tables hold, where they have holes, and how late the data was.

Per table: rows, first and last timestamp, the largest gaps between consecutive rows of one
symbol (a window function over timestamp_us), rows per hour and, for trades, the exchange →
Tardis Machine lag (localTimestamp - timestamp; on book snapshots that difference is not latency).
Then the gaps spot recorded while running (the spot_gaps table, when it exists). `spot report`
prints it; `--html` and `--png` also draw hourly rows and lag per ticker (the `report` extra:
matplotlib).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from spot.errors import SpotError
from spot.tables import quote_ident, validated_table_name

GAPS_TABLE: Final = "spot_gaps"  # written by the running service (db_writer, gaps.py)
HOUR_US: Final = 3_600_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_FAR_PAST_US: Final = -(2**62)
_FAR_FUTURE_US: Final = 2**62


class Database(Protocol):
    """What the report needs of PostgreSQL (db_writer.PostgreSQLDatabase has it)."""

    async def execute(
        self, query: str, params: Sequence[object] | None = None
    ) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class GapFound:
    """A time between two consecutive rows of one symbol."""

    exchange: str
    symbol: str
    start_us: int
    end_us: int

    @property
    def secs(self) -> float:
        return (self.end_us - self.start_us) / 1e6


@dataclass(frozen=True)
class RecordedGap:
    """A row of spot_gaps: a reconnect or a Tardis Machine disconnect message."""

    exchange: str
    start: datetime
    end: datetime
    reason: str


@dataclass(frozen=True)
class TableReport:
    """One table's completeness."""

    table: str
    rows: int
    first_us: int | None
    last_us: int | None
    largest_gaps: list[GapFound]
    hourly_rows: list[tuple[int, int]]  # (hour start, Unix µs; rows)
    hourly_lag_ms: list[tuple[int, float]]  # trades: median localTimestamp - timestamp per hour
    lag_p50_ms: float | None
    lag_p99_ms: float | None


@dataclass(frozen=True)
class Report:
    """The whole report; `recorded_gaps` is None when there is no spot_gaps table."""

    since_us: int | None
    until_us: int | None
    tables: list[TableReport]
    recorded_gaps: list[RecordedGap] | None


def to_us(moment: datetime) -> int:
    """Return a datetime (naive = UTC) as Unix microseconds."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def format_us(unix_us: int | None) -> str:
    """Return Unix microseconds as an ISO UTC time with milliseconds, '-' for None."""
    if unix_us is None:
        return "-"
    moment = _EPOCH + timedelta(microseconds=unix_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


async def spot_tables(db: Database) -> list[str]:
    """Return spot's data tables in the current schema, sorted."""
    rows = await db.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        " AND table_name ~ '^(orderbook|trade)_[a-z0-9_]+$' ORDER BY table_name"
    )
    names = []
    for (name,) in rows:
        try:
            names.append(validated_table_name(str(name)))
        except ValueError:  # a look-alike someone else created: not ours to report
            continue
    return names


async def build_report(
    db: Database,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    top_gaps: int = 5,
) -> Report:
    """Query every spot table (rows with since <= timestamp < until) and spot_gaps."""
    since_us = to_us(since) if since else None
    until_us = to_us(until) if until else None
    window = (
        _FAR_PAST_US if since_us is None else since_us,
        _FAR_FUTURE_US if until_us is None else until_us,
    )
    tables = [await _table_report(db, table, window, top_gaps) for table in await spot_tables(db)]
    return Report(since_us, until_us, tables, await _recorded_gaps(db, since, until))


async def _table_report(
    db: Database, table: str, window: tuple[int, int], top_gaps: int
) -> TableReport:
    name = quote_ident(table)  # validated by spot_tables
    where = "timestamp_us >= %s AND timestamp_us < %s"
    [(rows, first_us, last_us)] = await db.execute(
        f"SELECT count(*), min(timestamp_us), max(timestamp_us) FROM {name} WHERE {where}", window
    )
    gaps = await db.execute(
        "SELECT exchange, symbol, timestamp_us, next_us FROM ("
        " SELECT exchange, symbol, timestamp_us, lead(timestamp_us) OVER"
        f" (PARTITION BY exchange, symbol ORDER BY timestamp_us) AS next_us FROM {name}"
        f" WHERE {where}) AS consecutive"
        " WHERE next_us IS NOT NULL ORDER BY next_us - timestamp_us DESC LIMIT %s",
        (*window, top_gaps),
    )
    hourly = await db.execute(
        f"SELECT timestamp_us / {HOUR_US} * {HOUR_US} AS hour, count(*) FROM {name}"
        f" WHERE {where} GROUP BY 1 ORDER BY 1",
        window,
    )
    lag_hourly: list[tuple[Any, ...]] = []
    lag: list[tuple[Any, ...]] = [(None, None)]
    if table.startswith("trade_"):
        lag_ms = "(local_timestamp_us - timestamp_us) / 1000.0"
        lag_hourly = await db.execute(
            f"SELECT timestamp_us / {HOUR_US} * {HOUR_US},"
            f" percentile_cont(0.5) WITHIN GROUP (ORDER BY {lag_ms})"
            f" FROM {name} WHERE {where} GROUP BY 1 ORDER BY 1",
            window,
        )
        lag = await db.execute(
            f"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY {lag_ms}),"
            f" percentile_cont(0.99) WITHIN GROUP (ORDER BY {lag_ms}) FROM {name} WHERE {where}",
            window,
        )
    return TableReport(
        table=table,
        rows=int(rows),
        first_us=first_us,
        last_us=last_us,
        largest_gaps=[GapFound(str(e), str(s), int(a), int(b)) for e, s, a, b in gaps],
        hourly_rows=[(int(hour), int(count)) for hour, count in hourly],
        hourly_lag_ms=[(int(hour), float(ms)) for hour, ms in lag_hourly],
        lag_p50_ms=None if lag[0][0] is None else float(lag[0][0]),
        lag_p99_ms=None if lag[0][1] is None else float(lag[0][1]),
    )


async def _recorded_gaps(
    db: Database, since: datetime | None, until: datetime | None
) -> list[RecordedGap] | None:
    [(exists,)] = await db.execute("SELECT to_regclass(%s) IS NOT NULL", (GAPS_TABLE,))
    if not exists:
        return None
    far_past, far_future = datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC)
    rows = await db.execute(
        f"SELECT exchange, gap_start, gap_end, reason FROM {quote_ident(GAPS_TABLE)}"
        " WHERE gap_end >= %s AND gap_start < %s ORDER BY gap_start, exchange",
        (since or far_past, until or far_future),
    )
    return [RecordedGap(str(e), start, end, str(reason)) for e, start, end, reason in rows]


# Text


def format_report(report: Report) -> str:
    """Return the report as plain text, one section per table, recorded gaps last."""
    span = f"{format_us(report.since_us)} … {format_us(report.until_us)}"
    lines = [f"spot report: {len(report.tables)} tables, timestamps {span}", ""]
    for table in report.tables:
        lines.extend(_table_lines(table))
        lines.append("")
    lines.extend(_recorded_gap_lines(report.recorded_gaps))
    return "\n".join(lines)


def _table_lines(table: TableReport) -> list[str]:
    lines = [
        f"{table.table}: {table.rows:,} rows, "
        f"first {format_us(table.first_us)}, last {format_us(table.last_us)}"
    ]
    if table.lag_p50_ms is not None and table.lag_p99_ms is not None:
        lines.append(
            f"  exchange → Tardis Machine lag: p50 {table.lag_p50_ms:.1f} ms, "
            f"p99 {table.lag_p99_ms:.1f} ms"
        )
    if table.largest_gaps:
        lines.append("  largest gaps between consecutive rows:")
        lines.extend(
            f"    {gap.exchange} {gap.symbol}  {format_us(gap.start_us)} → "
            f"{format_us(gap.end_us)}  {gap.secs:,.3f} s"
            for gap in table.largest_gaps
        )
    if table.hourly_rows:
        lines.append("  rows per hour:")
        lines.extend(
            f"    {format_us(hour)[:13]}h  {count:>10,}" for hour, count in table.hourly_rows
        )
    return lines


def _recorded_gap_lines(gaps: list[RecordedGap] | None) -> list[str]:
    if gaps is None:
        return ["Recorded gaps: no recorded gaps table (spot_gaps)"]
    lines = [f"Recorded gaps (spot_gaps): {len(gaps)}"]
    lines.extend(
        f"  {gap.exchange}  {gap.start.isoformat()} → {gap.end.isoformat()}  "
        f"{(gap.end - gap.start).total_seconds():,.3f} s  {gap.reason}"
        for gap in gaps
    )
    return lines


# Charts (the `report` extra)


def chart_png(report: Report) -> bytes:
    """Return a PNG of hourly rows per table and hourly median trade lag per ticker."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SpotError("charts need matplotlib: pip install 'spot-ingest[report]'") from None
    figure = Figure(figsize=(10, 7), layout="constrained")
    rows_axes, lag_axes = figure.subplots(2, 1, sharex=True)
    for table in report.tables:
        if table.hourly_rows:
            hours, counts = zip(*table.hourly_rows, strict=True)
            rows_axes.plot([_hour(h) for h in hours], counts, marker="o", label=table.table)
        if table.hourly_lag_ms:
            hours, lags = zip(*table.hourly_lag_ms, strict=True)
            lag_axes.plot([_hour(h) for h in hours], lags, marker="o", label=table.table)
    rows_axes.set_title("Rows per hour")
    rows_axes.set_ylabel("rows")
    lag_axes.set_title("Trades: median exchange → Tardis Machine lag per hour")
    lag_axes.set_ylabel("ms")
    lag_axes.set_xlabel("hour (UTC)")
    for axes in (rows_axes, lag_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _hour(unix_us: int) -> datetime:
    return (_EPOCH + timedelta(microseconds=unix_us)).replace(tzinfo=None)


def write_png(report: Report, path: Path) -> None:
    """Write the charts as a PNG file."""
    path.write_bytes(chart_png(report))


def write_html(report: Report, path: Path) -> None:
    """Write a self-contained HTML page: the charts (inline PNG) and the text report."""
    image = base64.b64encode(chart_png(report)).decode()
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>spot report</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:1.5em} pre{font-size:13px}</style>"
        "</head><body><h1>spot report</h1>"
        f"<img alt='hourly rows and lag per ticker' src='data:image/png;base64,{image}'>"
        f"<pre>{html.escape(format_report(report))}</pre></body></html>",
        encoding="utf-8",
    )
