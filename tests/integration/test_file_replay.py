"""`spot replay` and the HTTP transport against a real PostgreSQL, on real and generated files."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from spot.cli import app
from spot.config import Settings, settings_from_dict
from spot.db_writer import PostgreSQLDatabase
from spot.errors import BadInputFile, SchemaMismatch, SourceError
from spot.file_replay import FileReplaySource, book_snapshot_header
from spot.incremental_book import IncrementalBooks
from spot.main_loop import Pipeline, RunSummary, run, run_files, tardis_source
from spot.serve import ServeOptions, TardisMachineServer
from tests.conftest import fixture_path
from tests.database import fresh_database, table_counts

ROOT = Path(__file__).parents[2]
TRADES_HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount"
INCREMENTAL_HEADER = "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"
START_US = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
PG = psycopg.AsyncConnection[tuple[object, ...]]


def settings_for(pg_url: str, **extra: object) -> Settings:
    raw: dict[str, object] = {
        "database": {"url": pg_url},
        "queue": {"batch_size": 2000, "flush_interval_secs": 0.05},
        **extra,
    }
    return settings_from_dict(raw)


async def replay(pg_url: str, *paths: Path, **extra: object) -> tuple[RunSummary, FileReplaySource]:
    settings = settings_for(pg_url, **extra)
    source = FileReplaySource(paths, snapshot_interval_ms=settings.book.interval_ms)
    return await run_files(settings, source), source


async def stored_rows(pg: PG, table: str) -> list[tuple[object, ...]]:
    """Every row of `table` without received_at (the only column a replay may change)."""
    cursor = await pg.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
        "AND column_name <> 'received_at' ORDER BY ordinal_position",
        (table,),
    )
    columns = ", ".join(f'"{name}"' for (name,) in await cursor.fetchall())
    cursor = await pg.execute(f'SELECT {columns} FROM "{table}" ORDER BY {columns}')
    return await cursor.fetchall()


def csv_rows(name: str) -> list[list[str]]:
    with fixture_path("tardis", name).open(newline="") as file:
        return list(csv.reader(file))[1:]


def floats(cells: list[str]) -> list[float | None]:
    return [float(cell) if cell else None for cell in cells]


def iso(unix_us: int, digits: int) -> str:
    text = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=unix_us)).isoformat()
    seconds, _, fraction = text.removesuffix("+00:00").partition(".")
    return f"{seconds}.{(fraction or '0').ljust(6, '0')[:digits]}Z"


# The real samples


async def test_book_snapshot_25_sample_is_cut_to_15_levels(pg_url: str, pg: PG) -> None:
    summary, _ = await replay(
        pg_url, fixture_path("tardis", "binance-futures_book_snapshot_25_BTCUSDT.csv")
    )

    rows = await stored_rows(pg, "orderbook_btc_usdt")
    first = csv_rows("binance-futures_book_snapshot_25_BTCUSDT.csv")[0]
    assert summary.completed and len(rows) == 10
    assert rows[0][:6] == (
        "binance-futures", "BTCUSDT",
        datetime(2020, 9, 1, 0, 0, 3, 696000, tzinfo=UTC),
        datetime(2020, 9, 1, 0, 0, 3, 810979, tzinfo=UTC),
        1598918403696000, 1598918403810979,
    )  # fmt: skip
    levels = rows[0][6:]
    assert len(levels) == 60  # 15 levels x (bid, ask) x (price, amount): 25 were cut to 15
    assert levels[:15] == tuple(floats(first[6::4][:15]))  # bid prices
    assert levels[15:30] == tuple(floats(first[7::4][:15]))  # bid amounts
    assert levels[30:45] == tuple(floats(first[4::4][:15]))  # ask prices
    assert levels[45:] == tuple(floats(first[5::4][:15]))  # ask amounts
    assert (levels[0], levels[15], levels[30], levels[45]) == (11657.07, 10.896, 11657.08, 1.714)


async def test_book_snapshot_5_sample_is_padded_to_15_levels_with_null(pg_url: str, pg: PG) -> None:
    await replay(pg_url, fixture_path("tardis", "binance-futures_book_snapshot_5_BTCUSDT.csv"))

    rows = await stored_rows(pg, "orderbook_btc_usdt")
    assert len(rows) == 10
    bid_prices, ask_amounts = rows[0][6:21], rows[0][51:66]
    assert bid_prices == (11657.07, 11656.97, 11655.78, 11655.77, 11655.68, *[None] * 10)
    assert ask_amounts == (1.714, 5.4, 0.238, 0.077, 0.918, *[None] * 10)


async def test_bitmex_trades_sample_keeps_trades_that_share_a_timestamp(
    pg_url: str, pg: PG
) -> None:
    await replay(pg_url, fixture_path("tardis", "bitmex_trades_XBTUSD.csv"))

    rows = await stored_rows(pg, "trade_xbt_usd")
    expected = csv_rows("bitmex_trades_XBTUSD.csv")
    assert len(rows) == len(expected) == 10
    by_id = {row[2]: row for row in rows}
    for exchange, symbol, timestamp, local, trade_id, side, price, amount in expected:
        stored = by_id[trade_id]
        assert stored[:6] == (exchange, symbol, trade_id, side, float(price), float(amount))
        assert stored[8:] == (int(timestamp), int(local))
        assert stored[6] == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            microseconds=int(timestamp)
        )
    shared = [row for row in rows if row[8] == 1583020803276000]
    assert len(shared) == sum(1 for r in expected if r[2] == "1583020803276000") > 1


async def test_deribit_incremental_sample_gives_its_opening_snapshot(pg_url: str, pg: PG) -> None:
    await replay(pg_url, fixture_path("tardis", "deribit_incremental_book_L2_BTC-PERPETUAL.csv"))

    rows = await stored_rows(pg, "orderbook_btc_perpetual")
    asks = csv_rows("deribit_incremental_book_L2_BTC-PERPETUAL.csv")
    assert len(rows) == 1
    assert rows[0][4:6] == (1585699200245000, 1585699200355684)
    assert rows[0][6:36] == (None,) * 30  # the snapshot run holds asks only
    assert rows[0][36:51] == tuple(float(r[6]) for r in asks)
    assert rows[0][51:66] == tuple(float(r[7]) for r in asks)


# Generated files of every format


def trades_csv(count: int, *, first_us: int = START_US, symbol: str = "XBTUSD") -> str:
    """Trades sharing timestamps in threes; every fourth without id."""
    lines = [TRADES_HEADER]
    for n in range(count):
        at = first_us + (n // 3) * 1500
        trade_id = "" if n % 4 == 0 else f"t{n}"
        side = "buy" if n % 2 else "sell"
        lines.append(f"bitmex,{symbol},{at},{at + 777},{trade_id},{side},{100 + n % 5},{n % 3 + 1}")
    return "\n".join(lines) + "\n"


def thin_book_csv(count: int) -> str:
    """book_snapshot_5 rows whose book has 1..5 levels: the rest are empty cells."""
    lines = [",".join(book_snapshot_header(5))]
    for n in range(count):
        at = START_US + n * 100_000
        real = n % 5 + 1
        cells = []
        for i in range(5):
            level = [101 + i, 1 + i, 100 - i, 2 + i] if i < real else ["", "", "", ""]
            cells.extend(map(str, level))
        lines.append(f"binance,ETHUSDT,{at},{at + 2000},{','.join(cells)}")
    return "\n".join(lines) + "\n"


def incremental_csv(changes: int) -> str:
    lines = [INCREMENTAL_HEADER]
    for level in range(20):
        lines.append(f"deribit,ETH-PERPETUAL,{START_US},{START_US + 5},true,bid,{1000 - level},1")
        lines.append(f"deribit,ETH-PERPETUAL,{START_US},{START_US + 5},true,ask,{1001 + level},1")
    for n in range(changes):
        at = START_US + 1000 + n * 7_000
        side, price = ("bid", 1000 - n % 25) if n % 2 else ("ask", 1001 + n % 25)
        lines.append(f"deribit,ETH-PERPETUAL,{at},{at + 300},false,{side},{price},{n % 4}")
    return "\n".join(lines) + "\n"


def machine_capture(count: int) -> list[str]:
    """Normalized Tardis Machine lines: trades (some without id) and thin book snapshots."""
    lines = []
    for n in range(count):
        at = START_US + n * 50_000
        if n % 2:
            trade: dict[str, object] = {"type": "trade", "symbol": "BTCUSDT", "exchange": "binance"}
            if n % 3:
                trade["id"] = str(n)
            trade.update(
                price=61000 + n % 7, amount=0.5, side="buy",
                timestamp=iso(at, 3), localTimestamp=iso(at + 1234, 6),
            )  # fmt: skip
            lines.append(json.dumps(trade, separators=(",", ":")))
            continue
        real = n % 15
        bids = [{"price": 100.0 - i, "amount": 1.0 + i} for i in range(real)]
        asks = [{"price": 101.0 + i, "amount": 2.0 + i} for i in range(real)]
        empty: list[dict[str, float]] = [{}] * (15 - real)
        snapshot = {
            "type": "book_snapshot", "symbol": "BTCUSDT", "exchange": "binance",
            "name": "book_snapshot_15_100ms", "depth": 15, "interval": 100,
            "bids": bids + empty, "asks": asks + empty,
            "timestamp": iso(at, 3), "localTimestamp": iso(at + 2345, 6),
        }  # fmt: skip
        lines.append(json.dumps(snapshot, separators=(",", ":")))
    return lines


def write(path: Path, text: str, *, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


async def test_generated_files_of_every_format_plain_and_gzip(
    tmp_path: Path, pg_url: str, pg: PG
) -> None:
    # Arrange
    l2_text = incremental_csv(3000)
    books = IncrementalBooks(15, 100)
    expected_snapshots = 0
    for record in list(csv.reader(l2_text.splitlines()))[1:]:
        level = (record[5] == "bid", float(record[6]), float(record[7]))
        key = (record[0], record[1], int(record[2]), int(record[3]), record[4] == "true")
        expected_snapshots += len(books.add(*key, level))
    expected_snapshots += len(books.finish())
    files = [
        write(tmp_path / "trades.csv.gz", trades_csv(1000), compress=True),
        write(tmp_path / "book5.csv", thin_book_csv(200)),
        write(tmp_path / "l2.csv.gz", l2_text, compress=True),
        write(tmp_path / "capture.ndjson.gz", "\n".join(machine_capture(400)), compress=True),
        write(tmp_path / "capture.ndjson", "\n".join(machine_capture(10)) + "\n"),
    ]

    # Act
    summary, source = await replay(pg_url, *files)

    # Assert
    assert summary.completed and all(report.completed for report in source.reports)
    assert await table_counts(pg) == {
        "trade_xbt_usd": 1000,
        "orderbook_eth_usdt": 200,
        "orderbook_eth_perpetual": expected_snapshots,
        "trade_btc_usdt": 200,
        "orderbook_btc_usdt": 200,  # capture.ndjson repeats the first 10 lines: stored once
    }
    assert 100 < expected_snapshots < 3000
    thin = [row for row in await stored_rows(pg, "orderbook_eth_usdt") if row[4] == START_US]
    assert thin[0][6:21] == (100.0, *[None] * 14)  # one bid level, 14 NULL
    assert summary.writers["orderbook_btc_usdt"].rows_duplicate == 5


async def test_csv_ndjson_websocket_and_http_store_identical_rows(
    tmp_path: Path, pg_url: str, pg: PG
) -> None:
    # Arrange: one capture, and its trades again as a Tardis trades CSV.
    capture = machine_capture(600)
    ndjson = write(tmp_path / "capture.ndjson", "\n".join(capture) + "\n")
    csv_lines = [TRADES_HEADER]
    for message in map(json.loads, capture):
        if message["type"] == "trade":
            csv_lines.append(
                f"binance,BTCUSDT,{_us(message['timestamp'])},{_us(message['localTimestamp'])},"
                f"{message.get('id', '')},{message['side']},{message['price']},{message['amount']}"
            )
    trades = write(tmp_path / "trades.csv.gz", "\n".join(csv_lines) + "\n", compress=True)
    tables = ("orderbook_btc_usdt", "trade_btc_usdt")

    async def stored_then_dropped() -> dict[str, list[tuple[object, ...]]]:
        rows = {table: await stored_rows(pg, table) for table in tables}
        for table in tables:
            await pg.execute(f'DROP TABLE IF EXISTS "{table}"')
        return rows

    # Act
    await replay(pg_url, ndjson)
    from_file = await stored_then_dropped()
    async with TardisMachineServer(ServeOptions(captures=(ndjson,))) as server:
        tardis = {"mode": "replay", "from": "2024-03-01", "to": "2024-03-02"}
        exchanges = [{"name": "binance", "symbols": ["BTCUSDT"]}]
        ws = settings_for(pg_url, tardis={"url": server.ws_url, **tardis}, exchanges=exchanges)
        await run(ws)
        from_websocket = await stored_then_dropped()
        http = settings_for(
            pg_url,
            tardis={"url": server.http_url, "transport": "http", **tardis},
            exchanges=exchanges,
        )
        http_summary = await run(http)
        from_http = await stored_then_dropped()
    await replay(pg_url, trades)
    from_csv = await stored_rows(pg, "trade_btc_usdt")

    # Assert
    assert len(from_file["trade_btc_usdt"]) == 300 and len(from_file["orderbook_btc_usdt"]) == 300
    assert from_websocket == from_file
    assert from_http == from_file and http_summary.completed
    assert from_csv == from_file["trade_btc_usdt"]


def _us(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


# Idempotency


async def test_replaying_the_same_files_twice_stores_each_row_once(
    tmp_path: Path, pg_url: str, pg: PG
) -> None:
    files = [
        fixture_path("tardis", "bitmex_trades_XBTUSD.csv"),
        fixture_path("tardis", "deribit_incremental_book_L2_BTC-PERPETUAL.csv"),
        write(tmp_path / "trades.csv.gz", trades_csv(3000, symbol="ETHUSD"), compress=True),
        write(tmp_path / "capture.ndjson.gz", "\n".join(machine_capture(500)), compress=True),
    ]

    first, _ = await replay(pg_url, *files)
    once = await table_counts(pg)
    second, _ = await replay(pg_url, *files)

    assert await table_counts(pg) == once
    assert sum(once.values()) == first.rows_inserted == 10 + 1 + 3000 + 500
    assert second.rows_inserted == 0
    assert sum(w.rows_duplicate for w in second.writers.values()) == first.rows_inserted


@pytest.fixture
def other_pg_url(pg_server_url: str) -> Iterator[str]:
    """A second empty database, for a clean run to compare with."""
    with fresh_database(pg_server_url) as url:
        yield url


TRADES_DIGEST = """
    SELECT count(*), md5(string_agg(concat_ws('|', exchange, symbol, trade_id, side, price,
        amount, "timestamp", local_timestamp, timestamp_us, local_timestamp_us), ','
        ORDER BY timestamp_us, trade_id))
    FROM trade_xbt_usd
