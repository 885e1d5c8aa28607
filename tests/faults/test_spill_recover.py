"""PostgreSQL down for a whole run: everything lands in the spill; `spot recover` stores it once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spot.main_loop import run
from spot.serve import ServeOptions, TardisMachineServer
from tests.database import Connection, duplicate_keys, table_counts
from tests.faults.conftest import config_toml, fault_settings, spilled_rows
from tests.faults.tcp_proxy import TcpProxy
from tests.integration.capture_builder import mixed_capture

pytestmark = pytest.mark.slow


def _recover(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_DATA_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "spot", "recover", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_database_down_all_run_spills_everything_and_recover_stores_it_once(
    proxy: TcpProxy, pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    capture = mixed_capture(6000)
    path = capture.write(tmp_path / "capture.ndjson")
    spill_dir = tmp_path / "spill"
    proxy.cut()  # before spot starts: it never reaches PostgreSQL

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = fault_settings(
            server.ws_url,
            proxy.dsn(pg_url),
            spill_dir,
            fallback={"spill_after_secs": 0.5},
            shutdown_timeout_secs=2,
        )
        summary = await run(settings)

    assert summary.completed
    assert summary.rows_inserted == 0
    assert summary.spills_left
    assert await spilled_rows(spill_dir) == capture.expected_rows
    assert summary.rows_spilled == sum(capture.expected_rows.values())

    # `spot recover` with the same spill and the database reachable, as an operator would run it.
    config = tmp_path / "recover.toml"
    config.write_text(config_toml(fault_settings(server.ws_url, pg_url, spill_dir)))
    first = _recover(config, tmp_path / "home")
    second = _recover(config, tmp_path / "home")

    assert first.returncode == 0, first.stderr
    assert f"{sum(capture.expected_rows.values())} rows inserted" in first.stdout
    assert first.stdout.rstrip().endswith("0 spills left")
    assert await table_counts(pg) == dict(capture.expected_rows)
    assert await duplicate_keys(pg) == 0
    assert not await spilled_rows(spill_dir)
    assert second.returncode == 0, second.stderr
    assert "spot recover: 0 spills stored" in second.stdout
    assert await table_counts(pg) == dict(capture.expected_rows)
