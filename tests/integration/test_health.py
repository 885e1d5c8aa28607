"""/metrics, /health, the status page and `spot check`, against real pipelines on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spot.config import HealthConfig, Settings, settings_from_dict
from spot.db_writer import PostgreSQLDatabase
from spot.health import HealthServer, check_health
from spot.main_loop import Pipeline, tardis_source
from spot.serve import ServeOptions, TardisMachineServer
from spot.stream_health import PipelineView, StreamHealth
from tests.integration.capture_builder import Capture, mixed_capture, trade

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def settings_for(ws_url: str, pg_url: str, mode: str, **health: object) -> Settings:
    tardis: dict[str, object] = {"url": ws_url, "mode": mode, "reconnect_initial_secs": 0.05}
    if mode == "replay":
        tardis.update({"from": "2024-03-01", "to": "2024-03-02"})
    return settings_from_dict(
        {
            "tardis": tardis,
            "exchanges": [
                {"name": "binance", "symbols": ["BTCUSDT", "ETHUSDT"]},
                {"name": "coinbase", "symbols": ["BTC-USD"]},
            ],
            "queue": {"batch_size": 500, "flush_interval_secs": 0.05},
            "database": {"url": pg_url},
            "health": {"port": 0, **health},
        }
    )


@asynccontextmanager
async def monitored(settings: Settings, pg_url: str) -> AsyncIterator[tuple[Pipeline, str]]:
    """A pipeline and its health endpoint (which outlives the run, for scraping after it)."""
    async with PostgreSQLDatabase(pg_url, settings.book.orderbook_levels) as db:
        pipeline = Pipeline(settings, db, tardis_source(settings))
        await pipeline.create_configured_tables()
        async with HealthServer(settings.health, pipeline.health_snapshot) as http:
            yield pipeline, http.url


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def with_disconnect(capture: Capture) -> Capture:
    """Insert a coinbase disconnect message in the middle, in localTimestamp order."""
    middle = len(capture.lines) // 2
    local = json.loads(capture.lines[middle])["localTimestamp"]
    line = json.dumps({"type": "disconnect", "exchange": "coinbase", "localTimestamp": local})
    capture.lines.insert(middle + 1, line)
    return capture


def sent_counts(capture: Capture) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for line in capture.lines:
        message = json.loads(line)
        if message["type"] in ("trade", "book_snapshot", "disconnect"):
            counts[(message["exchange"], message["type"])] += 1
    return counts


async def test_metrics_after_a_replay_count_every_message_by_exchange_and_type(
    tmp_path: Path, pg_url: str
) -> None:
    capture = with_disconnect(mixed_capture(200))
    path = capture.write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = settings_for(server.ws_url, pg_url, "replay")
        async with monitored(settings, pg_url) as (pipeline, url):
            summary = await pipeline.run()
            status, text = await get(f"{url}/metrics")

    assert status == 200
    found = samples(text)
    for (exchange, kind), count in sent_counts(capture).items():
        assert sample(found, "spot_messages_total", exchange=exchange, type=kind) == count
    for table, rows in capture.expected_rows.items():
        assert sample(found, "spot_rows_inserted_total", table=table) == rows
        assert sample(found, "spot_queue_depth_rows", table=table) == 0
    assert sample(found, "spot_frames_total") == summary.processor.frames == server.messages_sent
    assert sample(found, "spot_reconnects_total", exchange="binance") == 0
    assert sample(found, "spot_batch_retries_total", table="trade_btc_usd") == 0
    assert sample(found, "spot_rows_spilled_total", table="trade_btc_usd") == 0
    assert "process_cpu_seconds_total" in text


async def test_lag_histograms_hold_the_delay_the_capture_stamped(
    tmp_path: Path, pg_url: str
) -> None:
    # capture_builder stamps every trade's localTimestamp 2.345 ms after its timestamp.
    capture = mixed_capture(100)
    path = capture.write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = settings_for(server.ws_url, pg_url, "replay")
        async with monitored(settings, pg_url) as (pipeline, url):
            await pipeline.run()
            _, text = await get(f"{url}/metrics")

    found = samples(text)
    trades = capture.expected_rows["trade_btc_usdt"] + capture.expected_rows["trade_eth_usdt"]
    hop = {"exchange": "binance", "hop": "exchange_to_tardis"}
    assert sample(found, "spot_lag_seconds_bucket", le="0.001", **hop) == 0
    assert sample(found, "spot_lag_seconds_bucket", le="0.0025", **hop) == trades
    assert sample(found, "spot_lag_seconds_count", **hop) == trades
    assert sample(found, "spot_lag_seconds_sum", **hop) == pytest.approx(trades * 0.002345)
    # A replay's received_at - localTimestamp is the age of the history: not timed.
    assert sample(found, "spot_lag_seconds_count", exchange="binance", hop="tardis_to_spot") == 0
    batches = sample(found, "spot_batches_total", table="trade_btc_usdt")
    assert sample(found, "spot_commit_lag_seconds_count", table="trade_btc_usdt") == batches > 0
    mean_commit_lag = sample(found, "spot_commit_lag_seconds_sum", table="trade_btc_usdt") / batches
    assert 0 < mean_commit_lag < 60


def paused_capture(start: datetime, before: int, pause_secs: float, after: int) -> Capture:
    """Binance trades every 10 ms, `before` of them, a pause, then `after` more."""
    capture = Capture()
    at = start
    for n in range(before + after):
        if n == before:
            at += timedelta(seconds=pause_secs)
        capture.lines.append(trade("binance", "BTCUSDT", at, n))
        at += timedelta(milliseconds=10)
    return capture


async def poll_health(
    url: str, until: Callable[[int, dict[str, object]], bool]
) -> dict[str, object]:
    while True:
        status, text = await get(f"{url}/health")
        document = json.loads(text)
        if until(status, document):
            return document
        await asyncio.sleep(0.05)


def binance(document: dict[str, object]) -> dict[str, object]:
    exchanges = document["exchanges"]
    assert isinstance(exchanges, dict)
    info = exchanges["binance"]
    assert isinstance(info, dict)
    return info


def trades_seen(document: dict[str, object]) -> int:
    messages = binance(document)["messages"]
    assert isinstance(messages, dict)
    return int(messages["trade"])


async def test_health_turns_stale_when_the_stream_pauses_and_ok_when_it_resumes(
    tmp_path: Path, pg_url: str
) -> None:
    # Stamped "now", paced at real speed: received_at - localTimestamp is the loopback's delay.
    now = datetime.now(UTC)
    start = now.replace(microsecond=now.microsecond // 1000 * 1000)  # timestamps print ms
    capture = paused_capture(start, before=30, pause_secs=2.0, after=300)
    path = capture.write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,), speed=1.0)) as server:
        settings = settings_for(server.ws_url, pg_url, "stream", stale_after_secs=0.5)
        settings = settings_from_dict(
            {**_raw(settings), "exchanges": [{"name": "binance", "symbols": ["BTCUSDT"]}]}
        )
        async with monitored(settings, pg_url) as (pipeline, url):
            running = asyncio.create_task(pipeline.run())

            first = await poll_health(url, lambda s, d: s == 200 and trades_seen(d) > 0)
            stale = await poll_health(url, lambda s, d: s == 503)
            ok_again = await poll_health(
                url, lambda s, d: s == 200 and trades_seen(d) > trades_seen(stale)
            )
            healthy, line = await asyncio.to_thread(check_health, f"{url}/health")
            await pipeline.stop()
            await running

    assert binance(first)["status"] == "ok"
    assert stale["status"] == binance(stale)["status"] == "stale"
    assert trades_seen(stale) == 30  # exactly what came before the pause
    assert binance(ok_again)["status"] == "ok"
    assert healthy and line.startswith("ok: binance ok")
    lags = binance(ok_again)["lag_secs"]
    assert isinstance(lags, dict)
    # 2.345 ms, all in the (1 ms, 2.5 ms] bucket: the percentile lies within it.
    assert 0.001 <= lags["exchange_to_tardis"]["p50"] <= 0.0025
    tardis_to_spot = lags["tardis_to_spot"]["p50"]
    assert tardis_to_spot is not None and -1 < tardis_to_spot < 30  # plausible, not timed


def _raw(settings: Settings) -> dict[str, object]:
    import msgspec

    raw = msgspec.to_builtins(settings)
    assert isinstance(raw, dict)
    return raw


async def test_status_page_shows_a_table_per_exchange(tmp_path: Path, pg_url: str) -> None:
    path = mixed_capture(50).write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = settings_for(server.ws_url, pg_url, "replay")
        async with monitored(settings, pg_url) as (pipeline, url):
            await pipeline.run()
            status, page = await get(f"{url}/")

    assert status == 200
    assert "<meta http-equiv='refresh' content='2'>" in page
    assert '<h2>binance <span class="badge down">down</span></h2>' in page  # replay ended
    assert "<h2>coinbase" in page
    assert "<td>BTCUSDT</td>" in page and "<td>BTC-USD</td>" in page
    assert "<td>trade_btc_usdt</td>" in page


async def test_status_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    health = StreamHealth(HealthConfig(port=0), "stream", ["binance", "coinbase"])
    view = PipelineView(connected=frozenset({"binance"}))
    async with HealthServer(health.config, lambda: health.snapshot(view)) as http:
        process = await asyncio.create_subprocess_exec(
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            f"{http.url}/",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        dom, _ = await asyncio.wait_for(process.communicate(), 60)

    text = dom.decode()
    assert "<title>spot: down</title>" in text
    assert text.count("<table>") == 5  # two per exchange, one of tables


async def spot_check(url: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spot",
        "check",
        "--url",
        url,
        "--timeout",
        "5",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 60)


async def test_spot_check_exits_non_zero_unless_every_stream_is_ok() -> None:
    # A real StreamHealth: binance connected and fresh, coinbase connected and never heard of.
    config = HealthConfig(port=0, stale_after_secs=3600)
    fresh = StreamHealth(config, "stream", ["binance"])
    silent = StreamHealth(HealthConfig(port=0, stale_after_secs=0.001), "stream", ["coinbase"])
    connected = PipelineView(connected=frozenset({"binance", "coinbase"}))
    await asyncio.sleep(0.01)

    async with (
        HealthServer(config, lambda: fresh.snapshot(connected)) as ok,
        HealthServer(config, lambda: silent.snapshot(connected)) as stale,
    ):
        codes = await asyncio.gather(
            spot_check(f"{ok.url}/health"),
            spot_check(f"{stale.url}/health"),
            spot_check(f"http://127.0.0.1:{_closed_port()}/health"),
        )

    assert codes == [0, 1, 1]


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
