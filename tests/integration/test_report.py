from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spot.data_processor import book_row_us, trade_row_us
from spot.db_writer import PostgreSQLDatabase
from spot.report import build_report, format_report, write_html, write_png

START_US = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
SECOND_US = 1_000_000
HOLE_START_US = START_US + 3000 * SECOND_US  # 00:50:00
HOLE_END_US = START_US + 4200 * SECOND_US  # 01:10:00
LAG_US = 2500
RECEIVED = datetime(2024, 3, 2, tzinfo=UTC)


def planted_trades() -> list[tuple[object, ...]]:
    """A trade every second for two hours, except a 20-minute hole from 00:50 to 01:10."""
    rows = []
    for second in range(7200):
        at_us = START_US + second * SECOND_US
        if HOLE_START_US < at_us < HOLE_END_US:
            continue
        rows.append(
            trade_row_us(
                "binance", "BTCUSDT", str(second), "buy", 1.0, 1.0, at_us, at_us + LAG_US, RECEIVED
            )
        )
    return rows


def books(count: int) -> list[tuple[object, ...]]:
    sides = ([100.0], [1.0])
    return [
        book_row_us(
            "binance",
            "BTCUSDT",
            START_US + i * 100_000,
            START_US + i * 100_000 + 7,
            sides,
            sides,
            15,
            RECEIVED,
        )
        for i in range(count)
    ]


async def plant(pg_url: str, *, with_gaps_table: bool) -> None:
    async with PostgreSQLDatabase(pg_url, 15) as db:
        await db.copy_rows("trade_btc_usdt", planted_trades())
        await db.copy_rows("orderbook_btc_usdt", books(50))
        if with_gaps_table:
            start = datetime(2024, 3, 1, 0, 50, tzinfo=UTC)
            await db.insert_gaps(
                [("binance", start, start + timedelta(minutes=20), "reconnect", RECEIVED)]
            )


async def test_report_names_the_planted_gap_and_counts_rows_per_hour(pg_url: str) -> None:
    await plant(pg_url, with_gaps_table=False)

    async with PostgreSQLDatabase(pg_url, 15) as db:
        report = await build_report(db, top_gaps=3)

    trades = next(table for table in report.tables if table.table == "trade_btc_usdt")
    assert trades.rows == len(planted_trades())
    assert (trades.first_us, trades.last_us) == (START_US, START_US + 7199 * SECOND_US)
    widest = trades.largest_gaps[0]
    assert (widest.start_us, widest.end_us) == (HOLE_START_US, HOLE_END_US)
    assert trades.largest_gaps[1].secs == 1.0
    assert trades.hourly_rows == [(START_US, 3001), (START_US + 3600 * SECOND_US, 3000)]
    assert trades.lag_p50_ms == pytest.approx(2.5)
    assert report.recorded_gaps is None
    text = format_report(report)
    assert (
        "binance BTCUSDT  2024-03-01T00:50:00.000Z → 2024-03-01T01:10:00.000Z  1,200.000 s" in text
    )
    assert "no recorded gaps table" in text
    assert "orderbook_btc_usdt: 50 rows" in text


async def test_report_lists_recorded_gaps_and_honours_since_until(pg_url: str) -> None:
    await plant(pg_url, with_gaps_table=True)

    async with PostgreSQLDatabase(pg_url, 15) as db:
        report = await build_report(
            db, datetime(2024, 3, 1, 0, 30, tzinfo=UTC), datetime(2024, 3, 1, 1, 30, tzinfo=UTC)
        )

    trades = next(table for table in report.tables if table.table == "trade_btc_usdt")
    assert trades.first_us == START_US + 1800 * SECOND_US
    assert trades.last_us == START_US + 5399 * SECOND_US
    assert trades.largest_gaps[0].secs == 1200.0
    assert report.recorded_gaps is not None
    [gap] = report.recorded_gaps
    assert (gap.exchange, gap.reason) == ("binance", "reconnect")
    assert "Recorded gaps (spot_gaps): 1" in format_report(report)


async def test_charts_are_written_as_png_and_html(pg_url: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    await plant(pg_url, with_gaps_table=False)
    async with PostgreSQLDatabase(pg_url, 15) as db:
        report = await build_report(db)

    write_png(report, tmp_path / "report.png")
    write_html(report, tmp_path / "report.html")

    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "trade_btc_usdt: 6,001 rows" in page


def test_spot_report_command_prints_the_gap(pg_url: str, tmp_path: Path) -> None:
    asyncio.run(plant(pg_url, with_gaps_table=False))
    config = tmp_path / "spot.toml"
    config.write_text(f'[database]\nurl = "{pg_url}"\n')

    result = subprocess.run(
        [sys.executable, "-m", "spot", "report", "--config", str(config), "--gaps", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    assert result.returncode == 0, result.stderr
    assert "2024-03-01T00:50:00.000Z → 2024-03-01T01:10:00.000Z" in result.stdout
