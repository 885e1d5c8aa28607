from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

from spot.demo import demo_capture, demo_manifest
from spot.serve import ServeOptions, TardisMachineServer
from tests.database import table_counts

FINISHED = re.compile(r"Run finished: (\d+) frames, (\d+) trades, (\d+) book snapshots, (\d+) rows")


def _stream_config(path: Path, ws_url: str, pg_url: str) -> Path:
    exchanges = "".join(
        f'[[exchanges]]\nname = "{name}"\nsymbols = {json.dumps(info["symbols"])}\n'
        for name, info in demo_manifest()["exchanges"].items()
    )
    path.write_text(
        f'[tardis]\nurl = "{ws_url}"\nmode = "stream"\n{exchanges}'
        f"[queue]\nflush_interval_secs = 0.1\nbatch_size = 200\n"
        f"[database]\nurl = {json.dumps(pg_url)}\n"
    )
    return path


async def _wait_for_inserts(stderr: asyncio.StreamReader, wanted: int, seen: list[str]) -> None:
    inserts = 0
    while inserts < wanted:
        line = (await stderr.readline()).decode()
        assert line, "spot exited before inserting anything:\n" + "".join(seen)
        seen.append(line)
        inserts += "[✅] Inserted" in line


async def test_sigterm_mid_stream_stores_every_message_received(
    tmp_path: Path, pg_url: str, pg
) -> None:
    options = ServeOptions(captures=(demo_capture(),), speed=20.0)
    async with TardisMachineServer(options) as server:
        config = _stream_config(tmp_path / "spot.toml", server.ws_url, pg_url)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spot",
            "run",
            "--config",
            str(config),
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        seen: list[str] = []
        await asyncio.wait_for(_wait_for_inserts(process.stderr, 12, seen), 60)
        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stderr.read(), 60)).decode()
        code = await process.wait()
        sent = server.messages_sent

    log = "".join(seen) + rest
    assert code == 0, log
    assert "SIGTERM: stop reading" in log
    finished = FINISHED.search(log)
    assert finished, log
    frames, trades, books, inserted = map(int, finished.groups())
    assert 0 < frames <= sent < demo_manifest()["messages"]  # stopped mid-stream
    assert trades + books == inserted == sum((await table_counts(pg)).values())
