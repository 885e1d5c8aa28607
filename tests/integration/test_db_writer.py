from __future__ import annotations

from datetime import UTC, datetime

import pytest

from spot.db_writer import PostgreSQLDatabase, QueueProcessor, redact_dsn
from spot.errors import DatabaseUnavailable, SchemaMismatch
from spot.tables import Row, book_columns
from tests.database import row_count

MOMENT = datetime(2024, 3, 1, tzinfo=UTC)


def _trade(i: int, trade_id: str | None = None) -> Row:
    us = 1_709_251_200_000_000 + i
    return (
        "binance",
        "BTCUSDT",
        trade_id or str(i),
        "buy",
        100.0 + i,
        1.5,
        MOMENT,
        MOMENT,
        us,
        us,
        MOMENT,
    )


def _book(i: int, levels: int = 15) -> Row:
    us = 1_709_251_200_000_000 + i
    sides = [float(i)] * (4 * levels)
    return ("binance", "BTCUSDT", MOMENT, MOMENT, us, us, *sides, MOMENT)


async def test_copy_rows_creates_the_table_and_writes_every_row(pg_url: str, pg) -> None:
    async with PostgreSQLDatabase(pg_url, 15) as db:
        inserted = await db.copy_rows("trade_btc_usdt", [_trade(i) for i in range(1000)])
        books = await db.copy_rows("orderbook_btc_usdt", [_book(i) for i in range(10)])

    assert (inserted, books) == (1000, 10)
    assert await row_count(pg, "trade_btc_usdt") == 1000
    cursor = await pg.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orderbook_btc_usdt'"
    )
    assert (await cursor.fetchone()) == (len(book_columns(15)),)


async def test_a_batch_written_twice_leaves_one_copy_and_new_rows_still_land(
    pg_url: str, pg
) -> None:
    async with PostgreSQLDatabase(pg_url, 15) as db:
        await db.copy_rows("trade_btc_usdt", [_trade(i) for i in range(100)])
        again = await db.copy_rows("trade_btc_usdt", [_trade(i) for i in range(150)])

    assert again == 50
    assert await row_count(pg, "trade_btc_usdt") == 150


async def test_existing_table_with_other_levels_is_an_error_naming_both(pg_url: str) -> None:
    async with PostgreSQLDatabase(pg_url, 10) as db:
        await db.ensure_table("orderbook_eth_usdt")
    async with PostgreSQLDatabase(pg_url, 15) as db:
        with pytest.raises(SchemaMismatch) as raised:
            await db.ensure_table("orderbook_eth_usdt")

    message = str(raised.value)
    assert "orderbook_eth_usdt" in message and "10" in message and "15" in message


async def test_unsafe_table_names_are_refused_before_any_sql(pg_url: str) -> None:
    async with PostgreSQLDatabase(pg_url, 15) as db:
        with pytest.raises(ValueError, match=r"not a spot table|unsafe"):
            await db.ensure_table('trade_x"; DROP TABLE x; --')


async def test_unreachable_database_is_database_unavailable() -> None:
    db = PostgreSQLDatabase(
        "postgresql://nobody:secret@127.0.0.1:9/none", 15, connect_timeout_secs=1
    )
    with pytest.raises(DatabaseUnavailable) as raised:
        await db.open()

    assert "secret" not in str(raised.value)


def test_redact_dsn_hides_passwords() -> None:
    assert "hunter2" not in redact_dsn("postgresql://u:hunter2@h:5432/d")
    assert "hunter2" not in redact_dsn("host=h password=hunter2 dbname=d")


async def test_queue_processor_logs_inserted_rows_per_batch(
    pg_url: str, pg, caplog: pytest.LogCaptureFixture
) -> None:
    async def batches():  # type: ignore[no-untyped-def]
        yield [_book(i) for i in range(7)]
        yield [_book(i) for i in range(7, 10)]

    caplog.set_level("INFO")
    async with PostgreSQLDatabase(pg_url, 15) as db:
        writer = QueueProcessor(db, "orderbook_eth_usdt", batches())
        await writer.run()

    assert "[✅] Inserted 7 rows into orderbook_eth_usdt" in caplog.text
    assert "[✅] Inserted 3 rows into orderbook_eth_usdt" in caplog.text
    assert writer.counters.rows_inserted == 10
    assert await row_count(pg, "orderbook_eth_usdt") == 10
