from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spot.config import Settings, settings_from_dict
from spot.main_loop import run, tardis_source
from spot.serve import ServeOptions, TardisMachineServer
from tests.database import table_counts
from tests.integration.capture_builder import mixed_capture


def replay_settings(ws_url: str, pg_url: str, **extra: object) -> Settings:
    raw: dict[str, object] = {
        "tardis": {
            "url": ws_url,
            "mode": "replay",
            "from": "2024-03-01",
            "to": "2024-03-02",
            "reconnect_initial_secs": 0.05,
        },
        "exchanges": [
            {"name": "binance", "symbols": ["BTCUSDT", "ETHUSDT"]},
            {"name": "coinbase", "symbols": ["BTC-USD"]},
        ],
        "queue": {"batch_size": 500, "flush_interval_secs": 0.05},
        "database": {"url": pg_url},
    }
    raw.update(extra)
    return settings_from_dict(raw)


async def test_replay_stores_exactly_the_sent_rows_and_counts_the_rest(
    tmp_path: Path, pg_url: str, pg
) -> None:
    capture = mixed_capture(1000, garbage_every=100)
    path = capture.write(tmp_path / "capture.ndjson")
    options = ServeOptions(captures=(path,), passthrough_invalid=True)

    async with TardisMachineServer(options) as server:
        summary = await run(replay_settings(server.ws_url, pg_url))

    assert summary.completed
    assert await table_counts(pg) == dict(capture.expected_rows)
    assert not summary.processor.skipped_types  # book_change was not asked for, so not sent
    assert sum(summary.processor.invalid.values()) == capture.garbage == 20
    assert summary.rows_inserted == sum(capture.expected_rows.values())


async def test_thin_books_are_padded_with_null_and_values_survive(
    tmp_path: Path, pg_url: str, pg
) -> None:
    path = mixed_capture(10).write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        await run(replay_settings(server.ws_url, pg_url))

    cursor = await pg.execute(
        "SELECT exchange, symbol, timestamp_us, local_timestamp_us, bid_price_1, bid_amount_4,"
        " bid_price_5, ask_price_4, ask_amount_15, timestamp = to_timestamp(0) + timestamp_us"
        " * interval '1 microsecond' FROM orderbook_eth_usdt ORDER BY timestamp_us LIMIT 1"
    )
    assert await cursor.fetchone() == (
        "binance",
        "ETHUSDT",
        1_709_251_200_000_000,
        1_709_251_200_001_234,
        100.0,
        4.0,
        None,
        104.0,
        None,
        True,
    )
    cursor = await pg.execute("SELECT count(*), count(bid_price_1) FROM orderbook_btc_usd")
    assert await cursor.fetchone() == (5, 0)  # an empty book: every level NULL
    cursor = await pg.execute("SELECT count(DISTINCT trade_id), count(*) FROM trade_btc_usd")
    assert await cursor.fetchone() == (10, 10)  # id-less trades sharing timestamps all kept


async def test_replaying_again_adds_no_duplicates(tmp_path: Path, pg_url: str, pg) -> None:
    capture = mixed_capture(300)
    path = capture.write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        await run(replay_settings(server.ws_url, pg_url))
        second = await run(replay_settings(server.ws_url, pg_url))

    assert second.rows_inserted == 0
    assert sum(w.rows_duplicate for w in second.writers.values()) == sum(
        capture.expected_rows.values()
    )
    assert await table_counts(pg) == dict(capture.expected_rows)


async def test_dropped_replay_resumes_without_gap_or_duplicate(
    tmp_path: Path, pg_url: str, pg
) -> None:
    # Tardis Machine resumes from the minute, so a drop must come later than one minute of data
    # (about 2,000 messages here) for a connection to make progress.
    capture = mixed_capture(2000)
    path = capture.write(tmp_path / "capture.ndjson")
    options = ServeOptions(captures=(path,), drop_every=3000)

    async with TardisMachineServer(options) as server:
        source = tardis_source(replay_settings(server.ws_url, pg_url))
        summary = await run(replay_settings(server.ws_url, pg_url), source)

    assert source.connects >= 3
    assert source.frames_skipped_on_resume > 0
    assert summary.completed
    assert await table_counts(pg) == dict(capture.expected_rows)
    assert sum(w.rows_duplicate for w in summary.writers.values()) == 0


async def test_error_close_is_raised_after_storing_what_arrived(
    pg_url: str, tmp_path: Path
) -> None:
    path = mixed_capture(10).write(tmp_path / "capture.ndjson")
    settings = replay_settings("ws://127.0.0.1:1", pg_url)
    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        bad = settings_from_dict(
            {
                "tardis": {
                    "url": server.ws_url,
                    "mode": "replay",
                    "from": "2024-03-02",
                    "to": "2024-03-01",
                },
                "exchanges": [{"name": "binance", "symbols": ["BTCUSDT"]}],
                "database": {"url": pg_url},
            }
        )
        from spot.errors import ServerClosedWithError

        with pytest.raises(ServerClosedWithError) as raised:
            await asyncio.wait_for(run(bad), 20)

    assert raised.value.code == 1011
    assert settings.database.url == pg_url


async def test_no_database_url_uses_the_embedded_server(tmp_path: Path) -> None:
    path = mixed_capture(20).write(tmp_path / "capture.ndjson")
    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = replay_settings(
            server.ws_url, "", database={"url": "", "embedded_data_dir": str(tmp_path / "embedded")}
        )
        summary = await run(settings)

    assert summary.completed
    assert summary.rows_inserted == sum(mixed_capture(20).expected_rows.values())
    assert (tmp_path / "embedded" / "PG_VERSION").exists()
