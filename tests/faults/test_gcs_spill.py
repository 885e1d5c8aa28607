"""GCS spill round trip against gcp-storage-emulator on 127.0.0.1, through the gcsfs code path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spot.db_writer import PostgreSQLDatabase
from spot.fallback_storage import FallbackStorage, open_fallback, open_store
from spot.main_loop import run
from spot.recovery import recover_spills
from spot.serve import ServeOptions, TardisMachineServer
from spot.tables import TRADE_COLUMNS
from tests.database import Connection, duplicate_keys, table_counts
from tests.faults.conftest import fault_settings
from tests.faults.tcp_proxy import TcpProxy
from tests.integration.capture_builder import mixed_capture

pytest.importorskip("gcsfs")
pytestmark = pytest.mark.slow
BUCKET = "spot-spill"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    """A gcp-storage-emulator on loopback with an empty bucket; its endpoint URL."""
    port = _free_port()
    emulator = Path(sys.executable).with_name("gcp-storage-emulator")
    process = subprocess.Popen(
        [str(emulator), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the GCS emulator did not start"
                time.sleep(0.05)
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        import gcsfs

        gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", project="test").mkdir(BUCKET)
        yield endpoint
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        process.terminate()
        process.wait(10)


def _options(endpoint: str) -> dict[str, str]:
    return {"endpoint_url": endpoint, "token": "anon", "project": "test"}


async def test_a_spill_in_gcs_reads_back_bit_identical_and_is_removed(gcs_endpoint: str) -> None:
    storage = FallbackStorage(open_store(f"gs://{BUCKET}/roundtrip", _options(gcs_endpoint)))
    moment = datetime(2024, 3, 1, 0, 0, 0, 123456, tzinfo=UTC)
    rows = [
        ("binance", "BTCUSDT", str(i), "buy", 0.1 + i, 1e-9 * i, moment, moment, i, -i, moment)
        for i in range(1000)
    ]

    ref = await storage.write("trade_btc_usdt", TRADE_COLUMNS, rows)
    listed = await storage.pending()
    spill = await storage.read(ref)
    await storage.remove(ref)

    assert listed == [ref]
    assert spill.rows == rows
    assert spill.header.row_count == 1000
    assert await storage.pending() == []


async def test_database_down_spills_to_gcs_and_recovery_stores_every_row_once(
    gcs_endpoint: str, proxy: TcpProxy, pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    capture = mixed_capture(1500)
    path = capture.write(tmp_path / "capture.ndjson")
    proxy.cut()
    fallback = {
        "url": f"gs://{BUCKET}/run",
        "storage_options": _options(gcs_endpoint),
        "spill_after_secs": 0.5,
    }

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = fault_settings(
            server.ws_url,
            proxy.dsn(pg_url),
            tmp_path / "unused",
            fallback=fallback,
            shutdown_timeout_secs=2,
        )
        summary = await run(settings)
    storage = open_fallback(settings.fallback)
    spilled = 0
    for ref in await storage.pending():
        spilled += (await storage.read(ref)).header.row_count
    async with PostgreSQLDatabase(pg_url, 15) as db:
        recovered = await recover_spills(db, storage, 15)

    assert summary.rows_spilled == spilled == sum(capture.expected_rows.values())
    assert recovered.rows_inserted == spilled
    assert await storage.pending() == []
    assert await table_counts(pg) == dict(capture.expected_rows)
    assert await duplicate_keys(pg) == 0
