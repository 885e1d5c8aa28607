"""Which PostgreSQL the benchmark uses, and a clean schema for every measured run."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from spot.embedded_database import EmbeddedPostgres

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = "spot_bench"


def reachable(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def server_dsn(dsn: str | None) -> Iterator[tuple[str, str]]:
    """Yield (dsn, where): --dsn, else the local server, else a throw-away embedded one."""
    if dsn:
        yield dsn, "--dsn"
    elif reachable(LOCAL_DSN):
        yield LOCAL_DSN, "local server 127.0.0.1:5432/test"
    else:
        with tempfile.TemporaryDirectory(prefix="spot-bench-pg-") as directory:
            embedded = EmbeddedPostgres(Path(directory) / "pg", delete_on_exit=True)
            try:
                yield embedded.start(), "embedded PostgreSQL"
            finally:
                embedded.stop()


def in_schema(dsn: str, schema: str = SCHEMA) -> str:
    """Return `dsn` with the search_path set to `schema` (spot creates its tables there)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["options"] = f"{info.get('options') or ''} -c search_path={schema}".strip()
    return psycopg.conninfo.make_conninfo("", **info)


def reset_schema(dsn: str, schema: str = SCHEMA) -> None:
    """Drop and re-create the benchmark's schema, then checkpoint so runs start alike."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        with contextlib.suppress(psycopg.Error):  # needs superuser or pg_checkpoint
            conn.execute("CHECKPOINT")


def drop_schema(dsn: str, schema: str = SCHEMA) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def server_facts(dsn: str) -> dict[str, str]:
    """Return the server version and the settings that move COPY throughput."""
    names = ("server_version", "shared_buffers", "synchronous_commit", "wal_level", "max_wal_size")
    facts: dict[str, str] = {}
    with psycopg.connect(dsn) as conn:
        for name in names:
            row = conn.execute(f"SHOW {name}").fetchone()
            facts[name] = str(row[0]) if row else "?"
    return facts


def count_rows(dsn: str, schema: str = SCHEMA) -> int:
    """Return the number of rows in every table of `schema`."""
    total = 0
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
        for (table,) in tables:
            row = conn.execute(f'SELECT count(*) FROM {schema}."{table}"').fetchone()
            total += int(row[0]) if row else 0
    return total
