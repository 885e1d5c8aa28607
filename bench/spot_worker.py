"""Run spot's real pipeline in this process against the bench server; print what it measured.

`python -m bench.spot_worker WS_URL DSN [--latency]`: spot in replay mode with its default queue
and pool settings (overridable with --set section.key=value), reading from WS_URL, writing to DSN.
Prints one JSON line: frames, rows inserted, when the run started and when the last batch was
committed (the harness times from the server's first byte: `time.time_ns()` is one clock for
every process of the machine), peak RSS, CPU seconds, and with --latency
the receive→commit latency of every row (taken from the commit time of its batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Sequence
from typing import Any

from bench.workload import exchanges
from spot import main_loop
from spot.config import Settings, settings_from_dict
from spot.db_writer import PostgreSQLDatabase
from spot.tables import Row


class CommitClock:
    """Record, per committed batch, its commit time and its rows' receive times (bench only)."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []

    def install(self) -> None:
        original = PostgreSQLDatabase.copy_rows
        latencies = self.latencies_ms

        async def timed_copy_rows(db: PostgreSQLDatabase, table: str, rows: Sequence[Row]) -> int:
            inserted = await original(db, table, rows)
            committed_ns = time.time_ns()
            for row in rows:
                received = row[-1]  # received_at, the last column of both tables
                received_ns = (
                    int(received.timestamp()) * 1_000_000_000 + received.microsecond * 1000
                )
                latencies.append((committed_ns - received_ns) / 1e6)
            return inserted

        PostgreSQLDatabase.copy_rows = timed_copy_rows  # type: ignore[method-assign]


def settings_for(ws_url: str, dsn: str, overrides: list[str]) -> Settings:
    raw: dict[str, Any] = {
        "tardis": {"url": ws_url, "mode": "replay", "from": "2024-03-01", "to": "2024-03-02"},
        "exchanges": [{"name": name, "symbols": symbols} for name, symbols in exchanges().items()],
        "database": {"url": dsn},
    }
    for override in overrides:
        path, _, value = override.partition("=")
        section, key = path.split(".")
        raw.setdefault(section, {})[key] = json.loads(value)
    return settings_from_dict(raw)


async def measure(settings: Settings, clock: CommitClock | None) -> dict[str, Any]:
    if clock is not None:
        clock.install()
    started_ns = time.time_ns()
    summary = await main_loop.run(settings)
    ended_ns = time.time_ns()
    result: dict[str, Any] = {
        "frames": summary.processor.frames,
        "rows": summary.rows_inserted,
        "completed": summary.completed,
        "started_ns": started_ns,
        "ended_ns": ended_ns,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_seconds": time.process_time(),
    }
    if clock is not None:
        result["latencies_ms"] = clock.latencies_ms
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ws_url")
    parser.add_argument("dsn")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="e.g. queue.batch_size=2000")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    settings = settings_for(args.ws_url, args.dsn, args.set)
    clock = CommitClock() if args.latency else None
    if args.uvloop:
        import uvloop

        result = uvloop.run(measure(settings, clock))
    else:
        result = asyncio.run(measure(settings, clock))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
