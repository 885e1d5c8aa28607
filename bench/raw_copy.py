"""The ceiling: psycopg binary COPY of pre-built spot rows, no pipeline in front of it.

Worker process: `python -m bench.raw_copy KIND ROWS DSN [--no-key]`. Rows are built before the
clock starts with spot's own normalizer from the same messages the server sends, grouped by table
and cut into batches of BATCH_SIZE; each batch is one COPY in one transaction, as spot writes them.
Prints one JSON line: rows, seconds, rows_per_sec.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import psycopg
from psycopg import sql

from bench.workload import KINDS, Kind, Workload
from spot.data_processor import DataProcessor
from spot.messages import Frame
from spot.tables import Row, column_types, layout_for, quote_ident, table_name
from spot.tickers import TickerNormalizer

# spot wrote batches of 5,000 until its default became 2,000; the ceiling keeps 5,000 (fewer
# commits: the stricter ceiling) so that ratios stay comparable with earlier runs.
BATCH_SIZE = 5_000


def build_batches(kind: Kind, messages: int) -> list[tuple[str, list[Row]]]:
    """Return (table, rows) batches in the round-robin order spot's writers would commit them."""
    processor = DataProcessor(15, TickerNormalizer())
    by_table: dict[str, list[Row]] = defaultdict(list)
    received_ns = time.time_ns()
    for data in Workload(kind, messages).frames():
        normalized = processor.process(Frame(data, received_ns))
        assert normalized is not None
        by_table[table_name(normalized.kind, normalized.ticker)].append(normalized.row)
    per_table = {
        table: [rows[i : i + BATCH_SIZE] for i in range(0, len(rows), BATCH_SIZE)]
        for table, rows in by_table.items()
    }
    batches = []
    for round_ in range(max(len(chunks) for chunks in per_table.values())):
        for table, chunks in per_table.items():
            if round_ < len(chunks):
                batches.append((table, chunks[round_]))
    return batches


def create_tables(conn: psycopg.Connection, tables: list[str], with_key: bool) -> None:
    for table in tables:
        layout = layout_for(table, 15)
        ddl = layout.create_sql()
        if not with_key:
            ddl = ddl[: ddl.rindex(", PRIMARY KEY")] + ")"
        conn.execute(ddl)


def copy_batches(conn: psycopg.Connection, batches: list[tuple[str, list[Row]]]) -> float:
    """COPY every batch, one transaction each; return the seconds it took."""
    statements = {}
    for table, _ in batches:
        if table not in statements:
            layout = layout_for(table, 15)
            columns = sql.SQL(", ").join(map(sql.Identifier, layout.column_names))
            statements[table] = (
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                    sql.SQL(quote_ident(table)), columns
                ),
                column_types(layout.columns),
            )
    started = time.perf_counter()
    for table, rows in batches:
        statement, types = statements[table]
        with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("messages", type=int)
    parser.add_argument("dsn")
    parser.add_argument("--no-key", action="store_true", help="tables without primary keys")
    args = parser.parse_args()
    batches = build_batches(args.kind, args.messages)
    rows = sum(len(chunk) for _, chunk in batches)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        create_tables(conn, sorted({table for table, _ in batches}), not args.no_key)
        seconds = copy_batches(conn, batches)
    print(json.dumps({"rows": rows, "seconds": seconds, "rows_per_sec": rows / seconds}))


if __name__ == "__main__":
    main()
