"""Every error spot raises on purpose.

    SpotError
    ├── ConfigError            bad or unknown configuration key (names the key)
    ├── SchemaMismatch         an existing table disagrees with the configuration (names the table)
    ├── DatabaseUnavailable    PostgreSQL cannot be reached or dropped the connection (retryable)
    ├── RowsRejected           PostgreSQL refused the rows themselves (a data error, not retryable)
    ├── SpillError             fallback storage cannot be written, read or listed (retryable)
    ├── SourceError            the Tardis Machine source failed
    │   └── ServerClosedWithError   close 1011 (or 1008) with the server's reason
    └── BadInputFile           a replay file that cannot be read (names the file and line)

Foreign errors (psycopg, aiohttp, OSError) are translated at the module that talks to them.
"""

from __future__ import annotations


class SpotError(Exception):
    """Base class of spot's errors."""

    retryable: bool = False


class ConfigError(SpotError):
    """The configuration is invalid; the message names the key."""


class SchemaMismatch(SpotError):
    """An existing table does not match the configured layout."""


class DatabaseUnavailable(SpotError):
    """PostgreSQL is down or the connection broke; the batch may be retried."""

    retryable = True


class SourceError(SpotError):
    """The market data source failed."""

    retryable = True


class ServerClosedWithError(SourceError):
    """Tardis Machine closed the WebSocket with an error code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"server closed the WebSocket with code {code}: {reason or '(no reason)'}")
        self.code = code
        self.reason = reason


class BadInputFile(SpotError):
    """A replay file is corrupt or of an unknown format."""


class RowsRejected(SpotError):
    """PostgreSQL refused a batch for what is in it (bad value, NUL byte); retrying cannot help."""


class SpillError(SpotError):
    """Fallback storage failed (disk, bucket, or a corrupt spill); the message names the spill."""

    retryable = True
