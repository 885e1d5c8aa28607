"""What idempotent writes cost: spot's keyed COPY path vs plain binary COPY into a keyless table.

Run: python -m bench.idempotent_writes [--trades N] [--books N] [--rounds R] [--dsn DSN]

In one run and one database, per kind of row, each round measures:
  plain       binary COPY into a table without a primary key (the ceiling; duplicates pile up)
  spot new    PostgreSQLDatabase.copy_rows of new rows: COPY into the keyed table
  spot again  the same rows written again: COPY hits the key, so the batch goes through a temp
              table and INSERT … ON CONFLICT DO NOTHING (a retry or a recovered spill)
and prints rows/s (median of the rounds) and each path's ratio to plain.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from bench.database import server_dsn
from spot.db_writer import PostgreSQLDatabase
from spot.tables import Row, column_types

LEVELS = 15
BATCH = 5000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def trade_rows(count: int, offset: int) -> list[Row]:
    rows = []
    for i in range(offset, offset + count):
        us = 1_709_251_200_000_000 + i * 100
        moment = EPOCH + timedelta(microseconds=us)
        side = "buy" if i % 2 else "sell"
        rows.append(
            (
                "binance",
                "BTCUSDT",
                str(i),
                side,
                61000.0 + i % 97,
                0.01,
                moment,
                moment,
                us,
                us,
                moment,
            )
        )
    return rows


def book_rows(count: int, offset: int) -> list[Row]:
    rows = []
    for i in range(offset, offset + count):
        us = 1_709_251_200_000_000 + i * 100_000
        moment = EPOCH + timedelta(microseconds=us)
        levels = [61000.0 - j for j in range(LEVELS)] + [1.0 + j for j in range(LEVELS)]
        levels += [61001.0 + j for j in range(LEVELS)] + [2.0 + j for j in range(LEVELS)]
        rows.append(("binance", "BTCUSDT", moment, moment, us, us, *levels, moment))
    return rows


def batches(rows: Sequence[Row]) -> list[Sequence[Row]]:
    return [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]


async def plain_copy(
    dsn: str, table: str, types: list[str], columns: list[str], rows: Sequence[Row]
) -> float:
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        for batch in batches(rows):
            async with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
                copy.set_types(types)
                for row in batch:
                    await copy.write_row(row)
        return time.perf_counter() - started


async def spot_copy(db: PostgreSQLDatabase, table: str, rows: Sequence[Row]) -> float:
    started = time.perf_counter()
    for batch in batches(rows):
        await db.copy_rows(table, batch)
    return time.perf_counter() - started


async def measure(dsn: str, kind: str, rows_per_round: int, rounds: int) -> dict[str, float]:
    """Return the median rows/s of each path for one kind of row."""
    make = trade_rows if kind == "trade" else book_rows
    timings: dict[str, list[float]] = {"plain": [], "spot new": [], "spot again": []}
    async with PostgreSQLDatabase(dsn, LEVELS, pool_size=2) as db:
        for round_ in range(rounds):
            keyed = f"{kind}_bench_r{round_}"
            layout = await db.ensure_table(keyed)
            plain = f"{kind}_plain_r{round_}"
            await db.execute(
                sql.SQL("CREATE TABLE {} (LIKE {})")
                .format(sql.Identifier(plain), sql.Identifier(keyed))
                .as_string(None)
            )
            rows = make(rows_per_round, round_ * rows_per_round)
            types = column_types(layout.columns)
            timings["plain"].append(await plain_copy(dsn, plain, types, layout.column_names, rows))
            timings["spot new"].append(await spot_copy(db, keyed, rows))
            timings["spot again"].append(await spot_copy(db, keyed, rows))
    return {path: rows_per_round / statistics.median(secs) for path, secs in timings.items()}


def report(kind: str, rates: dict[str, float]) -> None:
    plain = rates["plain"]
    for path, rate in rates.items():
        print(f"  {kind:<9} {path:<11} {rate:>11,.0f} rows/s   {rate / plain:5.2f}x plain")


async def main_async(args: argparse.Namespace) -> None:
    with server_dsn(args.dsn) as (admin_dsn, where):
        name = f"spot_bench_idem_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
        info["dbname"] = name
        dsn = psycopg.conninfo.make_conninfo("", **info)
        try:
            print(
                f"Idempotent writes vs plain binary COPY ({where}, batches of {BATCH}, "
                f"median of {args.rounds} rounds)"
            )
            report("trade", await measure(dsn, "trade", args.trades, args.rounds))
            report("orderbook", await measure(dsn, "orderbook", args.books, args.rounds))
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=200_000, help="trade rows per round")
    parser.add_argument("--books", type=int, default=50_000, help="book rows per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", help="PostgreSQL server (default: local, else embedded)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
