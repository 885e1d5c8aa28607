"""PostgreSQL unreachable in the middle of a 200,000-message replay, then back: every row once."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from spot.main_loop import Pipeline, RunSummary, run
from spot.serve import ServeOptions, TardisMachineServer
from tests.database import Connection, duplicate_keys, table_counts
from tests.faults.conftest import fault_settings, spilled_rows, wait_until
from tests.faults.tcp_proxy import TcpProxy

OUTAGE_SECS = 5.0
pytestmark = pytest.mark.slow


async def _replay_with_outage(
    capture: Path,
    proxy: TcpProxy,
    pg_url: str,
    spill_dir: Path,
    total_rows: int,
    **fallback: object,
) -> RunSummary:
    pipelines: list[Pipeline] = []
    async with TardisMachineServer(ServeOptions(captures=(capture,))) as server:
        settings = fault_settings(server.ws_url, proxy.dsn(pg_url), spill_dir, fallback=fallback)
        replay = asyncio.create_task(run(settings, prepare=pipelines.append))
        # Cut once a quarter of the rows is stored: mid-replay, whatever the machine's speed.
        await wait_until(
            lambda: (
                replay.done()
                or sum(w.counters.rows_inserted for p in pipelines for w in p.writers.values())
                >= total_rows // 4
            )
        )
        assert not replay.done(), "the replay ended before the outage"
        proxy.cut()
        await asyncio.sleep(OUTAGE_SECS)
        proxy.restore()
        return await replay


async def test_outage_mid_replay_holds_the_socket_then_stores_every_row_once(
    big_capture: tuple[Path, Counter[str]],
    proxy: TcpProxy,
    pg_url: str,
    pg: Connection,
    tmp_path: Path,
) -> None:
    capture, expected = big_capture
    spill_dir = tmp_path / "spill"

    summary = await _replay_with_outage(
        capture, proxy, pg_url, spill_dir, sum(expected.values()), spill_after_secs=60
    )

    assert summary.completed
    assert sum(w.retries for w in summary.writers.values()) > 0  # the outage was felt
    assert summary.rows_spilled == 0  # retries and backpressure bridged it
    assert await table_counts(pg) == dict(expected)
    assert await duplicate_keys(pg) == 0
    assert not await spilled_rows(spill_dir)


async def test_outage_longer_than_the_spill_budget_spills_then_recovers_every_row_once(
    big_capture: tuple[Path, Counter[str]],
    proxy: TcpProxy,
    pg_url: str,
    pg: Connection,
    tmp_path: Path,
) -> None:
    capture, expected = big_capture
    spill_dir = tmp_path / "spill"

    summary = await _replay_with_outage(
        capture, proxy, pg_url, spill_dir, sum(expected.values()), spill_after_secs=1
    )

    assert summary.completed
    assert summary.rows_spilled > 0
    recovered = summary.recovery.rows_inserted + summary.recovery.rows_duplicate
    assert recovered == summary.rows_spilled
    # Not `rows_inserted + recovery.rows_inserted == total`: a batch whose COMMIT reached the
    # server just as the connection was cut is stored but looks failed, so it is spilled too;
    # recovery then counts its rows as already stored. The table counts are the truth.
    assert await table_counts(pg) == dict(expected)
    assert await duplicate_keys(pg) == 0
    assert not await spilled_rows(spill_dir)  # recovered files are removed
