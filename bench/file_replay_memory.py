"""`spot replay` throughput and peak memory per file format, first run and re-run (not a test).

    python bench/file_replay_memory.py [--rows 1000000] [--database-url URL] [--rss-bound-mb 300]

For each format (trades CSV, book_snapshot_25 CSV, incremental_book_L2 CSV, NDJSON of normalized
messages; all gzip, as Tardis ships them) it writes a file of `--rows` lines, replays it with
`python -m spot replay` into a fresh database, then replays it again (every row already stored:
the duplicate path). It reports lines/s, rows stored/s and the child's peak RSS (from wait4), once
with a tenth of the rows too, so flat memory shows as two close numbers. Wall time includes
interpreter start and connecting (about 1 s).

Database: --database-url, else SPOT_BENCH_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test
(the server's `CREATE DATABASE` right is needed: every run gets its own database).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
START_US = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
VARIANTS = 97  # distinct price ladders, cycled: realistic spellings, cheap to write


def trades_lines(rows: int) -> Iterator[str]:
    yield "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
    for n in range(rows):
        at = START_US + (n // 2) * 700  # trades share timestamps in pairs
        trade_id = "" if n % 4 == 0 else str(3_445_374_963 + n)  # a quarter without id
        side = "buy" if n % 3 else "sell"
        price, amount = 61000 + n % 997 / 100, f"0.0{n % 89 + 10}"
        yield f"binance,BTCUSDT,{at},{at + 1234},{trade_id},{side},{price},{amount}\n"


def book_snapshot_25_lines(rows: int) -> Iterator[str]:
    levels = 25
    header = [
        f"{side}[{i}].{part}"
        for i in range(levels)
        for side in ("asks", "bids")
        for part in ("price", "amount")
    ]
    yield "exchange,symbol,timestamp,local_timestamp," + ",".join(header) + "\n"
    ladders = []
    for v in range(VARIANTS):
        cells = []
        for i in range(levels):
            cells += [f"{61001 + v / 100 + i / 10:.2f}", f"{0.001 * (v + i + 1):.3f}"]
            cells += [f"{61000 + v / 100 - i / 10:.2f}", f"{0.002 * (v + i + 1):.3f}"]
        ladders.append(",".join(cells))
    for n in range(rows):
        at = START_US + n * 1000
        yield f"binance-futures,BTCUSDT,{at},{at + 1234},{ladders[n % VARIANTS]}\n"


def incremental_lines(rows: int) -> Iterator[str]:
    yield "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount\n"
    randomly = random.Random(7)
    depth = 500
    snapshot = f"deribit,BTC-PERPETUAL,{START_US},{START_US + 100},true"
    for i in range(depth):
        yield f"{snapshot},bid,{60000 - i / 2},{i + 1}\n"
        yield f"{snapshot},ask,{60000.5 + i / 2},{i + 1}\n"
    at = START_US
    for n in range(rows - 2 * depth):
        if n % 3 == 0:  # one to three level updates per change, a change every ~0.7 ms
            at += randomly.randint(100, 1300)
        bid = randomly.random() < 0.5
        ticks = randomly.randint(0, 60)
        price = 60000 - ticks / 2 if bid else 60000.5 + ticks / 2
        amount = 0 if randomly.random() < 0.2 else randomly.randint(1, 5000)
        side = "bid" if bid else "ask"
        yield f"deribit,BTC-PERPETUAL,{at},{at + 250},false,{side},{price},{amount}\n"


def ndjson_lines(rows: int) -> Iterator[str]:
    ladders = []
    for v in range(VARIANTS):
        bids = [{"price": round(61000 + v / 100 - i / 10, 2), "amount": 1 + i} for i in range(15)]
        asks = [{"price": round(61001 + v / 100 + i / 10, 2), "amount": 2 + i} for i in range(15)]
        ladders.append(json.dumps({"bids": bids, "asks": asks}, separators=(",", ":"))[1:-1])
    for n in range(rows):
        at = START_US + n * 1000
        timestamp = f"2024-03-01T{_clock(at)}.{at // 1000 % 1000:03d}Z"
        local = f"2024-03-01T{_clock(at + 1234)}.{(at + 1234) % 1_000_000:06d}Z"
        if n % 2:
            yield (
                f'{{"type":"trade","symbol":"BTCUSDT","exchange":"binance","id":"{n}",'
                f'"price":{61000 + n % 997 / 100},"amount":0.5,"side":"buy",'
                f'"timestamp":"{timestamp}","localTimestamp":"{local}"}}\n'
            )
        else:
            yield (
                f'{{"type":"book_snapshot","symbol":"BTCUSDT","exchange":"binance",'
                f'"name":"book_snapshot_15_100ms","depth":15,"interval":100,'
                f'{ladders[n % VARIANTS]},"timestamp":"{timestamp}","localTimestamp":"{local}"}}\n'
            )


def _clock(unix_us: int) -> str:
    seconds = unix_us // 1_000_000 % 86_400
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


FORMATS: dict[str, Callable[[int], Iterator[str]]] = {
    "trades CSV": trades_lines,
    "book_snapshot_25 CSV": book_snapshot_25_lines,
    "incremental_book_L2 CSV": incremental_lines,
    "NDJSON (trades + book_snapshot_15)": ndjson_lines,
}


def write_gzip(path: Path, lines: Iterator[str]) -> int:
    count = 0
    with gzip.open(path, "wt", compresslevel=1, newline="") as file:
        for line in lines:
            file.write(line)
            count += 1
    return count


@dataclass
class Run:
    secs: float
    peak_rss_mb: float
    rows: int


def replay(path: Path, url: str) -> Run:
    env = {**os.environ, "SPOT_DATABASE_URL": url, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "spot", "replay", str(path), "--no-progress"]
    started = time.perf_counter()
    child = subprocess.Popen(
        [*command, "--log-level", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"spot replay {path} exited with {child.returncode}")
    return Run(secs, usage.ru_maxrss / 1024, stored_rows(url))


def stored_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        total = 0
        for (table,) in tables:
            row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
            total += int(row[0]) if row else 0
        return total


class FreshDatabase:
    """A database of its own for one measurement, dropped afterwards."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.name = f"spot_bench_{uuid.uuid4().hex[:10]}"

    def __enter__(self) -> str:
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        info = psycopg.conninfo.conninfo_to_dict(self.server_url)
        info["dbname"] = self.name
        return psycopg.conninfo.make_conninfo("", **info)

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="lines per file")
    parser.add_argument("--database-url", default=os.environ.get("SPOT_BENCH_DATABASE_URL"))
    parser.add_argument("--rss-bound-mb", type=float, default=300.0)
    parser.add_argument("--only", help="run the formats whose name contains this")
    args = parser.parse_args()
    server_url = args.database_url or DEFAULT_URL

    print(f"spot replay bench: {args.rows:,} lines a file, gzip; {sys.version.split()[0]}")
    header = (
        f"{'format':<36} {'lines':>9} {'rows':>9} {'secs':>6} {'lines/s':>9} {'rows/s':>8} "
        f"{'RSS MB':>7} {'RSS@10%':>7} {'re-run s':>8} {'re-run x':>8}"
    )
    print(header)
    worst_rss = 0.0
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as directory:
        for name, lines in FORMATS.items():
            if args.only and args.only not in name:
                continue
            big = Path(directory) / "big.gz"
            small = Path(directory) / "small.gz"
            line_count = write_gzip(big, lines(args.rows))
            write_gzip(small, lines(max(args.rows // 10, 1000)))
            with FreshDatabase(server_url) as url:
                first = replay(big, url)
                again = replay(big, url)
            with FreshDatabase(server_url) as url:
                tenth = replay(small, url)
            assert again.rows == first.rows, "a re-run changed the row count"
            worst_rss = max(worst_rss, first.peak_rss_mb, again.peak_rss_mb)
            print(
                f"{name:<36} {line_count:>9,} {first.rows:>9,} {first.secs:>6.1f} "
                f"{line_count / first.secs:>9,.0f} {first.rows / first.secs:>8,.0f} "
                f"{first.peak_rss_mb:>7.0f} {tenth.peak_rss_mb:>7.0f} {again.secs:>8.1f} "
                f"{again.secs / first.secs:>8.2f}",
                flush=True,
            )
            big.unlink()
            small.unlink()
    verdict = "within" if worst_rss <= args.rss_bound_mb else "ABOVE"
    print(f"peak RSS {worst_rss:.0f} MB: {verdict} the {args.rss_bound_mb:.0f} MB bound")


if __name__ == "__main__":
    main()
