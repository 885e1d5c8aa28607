"""The server drops the connection again and again: replay resumes exactly; streams record gaps."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

import pytest

from spot.main_loop import Pipeline, run, tardis_source
from spot.serve import ServeOptions, TardisMachineServer
from spot.websocket import TardisMachineSource
from tests.database import Connection, duplicate_keys, table_counts
from tests.faults.conftest import expected_rows, fault_settings, wait_until
from tests.integration.capture_builder import START, iso, mixed_capture

pytestmark = pytest.mark.slow


async def test_replay_dropped_every_5000_messages_stores_every_row_once(
    pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    # One minute of this capture is ~2,100 messages: each connection gets past its resume minute.
    capture = mixed_capture(9000)
    path = capture.write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,), drop_every=5000)) as server:
        settings = fault_settings(server.ws_url, pg_url, tmp_path / "spill")
        source = tardis_source(settings)
        summary = await run(settings, source)

    assert isinstance(source, TardisMachineSource)
    assert source.connects >= 6
    assert source.frames_skipped_on_resume > 0
    assert summary.completed
    assert sum(w.rows_duplicate for w in summary.writers.values()) == 0  # resume skipped exactly
    assert await table_counts(pg) == dict(capture.expected_rows)
    assert await duplicate_keys(pg) == 0


async def test_stream_drops_are_recorded_as_gaps_and_rows_stored_once(
    pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    # A stream restarts at the capture's start on every connection: the same 3,000 messages
    # arrive again and again, and the database keeps one copy.
    capture = mixed_capture(2000)
    path = capture.write(tmp_path / "capture.ndjson")
    sent = [line for line in capture.lines if '"book_change"' not in line][:3000]
    pipelines: list[Pipeline] = []

    async with TardisMachineServer(ServeOptions(captures=(path,), drop_every=3000)) as server:
        settings = fault_settings(
            server.ws_url, pg_url, tmp_path / "spill", tardis={"mode": "stream"}
        )
        source = tardis_source(settings)
        running = asyncio.create_task(run(settings, source, prepare=pipelines.append))
        assert isinstance(source, TardisMachineSource)
        await wait_until(lambda: source.connects >= 4)
        await pipelines[0].stop()
        summary = await running

    assert await table_counts(pg) == dict(expected_rows(sent))
    assert await duplicate_keys(pg) == 0
    cursor = await pg.execute(
        "SELECT exchange, count(*), bool_and(gap_end >= gap_start) FROM spot_gaps"
        " WHERE reason = 'reconnect' GROUP BY exchange ORDER BY exchange"
    )
    reconnects = source.connects - 1
    assert await cursor.fetchall() == [
        ("binance", reconnects, True),
        ("coinbase", reconnects, True),
    ]
    assert summary.gaps == 2 * reconnects


async def test_disconnect_message_is_a_gap_until_the_exchanges_next_row(
    pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    capture = mixed_capture(100)
    lost_at = iso(START.replace(second=3), 6)
    disconnect = {"type": "disconnect", "exchange": "coinbase", "localTimestamp": lost_at}
    index = next(i for i, line in enumerate(capture.lines) if lost_at[:19] in line)
    capture.lines.insert(index, json.dumps(disconnect))
    next_coinbase = next(
        json.loads(line)["localTimestamp"]
        for line in capture.lines[index + 1 :]
        if '"coinbase"' in line and '"book_change"' not in line
    )
    path = capture.write(tmp_path / "capture.ndjson")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        summary = await run(fault_settings(server.ws_url, pg_url, tmp_path / "spill"))
        again = await run(fault_settings(server.ws_url, pg_url, tmp_path / "spill"))

    assert summary.processor.disconnects == again.processor.disconnects == 1
    cursor = await pg.execute("SELECT exchange, gap_start, gap_end, reason FROM spot_gaps")
    assert await cursor.fetchall() == [  # recorded once, though replayed twice
        ("coinbase", _moment(lost_at), _moment(next_coinbase), "disconnect")
    ]
    assert await table_counts(pg) == dict(capture.expected_rows)


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)
