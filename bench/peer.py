"""Peer baseline: cryptofeed's PostgreSQL backend writing the same trades and books.

Worker process: `python -m bench.peer KIND N DSN`. The backend is used as cryptofeed's
FeedHandler uses it: `TradePostgres` / `BookPostgres(snapshots_only=True)` with default settings,
started on the running loop, called with cryptofeed `Trade` / `OrderBook` objects (Decimal
prices, as cryptofeed's feeds build them) and the receipt time, into the tables of cryptofeed's
sample schema (examples/postgres_tables.sql: serial key, NUMERIC prices, JSONB books). The
objects are built before the clock starts: this measures the write path alone. The callback is
awaited per message and the loop is yielded to every 100 messages, as a feed reading a socket
would. Prints one JSON line: rows, seconds, rows_per_sec, version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import msgspec
import psycopg

from bench.workload import KINDS, Kind, Workload

TRADES_DDL = (
    "CREATE TABLE {schema}.trades (id serial PRIMARY KEY, timestamp TIMESTAMP,"
    " receipt_timestamp TIMESTAMP, exchange VARCHAR(32), symbol VARCHAR(32), side VARCHAR(8),"
    " amount NUMERIC(64, 32), price NUMERIC(64, 32), trade_id VARCHAR(64),"
    " order_type VARCHAR(32))"
)
BOOK_DDL = (
    "CREATE TABLE {schema}.book (id serial PRIMARY KEY, timestamp TIMESTAMP,"
    " receipt_timestamp TIMESTAMP, exchange VARCHAR(32), symbol VARCHAR(32), data JSONB)"
)
YIELD_EVERY = 100


def cryptofeed_objects(kind: Kind, messages: int) -> list[Any]:
    """Return the workload as the cryptofeed objects its exchange feeds would have built."""
    from cryptofeed.types import OrderBook, Trade

    objects: list[Any] = []
    for data in Workload(kind, messages).frames():
        message = msgspec.json.decode(data)
        timestamp = _unix_seconds(message["timestamp"])
        if message["type"] == "trade":
            objects.append(
                Trade(
                    message["exchange"].upper(),
                    message["symbol"],
                    message["side"],
                    Decimal(str(message["amount"])),
                    Decimal(str(message["price"])),
                    timestamp,
                    id=message["id"],
                )
            )
        else:
            book = OrderBook(
                message["exchange"].upper(),
                message["symbol"],
                bids={Decimal(str(b["price"])): Decimal(str(b["amount"])) for b in message["bids"]},
                asks={Decimal(str(a["price"])): Decimal(str(a["amount"])) for a in message["asks"]},
                max_depth=15,
            )
            book.timestamp = timestamp
            objects.append(book)
    return objects


def _unix_seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


async def write_all(objects: list[Any], dsn: str, schema: str) -> float:
    """Feed every object to the backend and wait until all are written; return the seconds."""
    from cryptofeed.backends.postgres import BookPostgres, TradePostgres

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    connect = {
        "host": info.get("host", "127.0.0.1"),
        "user": info.get("user"),
        "pw": info.get("password"),
        "db": info.get("dbname"),
        "port": int(info.get("port", 5432)),
    }
    trades = TradePostgres(table=f"{schema}.trades", **connect)
    books = BookPostgres(table=f"{schema}.book", snapshots_only=True, **connect)
    loop = asyncio.get_running_loop()
    for backend in (trades, books):
        backend.start(loop)
    started = time.perf_counter()
    for n, obj in enumerate(objects, 1):
        backend = books if obj.__class__.__name__ == "OrderBook" else trades
        await backend(obj, time.time())
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    # cryptofeed 2.4's stop() ends its writer after the batch in hand, dropping what is still
    # queued: wait until the queues are empty first, so every row is written and timed.
    for backend in (trades, books):
        while backend.queue.qsize():  # noqa: ASYNC110 - cryptofeed's queue has no event
            await asyncio.sleep(0.001)
        await backend.stop()
        await backend.worker
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("messages", type=int)
    parser.add_argument("dsn")
    parser.add_argument("--schema", default="spot_bench")
    args = parser.parse_args()
    from importlib.metadata import version

    objects = cryptofeed_objects(args.kind, args.messages)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(TRADES_DDL.format(schema=args.schema))
        conn.execute(BOOK_DDL.format(schema=args.schema))
    seconds = asyncio.run(write_all(objects, args.dsn, args.schema))
    with psycopg.connect(args.dsn) as conn:
        rows = 0
        for table in ("trades", "book"):
            row = conn.execute(f"SELECT count(*) FROM {args.schema}.{table}").fetchone()
            rows += int(row[0]) if row else 0
    result = {"rows": rows, "seconds": seconds, "rows_per_sec": rows / seconds}
    print(json.dumps({**result, "version": version("cryptofeed")}))


if __name__ == "__main__":
    main()
