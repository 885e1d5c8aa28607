"""Run every measurement side by side against one PostgreSQL and summarize them.

Each measured thing runs in its own process (spot, the server, the raw COPY writer, the peer),
so the two cores are shared as in production and every figure has a clean heap; a fresh schema
and a CHECKPOINT precede every run. Figures are medians of `runs` runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import database
from bench.workload import Kind, Workload

ROOT = Path(__file__).resolve().parent.parent
Figure = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """What one harness run measures, and how big."""

    dsn: str | None = None
    runs: int = 3
    messages: int = 200_000  # per throughput run
    peer_messages: int = 100_000
    memory_sizes: tuple[int, ...] = (100_000, 1_000_000)
    latency_rate: int = 10_000
    latency_secs: float = 10.0
    kinds: tuple[Kind, ...] = ("books", "trades", "mixed")
    progress: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))


def quick_plan(**overrides: Any) -> Plan:
    """Return the --quick plan: one run of each, small N."""
    values: dict[str, Any] = {
        "runs": 1,
        "messages": 30_000,
        "peer_messages": 20_000,
        "memory_sizes": (10_000, 100_000),
        "latency_secs": 3.0,
    }
    return Plan(**{**values, **overrides})


def run_plan(plan: Plan) -> dict[str, Any]:
    """Measure everything in `plan`; return the results document (see docs/benchmarks.md)."""
    with database.server_dsn(plan.dsn) as (dsn, where):
        bench = _Bench(plan, dsn)
        started = time.time()
        figures: dict[str, Any] = {
            "raw_copy": bench.raw_copy(),
            "spot_end_to_end": bench.spot_end_to_end(),
            "server_send_rate": bench.server_send_rate(),
            "spot_file_replay": bench.file_replay(),
            "peer_cryptofeed": bench.peer(),
            "memory": bench.memory(),
            "latency": bench.latency(),
        }
        database.drop_schema(dsn, bench.schema)
        document = {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration_secs": round(time.time() - started, 1),
            "machine": machine_facts(dsn, where),
            "plan": {
                "runs": plan.runs,
                "messages": plan.messages,
                "peer_messages": plan.peer_messages,
                "memory_sizes": list(plan.memory_sizes),
                "latency_rate": plan.latency_rate,
                "latency_secs": plan.latency_secs,
            },
            "figures": figures,
        }
    document["ratios"] = ratios(figures)
    document["targets"] = targets(document)
    return document


def machine_facts(dsn: str, where: str) -> dict[str, Any]:
    memory_kb = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    facts = database.server_facts(dsn)
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "postgresql": facts.pop("server_version"),
        "postgresql_settings": facts,
        "postgresql_where": where,
        "packages": _versions("psycopg", "msgspec", "aiohttp", "cryptofeed", "asyncpg"),
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def median_of(runs: list[dict[str, Any]], key: str) -> Figure:
    values = [run[key] for run in runs]
    return {key: statistics.median(values), "runs": values}


class _Bench:
    def __init__(self, plan: Plan, dsn: str) -> None:
        self.plan = plan
        self.dsn = dsn
        # A schema of this run's own: other work may use the same database at the same time.
        self.schema = f"{database.SCHEMA}_{os.getpid()}"
        self.schema_dsn = database.in_schema(dsn, self.schema)

    def _repeat(self, label: str, once: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for attempt in range(self.plan.runs):
            database.reset_schema(self.dsn, self.schema)
            try:
                result = once()
            except RuntimeError as exc:  # a machine shared with other work: retry a run once
                self.plan.progress(f"  {label} run {attempt + 1} failed, retrying: {exc}")
                database.reset_schema(self.dsn, self.schema)
                result = once()
            results.append(result)
            shown = {k: round(v) for k, v in result.items() if k.endswith(("_per_sec", "_mb"))}
            self.plan.progress(f"  {label} run {attempt + 1}/{self.plan.runs}: {shown}")
        return results

    # 1. the ceiling

    def raw_copy(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        for kind in ("books", "trades"):
            figures[kind] = {}
            for keyed, flag in (("with_key", []), ("no_key", ["--no-key"])):
                args = ["bench.raw_copy", kind, str(self.plan.messages), self.schema_dsn, *flag]
                runs = self._repeat(f"raw COPY {kind} {keyed}", lambda args=args: _child(args))
                figures[kind][keyed] = median_of(runs, "rows_per_sec")
        return figures

    # 2. spot end to end

    def spot_end_to_end(self) -> dict[str, Any]:
        figures = {}
        for kind in self.plan.kinds:
            runs = self._repeat(
                f"spot {kind}", lambda kind=kind: self._spot_run(kind, self.plan.messages)
            )
            figures[kind] = {**median_of(runs, "rows_per_sec"), **_cpu_share(runs)}
        return figures

    def _spot_run(
        self,
        kind: Kind,
        messages: int,
        rate: float | None = None,
        extra: list[str] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        server_args = [kind, str(messages)] + (["--rate", str(rate)] if rate else [])
        with _blast_server(server_args) as (url, sent):
            result = _child(["bench.spot_worker", url, self.schema_dsn, *extra])
            first_byte_ns = sent()["started_ns"]
        if not result["completed"] or result["rows"] != messages:
            raise RuntimeError(f"spot stored {result['rows']} of {messages} rows: {result}")
        seconds = (result["ended_ns"] - first_byte_ns) / 1e9
        result["seconds"] = seconds
        result["rows_per_sec"] = result["rows"] / seconds
        result["cpu_share"] = result["cpu_seconds"] / seconds
        return result

    def server_send_rate(self) -> dict[str, Any]:
        """The loopback server's own rate into a reader that does nothing (1 run)."""
        figures = {}
        for kind in ("books", "trades"):
            with _blast_server([kind, str(self.plan.messages)]) as (url, sent):
                asyncio.run(_read_all(url))
                report = sent()
            figures[kind] = {"messages_per_sec": report["messages"] / report["seconds"]}
        return figures

    # 3. spot replay of Tardis CSV files

    def file_replay(self) -> dict[str, Any]:
        available, reason = _spot_replay_available()
        if not available:
            return {"available": False, "reason": reason}
        figures: dict[str, Any] = {"available": True}
        for kind in self.plan.kinds:
            with tempfile.TemporaryDirectory(prefix="spot-bench-csv-") as directory:
                files = Workload(kind, self.plan.messages).write_csv_gz(Path(directory))
                runs = self._repeat(
                    f"spot replay {kind}",
                    lambda files=files, kind=kind: self._replay_run(files, kind),
                )
            figures[kind] = median_of(runs, "rows_per_sec")
        return figures

    def _replay_run(self, files: list[Path], kind: Kind) -> dict[str, Any]:
        command = [sys.executable, "-m", "spot", "replay", *map(str, files)]
        command += ["--no-progress", "--log-level", "WARNING"]
        env = {**os.environ, "SPOT_DATABASE_URL": self.schema_dsn}
        started = time.perf_counter()
        _run(command, env)
        seconds = time.perf_counter() - started
        rows = database.count_rows(self.dsn, self.schema)
        if rows != self.plan.messages:
            raise RuntimeError(f"spot replay stored {rows} of {self.plan.messages} {kind} rows")
        return {"rows": rows, "seconds": seconds, "rows_per_sec": rows / seconds}

    # 4. the peer

    def peer(self) -> dict[str, Any]:
        if _versions("cryptofeed")["cryptofeed"] == "not installed":
            return {
                "available": False,
                "reason": "cryptofeed is not installed (pip install -e '.[bench]')",
            }
        figures: dict[str, Any] = {"available": True}
        for kind in ("books", "trades"):
            args = ["bench.peer", kind, str(self.plan.peer_messages), self.dsn]
            args += ["--schema", self.schema]
            runs = self._repeat(f"cryptofeed {kind}", lambda args=args: _child(args))
            figures[kind] = median_of(runs, "rows_per_sec")
            figures["version"] = runs[0]["version"]
        return figures

    # 5. memory

    def memory(self) -> dict[str, Any]:
        figures = {}
        for size in self.plan.memory_sizes:
            runs = self._repeat(f"memory {size:,}", lambda size=size: self._spot_run("mixed", size))
            figures[str(size)] = {
                **median_of(runs, "peak_rss_mb"),
                "rows_per_sec": statistics.median(run["rows_per_sec"] for run in runs),
            }
        return figures

    # 6. latency

    def latency(self) -> dict[str, Any]:
        messages = int(self.plan.latency_rate * self.plan.latency_secs)
        figures = {}
        for name, extra in (
            ("default_settings", []),
            ("flush_interval_0.5s (the old default)", ["--set", "queue.flush_interval_secs=0.5"]),
        ):
            runs = self._repeat(
                f"latency {name}",
                lambda extra=extra: _latency_summary(
                    self._spot_run("mixed", messages, self.plan.latency_rate, ["--latency", *extra])
                ),
            )
            figures[name] = {
                "p50_ms": statistics.median(run["p50_ms"] for run in runs),
                "p99_ms": statistics.median(run["p99_ms"] for run in runs),
                "max_ms": statistics.median(run["max_ms"] for run in runs),
                "runs": runs,
            }
        return figures


