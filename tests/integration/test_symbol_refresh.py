"""Symbol refresh without restart: the handover rule on real frames, then live loopback streams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg
import pytest

from spot.config import Settings, settings_from_dict
from spot.data_processor import DataProcessor
from spot.db_writer import PostgreSQLDatabase
from spot.errors import ConfigError
from spot.main_loop import Pipeline, run, tardis_source
from spot.messages import Frame
from spot.serve import ServeOptions, TardisMachineServer
from spot.symbol_refresh import Handover, plan_refresh, symbol_set
from spot.tickers import TickerNormalizer
from tests.integration.capture_builder import Capture, book, iso, trade

START = datetime(2024, 3, 1, tzinfo=UTC)
STEP = timedelta(milliseconds=1)
STEPS = 400  # one pass of the looped capture: 0.4 s at speed 1
PASS_SHIFT = timedelta(minutes=1)  # serve shifts each loop by whole minutes past the last one
Conn = psycopg.AsyncConnection[tuple[object, ...]]


def refresh_capture() -> Capture:
    """Per millisecond: a trade of BTCUSDT, ETHUSDT, SOLUSDT; every 2nd ms two identical id-less
    coinbase trades; every 10th ms a BTCUSDT book snapshot."""
    capture = Capture()
    for step in range(STEPS):
        at = START + step * STEP
        for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
            capture.lines.append(trade("binance", symbol, at, step))
        if step % 2 == 0:
            capture.lines.extend([trade("coinbase", "BTC-USD", at, step, with_id=False)] * 2)
        if step % 10 == 0:
            capture.lines.append(book("binance", "BTCUSDT", at, 3))
    return capture


def settings_for(ws_url: str, pg_url: str, binance: list[str], **refresh: object) -> Settings:
    return settings_from_dict(
        {
            "tardis": {"url": ws_url, "mode": "stream", "reconnect_initial_secs": 0.05},
            "exchanges": [
                {"name": "binance", "symbols": binance},
                {"name": "coinbase", "symbols": ["BTC-USD"]},
            ],
            "queue": {"batch_size": 500, "flush_interval_secs": 0.05},
            "database": {"url": pg_url},
            "health": {"http": False},
            "refresh": {"handover_timeout_secs": 10.0, **refresh},
        }
    )


def toml_of(settings: Settings) -> str:
    """The settings this module varies, as a config file."""
    lines = [
        "[tardis]",
        f'url = "{settings.tardis.url}"',
        'mode = "stream"',
        "reconnect_initial_secs = 0.05",
        "[queue]",
        "batch_size = 500",
        "flush_interval_secs = 0.05",
        "[database]",
        f'url = "{settings.database.url}"',
        "[health]",
        "http = false",
        "[refresh]",
        f"watch_config = {str(settings.refresh.watch_config).lower()}",
        f"poll_secs = {settings.refresh.poll_secs}",
        f"handover_timeout_secs = {settings.refresh.handover_timeout_secs}",
    ]
    for exchange in settings.exchanges:
        lines += ["[[exchanges]]", f'name = "{exchange.name}"', f"symbols = {exchange.symbols!r}"]
    return "\n".join(lines).replace("'", '"') + "\n"


# The handover rule, on real frames through real processors (no sockets needed)


def frames_of(lines: list[str], local_shift_us: int = 0) -> list[Frame]:
    """Frames as one subscription receives them; a second real Tardis Machine subscription sees
    the same messages with its own localTimestamp (`local_shift_us`)."""
    frames = []
    for line in lines:
        message = json.loads(line)
        local = datetime.fromisoformat(message["localTimestamp"]) + timedelta(
            microseconds=local_shift_us
        )
        message["localTimestamp"] = iso(local)
        frames.append(Frame(json.dumps(message), 0))
    return frames


def identity(kind: str, row: tuple[object, ...]) -> tuple[object, ...]:
    """What makes a row the same market event, whichever subscription delivered it."""
    return (kind, row[0], row[1], row[8], row[2]) if kind == "trade" else (kind, *row[:2], row[4])


def written_by_handover(lines: list[str], join_at: int, new_ahead: bool, shift_us: int) -> list:
    """Run an old and a new subscription over the same messages, the new one joining at
    `join_at`; stop the old one when the handover completes. Return what both wrote."""
    tickers = TickerNormalizer({})
    old, new = DataProcessor(15, tickers), DataProcessor(15, tickers)
    old_frames, new_frames = frames_of(lines), frames_of(lines, shift_us)
    handover = Handover(frozenset({("binance", "BTCUSDT"), ("coinbase", "BTC-USD")}))
    written = []
    old_running = True

    def deliver(processor: DataProcessor, frame: Frame, accept: Callable[..., bool]) -> None:
        normalized = processor.process(frame)
        if normalized is not None and accept(normalized.kind, normalized.row):
            written.append(identity(normalized.kind, normalized.row))

    for index in range(len(lines)):
        if old_running and not (new_ahead and index >= join_at):
            deliver(old, old_frames[index], handover.accept_old)
        if index >= join_at:
            deliver(new, new_frames[index], handover.accept_new if old_running else _always)
        if old_running and new_ahead and index >= join_at:
            deliver(old, old_frames[index], handover.accept_old)
        if old_running and handover.complete.is_set():
            handover.closing = True
            old_running = False
    return written


def _always(kind: str, row: tuple[object, ...]) -> bool:
    return True


def expected_identities(lines: list[str]) -> list:
    processor = DataProcessor(15, TickerNormalizer({}))
    rows = [processor.process(frame) for frame in frames_of(lines)]
    return [identity(r.kind, r.row) for r in rows if r is not None]


@pytest.mark.parametrize("new_ahead", [False, True], ids=["old-first", "new-first"])
@pytest.mark.parametrize("join_at", [0, 1, 7, 8, 9, 301])
def test_handover_writes_every_event_once_even_when_joining_mid_run(
    join_at: int, new_ahead: bool
) -> None:
    # Kept streams only: coinbase's identical id-less pairs make runs a joiner can split.
    lines = [line for line in refresh_capture().lines[:600] if "ETHUSDT" not in line]
    lines = [line for line in lines if "SOLUSDT" not in line]

    written = written_by_handover(lines, join_at, new_ahead, shift_us=700)

    assert sorted(written) == sorted(expected_identities(lines))


def test_plan_names_added_removed_and_kept_symbols_and_what_needs_a_restart() -> None:
    running = settings_for("ws://127.0.0.1:1", "", ["BTCUSDT", "ETHUSDT"])
    loaded = settings_from_dict(
        {
            **msgspec.to_builtins(running),
            "exchanges": [{"name": "binance", "symbols": ["btcusdt", "SOLUSDT"]}],
            "queue": {"batch_size": 7},
        }
    )

    plan = plan_refresh(running, loaded)

    assert plan is not None
    assert plan.added == {("binance", "SOLUSDT")}
    assert plan.removed == {("binance", "ETHUSDT"), ("coinbase", "BTC-USD")}
    assert plan.kept == {("binance", "BTCUSDT")}
    assert plan.needs_restart == ("queue",)
    assert plan.settings.queue == running.queue  # not applied live
    assert symbol_set(plan.settings) == symbol_set(loaded)
    assert plan_refresh(running, running) is None
    replay = settings_from_dict(
        {
            **msgspec.to_builtins(running),
            "tardis": {"mode": "replay", "from": "2024-03-01", "to": "2024-03-02"},
        }
    )
    with pytest.raises(ConfigError, match=r"tardis\.mode"):
        plan_refresh(running, replay)


# Live: spot serve streams the capture in a loop, paced; spot refreshes while reading it


def expected_timestamps_us(step_every: int, upto_us: int, offset: int = 0) -> list[int]:
    """Timestamps of a symbol sent every `step_every` ms of each pass, up to `upto_us`."""
    found, loop = [], 0
    while True:
        for step in range(offset, STEPS, step_every):
            at = START + loop * PASS_SHIFT + step * STEP
            at_us = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
            if at_us > upto_us:
                return found
            found.append(at_us)
        loop += 1


async def timestamps(pg: Conn, table: str) -> list[int]:
    cursor = await pg.execute(f'SELECT timestamp_us FROM "{table}" ORDER BY timestamp_us')
    return [int(str(row[0])) for row in await cursor.fetchall()]


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, limit_secs: float = 20) -> None:
    deadline = time.monotonic() + limit_secs
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def rows_in(pg: Conn, table: str) -> int:
    cursor = await pg.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
    exists = await cursor.fetchone()
    if not (exists and exists[0]):
        return 0
    cursor = await pg.execute(f'SELECT count(*) FROM "{table}"')
    row = await cursor.fetchone()
    return int(str(row[0])) if row else 0


def assert_complete_prefix(stored: list[int], step_every: int, offset: int = 0) -> None:
    assert stored, "no rows"
    assert stored == expected_timestamps_us(step_every, stored[-1], offset)


async def assert_refreshed_without_gap_or_duplicate(pg: Conn) -> None:
    btc = await timestamps(pg, "trade_btc_usdt")
    eth = await timestamps(pg, "trade_eth_usdt")
    sol = await timestamps(pg, "trade_sol_usdt")
    assert_complete_prefix(btc, 1)  # kept: every trade once, no gap across the switch
    assert_complete_prefix(await timestamps(pg, "orderbook_btc_usdt"), 10)
    coinbase = await timestamps(pg, "trade_btc_usd")
    assert coinbase[::2] == coinbase[1::2]  # id-less pairs: both kept, neither doubled
    assert_complete_prefix(coinbase[::2], 2)
    assert_complete_prefix(sol, 1)  # added: rows from its first message on
    assert_complete_prefix(eth, 1)  # removed: what came before the switch, then nothing
    assert eth[-1] < btc[-1] - 100_000


async def test_refresh_adds_and_removes_symbols_while_streaming_without_gap_or_duplicate(
    tmp_path: Path, pg_url: str, pg: Conn
) -> None:
    path = refresh_capture().write(tmp_path / "capture.ndjson")
    options = ServeOptions(captures=(path,), speed=1.0, loop=True)

    async with TardisMachineServer(options) as server:
        settings = settings_for(server.ws_url, pg_url, ["BTCUSDT", "ETHUSDT"])
        pipelines: list[Pipeline] = []
        running = asyncio.create_task(run(settings, prepare=pipelines.append))
        await wait_for(lambda: _more_than(pg, "trade_btc_usdt", 150), "the first rows")

        applied = await pipelines[0].refresh(
            settings_for(server.ws_url, pg_url, ["BTCUSDT", "SOLUSDT"])
        )
        eth_stopped_at = (await timestamps(pg, "trade_eth_usdt"))[-1]
        await wait_for(lambda: _past(pg, "trade_btc_usdt", eth_stopped_at + 200_000), "more BTC")
        await pipelines[0].stop()
        summary = await running

    assert applied
    assert summary.completed is False and summary.stopped_by_signal
    assert len(pipelines[0].subscriptions) == 2
    await assert_refreshed_without_gap_or_duplicate(pg)


async def _more_than(pg: Conn, table: str, rows: int) -> bool:
    return await rows_in(pg, table) > rows


async def _past(pg: Conn, table: str, timestamp_us: int) -> bool:
    cursor = await pg.execute(f'SELECT max(timestamp_us) > %s FROM "{table}"', (timestamp_us,))
    row = await cursor.fetchone()
    return bool(row and row[0])


async def test_sighup_refreshes_from_the_config_file(tmp_path: Path, pg_url: str, pg: Conn) -> None:
    path = refresh_capture().write(tmp_path / "capture.ndjson")
    config = tmp_path / "spot.toml"

    async with TardisMachineServer(ServeOptions(captures=(path,), speed=1.0, loop=True)) as server:
        settings = settings_for(server.ws_url, pg_url, ["BTCUSDT", "ETHUSDT"], watch_config=False)
        config.write_text(toml_of(settings))
        pipelines: list[Pipeline] = []
        running = asyncio.create_task(
            run(settings, handle_signals=True, config_path=config, prepare=pipelines.append)
        )
        await wait_for(lambda: _more_than(pg, "trade_btc_usdt", 100), "the first rows")
        config.write_text(
            toml_of(settings_for(server.ws_url, pg_url, ["BTCUSDT", "SOLUSDT"], watch_config=False))
        )

        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: _more_than(pg, "trade_sol_usdt", 50), "the added symbol's rows")
        eth_stopped_at = (await timestamps(pg, "trade_eth_usdt"))[-1]
        await wait_for(lambda: _past(pg, "trade_btc_usdt", eth_stopped_at + 200_000), "more BTC")
        os.kill(os.getpid(), signal.SIGTERM)
        await running

    watcher = pipelines[0].watcher
    assert watcher is not None and watcher.reloads["applied"] == 1
    await assert_refreshed_without_gap_or_duplicate(pg)


async def test_an_invalid_config_is_rejected_and_the_running_symbols_go_on(
    tmp_path: Path, pg_url: str, pg: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    path = refresh_capture().write(tmp_path / "capture.ndjson")
    config = tmp_path / "spot.toml"

    async with TardisMachineServer(ServeOptions(captures=(path,), speed=1.0, loop=True)) as server:
        settings = settings_for(server.ws_url, pg_url, ["BTCUSDT"], poll_secs=0.05)
        config.write_text(toml_of(settings))
        pipelines: list[Pipeline] = []
        running = asyncio.create_task(run(settings, config_path=config, prepare=pipelines.append))
        await wait_for(lambda: _more_than(pg, "trade_btc_usdt", 50), "the first rows")
        watcher = pipelines[0].watcher
        assert watcher is not None

        config.write_text(toml_of(settings).replace("batch_size", "batchsize"))  # unknown key
        await wait_for(_async(lambda: watcher.reloads["rejected"] == 1), "the rejection")
        before = await rows_in(pg, "trade_btc_usdt")
        await wait_for(lambda: _more_than(pg, "trade_btc_usdt", before + 50), "rows going on")
        config.write_text(toml_of(settings_for(server.ws_url, pg_url, ["BTCUSDT", "SOLUSDT"])))
        await wait_for(lambda: _more_than(pg, "trade_sol_usdt", 20), "the added symbol's rows")
        await pipelines[0].stop()
        await running

    assert watcher.reloads["applied"] == 1
    rejections = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 1
    assert (
        "Config reload (config file changed) rejected, still running the previous symbols"
        in (rejections[0])
    )
    assert "batchsize" in rejections[0]
    assert_complete_prefix(await timestamps(pg, "trade_btc_usdt"), 1)


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def checked() -> bool:
        return check()

    return checked


async def test_a_replay_rejects_a_refresh_and_says_why(pg_url: str) -> None:
    settings = settings_from_dict(
        {
            "tardis": {"mode": "replay", "from": "2024-03-01", "to": "2024-03-02"},
            "exchanges": [{"name": "binance", "symbols": ["BTCUSDT"]}],
            "database": {"url": pg_url},
        }
    )
    async with PostgreSQLDatabase(pg_url, 15) as db:
        pipeline = Pipeline(settings, db, tardis_source(settings))

        with pytest.raises(ConfigError, match="stream mode only"):
            await pipeline.refresh(settings)
