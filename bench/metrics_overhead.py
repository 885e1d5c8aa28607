"""What stream health and metrics cost end to end: the same workload with [health] on and off.

    python -m bench.metrics_overhead                    5 rounds of 200k mixed messages
    python -m bench.metrics_overhead --messages 50k --rounds 3 --kind trades

Each round runs spot twice against the bench's loopback server (bench.wsserver, its own process)
and PostgreSQL (bench.database: --dsn, the local server, or an embedded one): once with
`health.enabled = false` (no per-row observation, no endpoint) and once with it on (per-row
observation, the 1 s watch, the HTTP endpoint listening on a free port). The order alternates
between rounds so that drift of the machine falls on both alike. Every run starts on a fresh
schema of its own (not bench's, so it can run beside `python -m bench`). Prints one JSON
document: rows/s and spot's CPU µs per row of each run, medians, and on/off ratios (1.0 = free).
Wall-clock rows/s suffer from anything else the 2 cores run; CPU per row much less so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from bench import database
from bench.harness import _blast_server, _child
from bench.spot_worker import settings_for
from bench.workload import KINDS
from spot import main_loop

SCHEMA = "spot_metrics_bench"
OFF = ["health.enabled=false"]
ON = ["health.enabled=true", "health.port=0"]


def _count(text: str) -> int:
    text = text.strip().lower()
    for suffix, factor in (("k", 1_000), ("m", 1_000_000)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def spot_run(kind: str, messages: int, dsn: str, health: list[str]) -> tuple[float, float]:
    """Return spot's rows/s (server's first byte to spot's end) and CPU µs per row, one run."""
    database.reset_schema(dsn, SCHEMA)
    with _blast_server([kind, str(messages)]) as (url, sent):
        result = _child(
            ["bench.metrics_overhead", "--worker", url, database.in_schema(dsn, SCHEMA), *health]
        )
        first_byte_ns = sent()["started_ns"]
    if not result["completed"] or result["rows"] != messages:
        raise RuntimeError(f"spot stored {result['rows']} of {messages} rows")
    rows = float(result["rows"])
    return rows / ((result["ended_ns"] - first_byte_ns) / 1e9), result["cpu_seconds"] / rows * 1e6


def measure(kind: str, messages: int, rounds: int, dsn: str) -> dict[str, Any]:
    """Run `rounds` off/on pairs, alternating which goes first; return the figures."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for index in range(rounds):
        order = (("off", OFF), ("on", ON)) if index % 2 == 0 else (("on", ON), ("off", OFF))
        for label, health in order:
            rate, cpu_us = spot_run(kind, messages, dsn, health)
            rates[label].append(rate)
            cpu[label].append(cpu_us)
            print(
                f"  round {index + 1}/{rounds} health {label}: {rate:,.0f} rows/s, "
                f"{cpu_us:.2f} CPU µs/row",
                file=sys.stderr,
            )
    return {
        "kind": kind,
        "messages": messages,
        "rounds": rounds,
        "rows_per_sec": _figure(rates, digits=0),
        "cpu_us_per_row": _figure(cpu, digits=2),
        # Throughput on/off (< 1: slower with metrics); CPU on/off (> 1: more CPU per row).
        "throughput_ratio_on_off": round(
            statistics.median(rates["on"]) / statistics.median(rates["off"]), 3
        ),
        "cpu_ratio_on_off": round(statistics.median(cpu["on"]) / statistics.median(cpu["off"]), 3),
        # Round by round: less sensitive to slow drift than the ratio of medians.
        "paired_throughput_ratios": [
            round(on / off, 3) for on, off in zip(rates["on"], rates["off"], strict=True)
        ],
    }


def _figure(values: dict[str, list[float]], digits: int) -> dict[str, Any]:
    return {
        "median": {label: round(statistics.median(v), digits) for label, v in values.items()},
        "runs": {label: [round(x, digits) for x in v] for label, v in values.items()},
    }


def worker(ws_url: str, dsn: str, overrides: list[str]) -> dict[str, Any]:
    """Run spot once in this process; CPU is counted from the run's start, not the imports."""
    settings = settings_for(ws_url, dsn, overrides)
    cpu_before = time.process_time()
    summary = asyncio.run(main_loop.run(settings))
    return {
        "rows": summary.rows_inserted,
        "completed": summary.completed,
        "ended_ns": time.time_ns(),
        "cpu_seconds": time.process_time() - cpu_before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL (default: 127.0.0.1:5432/test, else embedded)")
    parser.add_argument("--messages", type=_count, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kind", choices=KINDS, default="mixed")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # WS_URL DSN OVERRIDE...
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.worker[2:])))
        return 0
    with database.server_dsn(args.dsn) as (dsn, where):
        print(f"metrics overhead: {where}, {args.kind} x {args.messages:,}", file=sys.stderr)
        figures = {"postgres": where, **measure(args.kind, args.messages, args.rounds, dsn)}
        database.drop_schema(dsn, SCHEMA)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
