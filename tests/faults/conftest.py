"""Fault-test helpers: a cuttable proxy in front of PostgreSQL, settings, and row accounting."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from spot.config import Settings, settings_from_dict
from spot.data_processor import DataProcessor
from spot.fallback_storage import FallbackStorage, LocalSpill
from spot.messages import Frame
from spot.tickers import TickerNormalizer
from tests.faults.tcp_proxy import TcpProxy

# gcsfs reads this when imported; without it each call first probes the emulator over gRPC.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

EXCHANGES = [
    {"name": "binance", "symbols": ["BTCUSDT", "ETHUSDT"]},
    {"name": "coinbase", "symbols": ["BTC-USD"]},
]


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the test database; spot connects through `proxy.dsn(pg_url)`."""
    async with TcpProxy.for_dsn(pg_url) as started:
        yield started


def fault_settings(ws_url: str, db_url: str, spill_dir: Path, **sections: object) -> Settings:
    """Replay settings with quick retries and a private spill directory; `sections` override."""
    raw: dict[str, object] = {
        "tardis": {
            "url": ws_url,
            "mode": "replay",
            "from": "2024-03-01",
            "to": "2024-03-02",
            "reconnect_initial_secs": 0.05,
        },
        "exchanges": EXCHANGES,
        "queue": {"batch_size": 2000, "flush_interval_secs": 0.1, "capacity": 10_000},
        "database": {"url": db_url, "connect_timeout_secs": 1},
        "fallback": {"url": spill_dir.as_uri(), "recover_interval_secs": 0.5},
        "health": {"enabled": False},
        "shutdown_timeout_secs": 20,
    }
    for section, values in sections.items():
        current = raw.get(section)
        raw[section] = (
            {**current, **values}
            if isinstance(current, dict) and isinstance(values, dict)
            else values
        )
    return settings_from_dict(raw)


def config_toml(settings: Settings) -> str:
    """Return the parts of `settings` fault tests vary, as a config file for `python -m spot`."""
    tardis, database, fallback = settings.tardis, settings.database, settings.fallback
    exchanges = "".join(
        f'[[exchanges]]\nname = "{e.name}"\nsymbols = {json.dumps(e.symbols)}\n'
        for e in settings.exchanges
    )
    return (
        f"shutdown_timeout_secs = {settings.shutdown_timeout_secs}\n"
        f'[tardis]\nurl = "{tardis.url}"\nmode = "{tardis.mode}"\n'
        f'from = "{tardis.from_}"\nto = "{tardis.to}"\n'
        f"reconnect_initial_secs = {tardis.reconnect_initial_secs}\n{exchanges}"
        f"[queue]\nbatch_size = {settings.queue.batch_size}\n"
        f"flush_interval_secs = {settings.queue.flush_interval_secs}\n"
        f"[database]\nurl = {json.dumps(database.url)}\n"
        f"connect_timeout_secs = {database.connect_timeout_secs}\n"
        f'[fallback]\nurl = "{fallback.url}"\nspill_after_secs = {fallback.spill_after_secs}\n'
        f"recover_interval_secs = {fallback.recover_interval_secs}\n"
        "[health]\nenabled = false\n"
    )


async def spilled_rows(spill_dir: Path, area: str = "pending") -> Counter[str]:
    """Return the rows waiting in a spill directory, per table."""
    storage = FallbackStorage(LocalSpill(spill_dir))
    refs = await (storage.pending() if area == "pending" else storage.rejected())
    counts: Counter[str] = Counter()
    for ref in refs:
        spill = await storage.read(ref)
        counts[spill.header.table] += spill.header.row_count
    return counts


def expected_rows(lines: Iterable[str | bytes], levels: int = 15) -> Counter[str]:
    """Return the rows per table that spot stores for these capture lines."""
    processor = DataProcessor(levels, TickerNormalizer({}))
    counts: Counter[str] = Counter()
    for line in lines:
        normalized = processor.process(Frame(line, 0))
        if normalized is not None:
            counts[f"{normalized.kind}_{normalized.ticker}"] += 1
    return counts


@pytest.fixture(scope="session")
def big_capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter[str]]:
    """About 200,000 messages (trades and books of 3 tickers), written once per session."""
    from tests.integration.capture_builder import mixed_capture

    capture = mixed_capture(57_000)
    path = capture.write(tmp_path_factory.mktemp("capture") / "big.ndjson")
    return path, capture.expected_rows


async def wait_until(condition: Callable[[], bool], timeout_secs: float = 60.0) -> None:
    """Poll `condition` (pipeline counters have no event to wait on); fail after the timeout."""
    async with asyncio.timeout(timeout_secs):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
