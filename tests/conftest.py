"""Shared fixtures: a real PostgreSQL (local server, else embedded) and fixture files."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from spot.embedded_database import EmbeddedPostgres
from tests.database import fresh_database

FIXTURES = Path(__file__).parent / "fixtures"
LOCAL_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _local_server_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            pass
        with psycopg.connect(LOCAL_SERVER_URL, connect_timeout=2):
            return True
    except (OSError, psycopg.Error):
        return False


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server: SPOT_TEST_DATABASE_URL, the local one, or an embedded one."""
    explicit = os.environ.get("SPOT_TEST_DATABASE_URL")
    if explicit:
        yield explicit
    elif os.environ.get("SPOT_TEST_EMBEDDED") != "1" and _local_server_reachable():
        yield LOCAL_SERVER_URL
    else:
        with tempfile.TemporaryDirectory(prefix="spot-test-pg-") as directory:
            embedded = EmbeddedPostgres(Path(directory) / "pg", delete_on_exit=True)
            yield embedded.start()
            embedded.stop()


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards)."""
    with fresh_database(pg_server_url) as url:
        yield url


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """An autocommit connection to the test's database, for assertions."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        yield conn


def fixture_path(*parts: str) -> Path:
    """Return the path of a file under tests/fixtures."""
    return FIXTURES.joinpath(*parts)
