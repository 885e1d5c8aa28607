from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from spot.db_writer import PostgreSQLDatabase
from spot.fallback_storage import FallbackStorage, LocalSpill
from spot.recovery import recover_spills
from spot.tables import TRADE_COLUMNS, Row, book_columns
from tests.database import row_count

MOMENT = datetime(2024, 3, 1, tzinfo=UTC)


def _trade(i: int) -> Row:
    us = 1_709_251_200_000_000 + i
    return ("binance", "BTCUSDT", str(i), "buy", 100.0 + i, 1.5, MOMENT, MOMENT, us, us, MOMENT)


async def test_a_spill_partly_stored_before_is_recovered_to_one_copy_of_each_row(
    pg_url: str, pg, tmp_path: Path
) -> None:
    storage = FallbackStorage(LocalSpill(tmp_path))
    rows = [_trade(i) for i in range(100)]
    await storage.write("trade_btc_usdt", TRADE_COLUMNS, rows)

    async with PostgreSQLDatabase(pg_url, 15) as db:
        await db.copy_rows("trade_btc_usdt", rows[:60])  # e.g. a write that did commit
        first = await recover_spills(db, storage, 15)
        second = await recover_spills(db, storage, 15)

    assert (first.files, first.rows_inserted, first.rows_duplicate) == (1, 40, 60)
    assert (second.files, second.rows_inserted) == (0, 0)
    assert await row_count(pg, "trade_btc_usdt") == 100
    assert await storage.pending() == []


async def test_a_spill_with_other_columns_stays_put_and_others_are_recovered(
    pg_url: str, pg, tmp_path: Path
) -> None:
    storage = FallbackStorage(LocalSpill(tmp_path))
    ten_levels = [("binance", "BTCUSDT", MOMENT, MOMENT, 1, 1, *[1.0] * 40, MOMENT)]
    odd = await storage.write("orderbook_btc_usdt", book_columns(10), ten_levels)
    await storage.write("trade_btc_usdt", TRADE_COLUMNS, [_trade(1)])

    async with PostgreSQLDatabase(pg_url, 15) as db:
        counters = await recover_spills(db, storage, 15)

    assert (counters.files, counters.files_failed) == (1, 1)
    assert await storage.pending() == [odd]
    assert await row_count(pg, "trade_btc_usdt") == 1


async def test_rows_postgresql_refuses_go_to_the_rejected_area_on_recovery(
    pg_url: str, pg, tmp_path: Path
) -> None:
    storage = FallbackStorage(LocalSpill(tmp_path))
    bad = ("binance", "BTCUSDT", "nul\x00id", *_trade(5)[3:])
    await storage.write("trade_btc_usdt", TRADE_COLUMNS, [_trade(1), bad, _trade(2)])

    async with PostgreSQLDatabase(pg_url, 15) as db:
        counters = await recover_spills(db, storage, 15)

    assert (counters.rows_inserted, counters.rows_rejected) == (2, 1)
    assert [(await storage.read(ref)).rows for ref in await storage.rejected()] == [[bad]]
    assert await storage.pending() == []


async def test_gaps_are_recorded_once(pg_url: str, pg) -> None:
    gap = ("binance", MOMENT, MOMENT, "disconnect", MOMENT)
    async with PostgreSQLDatabase(pg_url, 15) as db:
        assert await db.insert_gaps([gap]) == 1
        assert await db.insert_gaps([gap]) == 0

    assert await row_count(pg, "spot_gaps") == 1


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
async def test_stream_overflow_is_spilled_in_few_files_and_recovered(
    compression: str, pg_url: str, pg, tmp_path: Path
) -> None:
    from spot.fallback_storage import SpillBuffer
    from spot.queue_manager import QueueManager

    storage = FallbackStorage(LocalSpill(tmp_path), compression)  # type: ignore[arg-type]
    buffer = SpillBuffer(storage, lambda table: TRADE_COLUMNS, max_rows=400, max_age_secs=60)
    queues = QueueManager(10, "stream", stream_put_timeout_secs=0.01, on_overflow=buffer.add)
    flusher = asyncio.create_task(buffer.run())

    for i in range(1000):  # nobody drains the queue: all but 10 rows overflow
        await queues.put("trade", "btc_usdt", _trade(i))
    buffer.close()
    await flusher

    assert queues.overflowed_rows == buffer.rows_spilled == 990
    assert len(await storage.pending()) == 3  # 400 + 400 + the rest at close
    async with PostgreSQLDatabase(pg_url, 15) as db:
        counters = await recover_spills(db, storage, 15)
    assert counters.rows_inserted == 990
    assert await row_count(pg, "trade_btc_usdt") == 990


async def test_a_refusal_at_start_is_a_config_error_even_with_a_spill_to_fall_back_on(
    pg_url: str,
) -> None:
    from spot.errors import ConfigError

    info = psycopg.conninfo.conninfo_to_dict(pg_url)
    info["dbname"] = "spot_no_such_database"
    db = PostgreSQLDatabase(
        psycopg.conninfo.make_conninfo("", **info), 15, require_connection=False
    )

    with pytest.raises(ConfigError, match="does not exist"):
        await db.open()
