"""Table layout: the contract between normalizing (rows) and writing (COPY).

A row is a plain tuple in the column order below, ready for binary COPY. Table names are built
only from `[a-z0-9_]`, fit PostgreSQL's 63-byte identifiers, and are always quoted in SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from spot.errors import SchemaMismatch

Kind = Literal["orderbook", "trade"]
Row = tuple[Any, ...]

_TABLE_NAME = re.compile(r"^(orderbook|trade)_[a-z0-9]+(_[a-z0-9]+)*$")
MAX_IDENTIFIER_BYTES = 63

_KEY_COLUMNS = (
    ("exchange", "text NOT NULL"),
    ("symbol", "text NOT NULL"),
    ("timestamp", "timestamptz NOT NULL"),
    ("local_timestamp", "timestamptz NOT NULL"),
    ("timestamp_us", "bigint NOT NULL"),
    ("local_timestamp_us", "bigint NOT NULL"),
)
TRADE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("exchange", "text NOT NULL"),
    ("symbol", "text NOT NULL"),
    ("trade_id", "text NOT NULL"),
    ("side", "text NOT NULL"),
    ("price", "double precision NOT NULL"),
    ("amount", "double precision NOT NULL"),
    *_KEY_COLUMNS[2:],
    ("received_at", "timestamptz NOT NULL"),
)
# A trade is identified by its id within a symbol; ids are derived where the exchange gives none.
TRADE_KEY = ("exchange", "symbol", "timestamp_us", "trade_id")
# Snapshots with interval 0 can share an exchange timestamp; the receive time of Tardis Machine
# tells them apart, and both are deterministic in a replay.
BOOK_KEY = ("exchange", "symbol", "timestamp_us", "local_timestamp_us")


def book_columns(levels: int) -> tuple[tuple[str, str], ...]:
    """Return the `orderbook_<ticker>` columns for `levels` levels a side."""
    level_columns = tuple(
        (f"{side}_{field}_{i}", "double precision")
        for side in ("bid", "ask")
        for field in ("price", "amount")
        for i in range(1, levels + 1)
    )
    return (*_KEY_COLUMNS, *level_columns, ("received_at", "timestamptz NOT NULL"))


def column_types(columns: tuple[tuple[str, str], ...]) -> list[str]:
    """Return the PostgreSQL type names of `columns`, for binary COPY."""
    return [definition.removesuffix(" NOT NULL") for _, definition in columns]


def table_name(kind: Kind, ticker: str) -> str:
    """Return the validated, unquoted table name for `kind` and `ticker`."""
    return validated_table_name(f"{kind}_{ticker}")


def validated_table_name(name: str) -> str:
    """Return `name` if it is a safe spot table name, else raise ValueError."""
    if not _TABLE_NAME.match(name) or len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"unsafe table name {name!r}")
    return name


def quote_ident(name: str) -> str:
    """Quote an identifier that `table_name` (or a literal in this package) produced."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableLayout:
    """Columns, key and DDL of one table."""

    name: str
    kind: Kind
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def create_sql(self) -> str:
        body = ", ".join(f"{quote_ident(n)} {definition}" for n, definition in self.columns)
        key = ", ".join(quote_ident(n) for n in self.key)
        return f"CREATE TABLE IF NOT EXISTS {quote_ident(self.name)} ({body}, PRIMARY KEY ({key}))"


def layout_for(table: str, levels: int) -> TableLayout:
    """Return the layout of a table named by `table_name`."""
    validated_table_name(table)
    if table.startswith("orderbook_"):
        return TableLayout(table, "orderbook", book_columns(levels), BOOK_KEY)
    if table.startswith("trade_"):
        return TableLayout(table, "trade", TRADE_COLUMNS, TRADE_KEY)
    raise ValueError(f"not a spot table: {table!r}")


def check_book_levels(table: str, existing_columns: list[str], levels: int) -> None:
    """Raise SchemaMismatch when an existing orderbook table has another number of levels."""
    found = sum(1 for column in existing_columns if column.startswith("bid_price_"))
    if found != levels:
        raise SchemaMismatch(
            f"table {table} has {found} book levels a side, but orderbook_levels is {levels}: "
            f"use another database or schema, or set orderbook_levels = {found}"
        )