"""


def trades_digest(url: str) -> tuple[int, str]:
    with psycopg.connect(url) as conn:
        try:
            row = conn.execute(TRADES_DIGEST).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0, ""
    assert row is not None
    return int(row[0]), str(row[1])


def spot_replay(path: Path, url: str, output: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPOT_DATABASE_URL": url, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "spot", "replay", str(path), "--no-progress"]
    with output.open("wb") as log:
        return subprocess.Popen(
            [*command, "--log-level", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_until_some_rows_are_stored(url: str, timeout_secs: float = 60) -> None:
    deadline = time.monotonic() + timeout_secs
    while trades_digest(url)[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sigterm_halfway_then_again_stores_the_rows_of_one_clean_run(
    tmp_path: Path, pg_url: str, other_pg_url: str
) -> None:
    total = 120_000
    path = write(tmp_path / "trades.csv", trades_csv(total))

    # Act 1: stop a replay once it has stored something.
    interrupted = spot_replay(path, pg_url, tmp_path / "first.log")
    wait_until_some_rows_are_stored(pg_url)
    interrupted.send_signal(signal.SIGTERM)
    assert interrupted.wait(timeout=60) == 1
    stored_when_stopped = trades_digest(pg_url)[0]

    # Act 2: the same command again, and a clean run elsewhere.
    again = spot_replay(path, pg_url, tmp_path / "second.log")
    assert again.wait(timeout=60) == 0
    asyncio.run(replay(other_pg_url, path))

    # Assert
    assert 0 < stored_when_stopped < total
    assert "stopped before the end" in (tmp_path / "first.log").read_text()
    assert trades_digest(pg_url) == trades_digest(other_pg_url)
    assert trades_digest(pg_url)[0] == total
    summary_line = next(
        line for line in (tmp_path / "second.log").read_text().splitlines()
        if line.startswith("trade_xbt_usd")
    )  # fmt: skip
    inserted, already_stored = (int(n.replace(",", "")) for n in summary_line.split()[1:3])
    assert (inserted, already_stored) == (total - stored_when_stopped, stored_when_stopped)


# Bad files


async def test_truncated_gzip_fails_naming_it_after_storing_what_was_read(
    tmp_path: Path, pg_url: str, pg: PG
) -> None:
    good = write(tmp_path / "a_good.csv", trades_csv(100))
    whole = gzip.compress(trades_csv(20_000, first_us=START_US + 10**9).encode())
    truncated = tmp_path / "b_truncated.csv.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    after = write(tmp_path / "c_after.csv", trades_csv(50, symbol="ETHUSD"))

    with pytest.raises(
        BadInputFile, match=r"b_truncated\.csv\.gz: truncated or corrupt gzip"
    ) as raised:
        await replay(pg_url, good, truncated, after)

    counts = await table_counts(pg)
    assert 100 < counts["trade_xbt_usd"] < 20_100
    assert "trade_eth_usd" not in counts
    assert "after line" in str(raised.value)


def test_cli_summary_counts_skipped_lines_and_a_bad_file_fails_with_its_name(
    tmp_path: Path, pg_url: str
) -> None:
    good = write(
        tmp_path / "a.csv",
        trades_csv(20) + "bitmex,XBTUSD,1,2,x,buy,not-a-price,1\nbitmex,XBTUSD,1,2\n",
    )
    bad = write(tmp_path / "b.csv", "when,what\n1,2\n")

    result = CliRunner().invoke(
        app, ["replay", str(good), str(bad), "--no-progress"], env={"SPOT_DATABASE_URL": pg_url}
    )

    assert result.exit_code == 1
    lines = result.output.splitlines()
    trade_line = next(line for line in lines if line.startswith("trade_xbt_usd"))
    assert trade_line.split() == [
        "trade_xbt_usd", "20", "0", "2", "(not_a_number", "1,", "wrong_column_count", "1)",
    ]  # fmt: skip
    assert any("b.csv: FAILED" in line for line in lines)
    assert f"spot: {bad}: line 1: unknown header 'when,what'" in result.output


# HTTP transport


def http_settings(server: TardisMachineServer, pg_url: str, **tardis: object) -> Settings:
    return settings_for(
        pg_url,
        tardis={
            "url": server.http_url, "transport": "http", "mode": "replay",
            "from": "2024-03-01", "to": "2024-03-02", "reconnect_initial_secs": 0.05, **tardis,
        },
        exchanges=[{"name": "binance", "symbols": ["BTCUSDT"]}],
    )  # fmt: skip


async def test_http_replay_dropped_midway_resumes_without_gap_or_duplicate(
    tmp_path: Path, pg_url: str, pg: PG
) -> None:
    capture = write(tmp_path / "capture.ndjson", "\n".join(machine_capture(3000)) + "\n")

    # 1200 lines a minute: each resumed request (from the minute) gets past the previous drop.
    async with TardisMachineServer(ServeOptions(captures=(capture,), drop_every=1500)) as server:
        settings = http_settings(server, pg_url)
        source = tardis_source(settings)
        summary = await run(settings, source)

    assert source.connects >= 3 and summary.completed
    assert await table_counts(pg) == {"trade_btc_usdt": 1500, "orderbook_btc_usdt": 1500}
    assert sum(w.rows_duplicate for w in summary.writers.values()) == 0


async def test_http_error_status_is_raised_with_the_servers_message(
    tmp_path: Path, pg_url: str
) -> None:
    capture = write(tmp_path / "capture.ndjson", "\n".join(machine_capture(10)) + "\n")

    async with TardisMachineServer(ServeOptions(captures=(capture,))) as server:
        backwards = http_settings(server, pg_url, **{"from": "2024-03-02", "to": "2024-03-01"})
        with pytest.raises(SourceError, match=r"answered 500 .*later than \"from\""):
            await asyncio.wait_for(run(backwards), 20)


async def test_http_replay_stopped_midway_stores_what_it_read(
    tmp_path: Path, pg_url: str, pg: PG
) -> None:
    capture = write(tmp_path / "capture.ndjson", "\n".join(machine_capture(20_000)) + "\n")
    pipelines: list[Pipeline] = []

    async with TardisMachineServer(ServeOptions(captures=(capture,))) as server:
        running = asyncio.create_task(run(http_settings(server, pg_url), prepare=pipelines.append))
        # A counter has no event to wait on: poll it.
        while not pipelines or pipelines[0].processor.counters.frames < 2000:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await pipelines[0].stop()
        summary = await asyncio.wait_for(running, 30)

    stored = sum((await table_counts(pg)).values())
    assert summary.stopped_by_signal and not summary.completed
    assert 2000 <= stored < 20_000
    assert stored == summary.rows_inserted == summary.processor.frames


async def test_a_writer_schema_mismatch_is_raised_as_itself_not_as_a_task_group(
    tmp_path: Path, pg_url: str
) -> None:
    async with PostgreSQLDatabase(pg_url, 10) as db:
        await db.ensure_table("orderbook_btc_usdt")  # an older run with 10 levels
    capture = tmp_path / "capture.ndjson"
    capture.write_text(
        fixture_path("tardis", "tardis_machine_18_offline_binance_synthetic.ndjson").read_text()
    )

    with pytest.raises(SchemaMismatch, match="orderbook_btc_usdt has 10 book levels"):
        await replay(pg_url, capture)
