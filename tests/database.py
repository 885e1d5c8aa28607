"""Row accounting in the test databases: counts, duplicate keys, throw-away databases."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from spot.tables import BOOK_KEY, TRADE_KEY

Connection = psycopg.AsyncConnection[tuple[object, ...]]


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """Create an empty database on `server_url`, yield its URL, drop it afterwards."""
    name = f"spot_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo("", **info)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def row_count(pg: Connection, table: str) -> int:
    """Return the number of rows in `table`."""
    row = await (await pg.execute(f'SELECT count(*) FROM "{table}"')).fetchone()
    assert row is not None
    return int(str(row[0]))


async def spot_tables(pg: Connection) -> list[str]:
    """Return every trade_/orderbook_ table, sorted."""
    cursor = await pg.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " AND (table_name LIKE 'trade\\_%' OR table_name LIKE 'orderbook\\_%')"
        " ORDER BY table_name"
    )
    return [str(table) for (table,) in await cursor.fetchall()]


async def table_counts(pg: Connection) -> dict[str, int]:
    """Return the row count of every trade_/orderbook_ table."""
    return {table: await row_count(pg, table) for table in await spot_tables(pg)}


async def duplicate_keys(pg: Connection) -> int:
    """Return how many natural keys occur more than once, over every spot table."""
    duplicates = 0
    for table in await spot_tables(pg):
        key = ", ".join(f'"{c}"' for c in (TRADE_KEY if table.startswith("trade_") else BOOK_KEY))
        cursor = await pg.execute(
            f'SELECT count(*) FROM (SELECT 1 FROM "{table}" GROUP BY {key} HAVING count(*) > 1) d'
        )
        row = await cursor.fetchone()
        assert row is not None
        duplicates += int(str(row[0]))
    return duplicates