def _latency_summary(result: dict[str, Any]) -> dict[str, Any]:
    latencies = sorted(result.pop("latencies_ms"))

    def at(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    return {"rows": len(latencies), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0)}


def _cpu_share(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"spot_cpu_share": round(statistics.median(run["cpu_share"] for run in runs), 2)}


@contextmanager
def _blast_server(args: list[str]) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """Start bench.wsserver; yield its URL and a function returning its SENT report."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.wsserver", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"bench server did not start: {line!r}")
        url = f"ws://127.0.0.1:{line.split()[1]}"

        def sent() -> dict[str, Any]:
            assert process.stdout is not None
            report = process.stdout.readline()
            if not report.startswith("SENT "):
                raise RuntimeError(f"bench server said {report!r}")
            return dict(json.loads(report[5:]))

        yield url, sent
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


async def _read_all(url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/ws-replay-normalized", max_msg_size=1 << 24) as ws,
    ):
        while (await ws.receive()).type == aiohttp.WSMsgType.TEXT:
            pass


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def _child(args: list[str]) -> dict[str, Any]:
    """Run `python -m <args>` and return the JSON object it printed last."""
    out = _run([sys.executable, "-m", *args], _env())
    return dict(json.loads(out.strip().splitlines()[-1]))


def _run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:4])} failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    return done.stdout


def _spot_replay_available() -> tuple[bool, str]:
    done = subprocess.run(
        [sys.executable, "-m", "spot", "replay", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    if done.returncode != 0:
        return False, "`spot replay` is not available yet"
    return True, ""


def ratios(figures: dict[str, Any]) -> dict[str, Any]:
    """Return spot / raw COPY and spot / cryptofeed, per kind."""
    raw = figures["raw_copy"]
    result: dict[str, Any] = {}
    for kind in ("books", "trades"):
        spot = figures["spot_end_to_end"].get(kind, {}).get("rows_per_sec")
        if spot is None:
            continue
        entry = {
            "spot_vs_raw_copy_with_key": spot / raw[kind]["with_key"]["rows_per_sec"],
            "spot_vs_raw_copy_no_key": spot / raw[kind]["no_key"]["rows_per_sec"],
        }
        peer = figures["peer_cryptofeed"]
        if peer.get("available"):
            entry["spot_vs_cryptofeed"] = spot / peer[kind]["rows_per_sec"]
        replay = figures["spot_file_replay"]
        if replay.get("available") and kind in replay:
            entry["file_replay_vs_raw_copy_with_key"] = (
                replay[kind]["rows_per_sec"] / raw[kind]["with_key"]["rows_per_sec"]
            )
        result[kind] = {name: round(value, 3) for name, value in entry.items()}
    return result


def targets(document: dict[str, Any]) -> dict[str, Any]:
    """Check the issue's targets against the measured figures."""
    ratio = document["ratios"]
    figures = document["figures"]
    rss = [entry["peak_rss_mb"] for entry in figures["memory"].values()]
    checks: dict[str, Any] = {}
    for kind in ("books", "trades"):
        if kind in ratio:
            value = ratio[kind]["spot_vs_raw_copy_with_key"]
            checks[f"{kind}_e2e_vs_raw_copy>=0.6"] = {"value": value, "met": value >= 0.6}
    if "trades" in ratio and "spot_vs_cryptofeed" in ratio["trades"]:
        value = ratio["trades"]["spot_vs_cryptofeed"]
        checks["trades_vs_cryptofeed>=4"] = {"value": value, "met": value >= 4}
    checks["peak_rss<=200MB"] = {"value": max(rss), "met": max(rss) <= 200}
    growth = max(rss) / min(rss)
    checks["rss_flat(max/min<=1.25)"] = {"value": round(growth, 2), "met": growth <= 1.25}
    p99 = figures["latency"]["default_settings"]["p99_ms"]
    checks["p99_latency<=250ms(default settings)"] = {"value": p99, "met": p99 <= 250}
    return checks
