"""SIGTERM at random points of a replay (and during an outage): every received row is kept.

Each run is `python -m spot run --config …` against `spot serve`. The client receives fewer
messages than the server sent (frames in flight are dropped at the close), so the count to match
is what spot says it received, in its final summary lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from spot.db_writer import PostgreSQLDatabase
from spot.fallback_storage import FallbackStorage, LocalSpill
from spot.recovery import recover_spills
from spot.serve import ServeOptions, TardisMachineServer
from tests.database import Connection, duplicate_keys, table_counts
from tests.faults.conftest import config_toml, fault_settings, spilled_rows
from tests.faults.tcp_proxy import TcpProxy

FINISHED = re.compile(r"Run finished: (\d+) frames, (\d+) trades, (\d+) book snapshots")
DELIVERY = re.compile(
    r"Delivery: (\d+) rows spilled, \d+ recovered from spills, (\d+) rejected.*?(\d+) lost"
)
pytestmark = pytest.mark.slow


class SpotProcess:
    """`spot run` in a subprocess, its stderr collected, readiness and exit observed."""

    def __init__(self, config: Path, home: Path) -> None:
        self.config = config
        self.home = home
        self.lines: list[str] = []
        self.connected = asyncio.Event()

    async def __aenter__(self) -> SpotProcess:
        env = {**os.environ, "XDG_DATA_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spot",
            "run",
            "--config",
            str(self.config),
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            if "[+] Connected to WebSocket" in text:
                self.connected.set()
        self.connected.set()  # exited: stop waiting

    async def terminate(self) -> int:
        # A fast machine may have finished the replay already: nothing left to stop.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 90)
        await self._reader
        return code

    def received_rows(self) -> tuple[int, int]:
        """Return (rows received per the summary, rows spilled) from spot's closing log lines."""
        log = "".join(self.lines)
        finished, delivery = FINISHED.search(log), DELIVERY.search(log)
        assert finished and delivery, log[-3000:]
        _, trades, books = map(int, finished.groups())
        spilled, rejected, lost = map(int, delivery.groups())
        assert rejected == lost == 0, log[-3000:]
        return trades + books, spilled


async def _recover_leftovers(pg_url: str, spill_dir: Path) -> None:
    async with PostgreSQLDatabase(pg_url, 15) as db:
        await recover_spills(db, FallbackStorage(LocalSpill(spill_dir)), 15)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_sigterm_at_a_random_point_keeps_every_received_row(
    seed: int, big_capture: tuple[Path, Counter[str]], pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    capture, expected = big_capture
    spill_dir = tmp_path / "spill"
    delay = random.Random(seed).uniform(0.0, 1.5)

    async with TardisMachineServer(ServeOptions(captures=(capture,))) as server:
        config = tmp_path / "spot.toml"
        config.write_text(config_toml(fault_settings(server.ws_url, pg_url, spill_dir)))
        async with SpotProcess(config, tmp_path / "home") as spot:
            await asyncio.wait_for(spot.connected.wait(), 60)
            await asyncio.sleep(delay)
            code = await spot.terminate()

    assert code == 0, "".join(spot.lines)[-3000:]
    received, _ = spot.received_rows()
    stored = sum((await table_counts(pg)).values())
    assert stored + sum((await spilled_rows(spill_dir)).values()) >= received
    await _recover_leftovers(pg_url, spill_dir)
    assert sum((await table_counts(pg)).values()) == received <= sum(expected.values())
    assert await duplicate_keys(pg) == 0


async def test_sigterm_during_an_outage_spills_at_the_deadline_and_exits_0(
    big_capture: tuple[Path, Counter[str]],
    proxy: TcpProxy,
    pg_url: str,
    pg: Connection,
    tmp_path: Path,
) -> None:
    capture, _ = big_capture
    spill_dir = tmp_path / "spill"

    async with TardisMachineServer(ServeOptions(captures=(capture,))) as server:
        settings = fault_settings(
            server.ws_url, proxy.dsn(pg_url), spill_dir, shutdown_timeout_secs=3
        )
        config = tmp_path / "spot.toml"
        config.write_text(config_toml(settings))
        async with SpotProcess(config, tmp_path / "home") as spot:
            await asyncio.wait_for(spot.connected.wait(), 60)
            await asyncio.sleep(0.5)
            proxy.cut()  # writers now retry (spill_after_secs is 30 s) and the replay waits
            await asyncio.sleep(1.0)
            code = await spot.terminate()

    log = "".join(spot.lines)
    assert code == 0, log[-3000:]
    assert "spilling the rest" in log
    received, spilled = spot.received_rows()
    assert spilled > 0
    assert sum((await spilled_rows(spill_dir)).values()) == spilled
    await _recover_leftovers(pg_url, spill_dir)
    assert sum((await table_counts(pg)).values()) == received
    assert await duplicate_keys(pg) == 0
