"""Fallback storage: batches PostgreSQL could not take, as compressed self-describing files.

A spill is one file holding one batch of one table: a msgpack document (header + rows), zstd- or
gzip-compressed. The header names the table, columns, column types, format version, row count and
why the rows are there, so a spill can be read without spot's code (`timestamptz` values are Unix
microseconds). Rows come back exactly: floats as IEEE doubles, strings, ints, None, and datetimes
to the microsecond, in UTC.

Layout under the fallback URL (file:///… by default, or gs://bucket/prefix):

    pending/<table>/<UTC time>-<token>.spill.zst   waiting for `spot recover` or the service
    rejected/<table>/…                             rows PostgreSQL refused; kept, never retried

A spill appears whole or not at all: locally it is written under a temporary name, fsynced and
renamed; on GCS one object upload is atomic. This module knows nothing of PostgreSQL: re-ingest
is wired in `recovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, Protocol
from urllib.parse import unquote, urlparse

import msgspec
import platformdirs

from spot.config import FallbackConfig
from spot.errors import ConfigError, SpillError
from spot.tables import Row

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

log = logging.getLogger(__name__)

FORMAT: Final = "spot-spill"
FORMAT_VERSION: Final = 1
Area = Literal["pending", "rejected"]
Columns = tuple[tuple[str, str], ...]  # (name, SQL definition), as tables.py describes them
Compression = Literal["zstd", "gzip"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC: Final = b"\x1f\x8b"
_SUFFIX: Final = {"zstd": ".spill.zst", "gzip": ".spill.gz"}
_TEMP_PREFIX: Final = ".tmp-"


class SpillHeader(msgspec.Struct, frozen=True):
    """What a spill holds: enough to read it without spot's table definitions."""

    format: str
    version: int
    table: str
    columns: list[str]
    types: list[str]  # PostgreSQL type names; timestamptz is stored as Unix microseconds
    row_count: int
    created_at_us: int
    reason: str = ""


class _Document(msgspec.Struct, frozen=True):
    header: SpillHeader
    rows: list[list[Any]]


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_Document)


@dataclass(frozen=True)
class SpillRef:
    """Where one spill is: its name relative to the fallback URL, e.g. pending/trade_x/….zst."""

    name: str

    @property
    def area(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def table(self) -> str:
        return self.name.split("/")[1]


@dataclass(frozen=True)
class Spill:
    """A spill read back: its header and its rows, as they were written."""

    ref: SpillRef
    header: SpillHeader
    rows: list[Row]


def _timestamp_positions(types: Sequence[str]) -> list[int]:
    return [i for i, kind in enumerate(types) if kind == "timestamptz"]


def _to_us(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def encode_spill(
    table: str,
    columns: Columns,
    rows: Sequence[Row],
    *,
    compression: Compression = "zstd",
    reason: str = "",
    created_at_us: int = 0,
) -> bytes:
    """Return the compressed spill document of `rows` (tuples in `columns` order)."""
    types = [definition.removesuffix(" NOT NULL") for _, definition in columns]
    positions = _timestamp_positions(types)
    encoded_rows: list[list[Any]] = []
    for row in rows:
        values = list(row)
        for i in positions:
            if values[i] is not None:
                values[i] = _to_us(values[i])
        encoded_rows.append(values)
    header = SpillHeader(
        FORMAT,
        FORMAT_VERSION,
        table,
        [name for name, _ in columns],
        types,
        len(rows),
        created_at_us,
        reason,
    )
    raw = _encoder.encode(_Document(header, encoded_rows))
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0)
    return zstd.compress(raw)


def decode_spill(data: bytes) -> tuple[SpillHeader, list[Row]]:
    """Return the header and rows of a spill written by `encode_spill` (either compression)."""
    try:
        if data.startswith(_ZSTD_MAGIC):
            raw = zstd.decompress(data)
        elif data.startswith(_GZIP_MAGIC):
            raw = gzip.decompress(data)
        else:
            raise SpillError("not a spill: unknown compression")
        document = _decoder.decode(raw)
    except (zstd.ZstdError, OSError, EOFError, msgspec.MsgspecError) as exc:
        raise SpillError(f"corrupt spill: {exc}") from exc
    header = document.header
    if header.format != FORMAT or header.version != FORMAT_VERSION:
        raise SpillError(f"unsupported spill format {header.format!r} v{header.version}")
    if header.row_count != len(document.rows):
        raise SpillError(f"spill says {header.row_count} rows but holds {len(document.rows)}")
    positions = _timestamp_positions(header.types)
    rows: list[Row] = []
    for values in document.rows:
        for i in positions:
            if values[i] is not None:
                values[i] = _EPOCH + timedelta(microseconds=values[i])
        rows.append(tuple(values))
    return header, rows


class SpillStore(Protocol):
    """Bytes under names like `pending/<table>/<file>`; `put` is atomic."""

    url: str

    async def put(self, name: str, data: bytes) -> None: ...

    async def get(self, name: str) -> bytes: ...

    async def delete(self, name: str) -> None: ...

    async def names(self, area: str) -> list[str]: ...


class LocalSpill:
    """Spills in a local directory: temp file, fsync, rename, fsync the directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def __repr__(self) -> str:
        return f"<LocalSpill {self.url}>"

    async def put(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(_write_atomically, self.root / name, data)

    async def get(self, name: str) -> bytes:
        return await asyncio.to_thread((self.root / name).read_bytes)

    async def delete(self, name: str) -> None:
        # Another process (`spot recover` beside a running service) may have removed it first.
        await asyncio.to_thread((self.root / name).unlink, missing_ok=True)

    async def names(self, area: str) -> list[str]:
        return await asyncio.to_thread(self._names, area)

    def _names(self, area: str) -> list[str]:
        base = self.root / area
        if not base.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in base.glob("*/*")
            if path.is_file() and not path.name.startswith(_TEMP_PREFIX)
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(_TEMP_PREFIX + path.name)
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # The rename itself must survive a power cut, not just the bytes.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RemoteSpill:
    """Spills in object storage through fsspec: gs://bucket/prefix with gcsfs (the `gcs` extra).

    Credentials follow Google's usual chain (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata
    server) unless `storage_options` says otherwise (token, project, endpoint_url).
    """

    def __init__(self, url: str, storage_options: Mapping[str, str] | None = None) -> None:
        try:
            import fsspec.core
        except ImportError:
            raise ConfigError(
                f"fallback url {url}: install the gcs extra (pip install 'spot-ingest[gcs]')"
            ) from None
        try:
            self._fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except ImportError as exc:
            raise ConfigError(f"fallback url {url}: {exc}") from None
        self._root = str(root).rstrip("/")
        self.url = url

    def __repr__(self) -> str:
        return f"<RemoteSpill {self.url}>"

    async def put(self, name: str, data: bytes) -> None:
        # One object upload: readers see the whole object or none of it.
        await asyncio.to_thread(self._put_checked, f"{self._root}/{name}", data)

    async def get(self, name: str) -> bytes:
        return await asyncio.to_thread(self._get_checked, f"{self._root}/{name}")

    # A spill is the last copy of its rows: an upload or download that comes back short (seen
    # with the GCS emulator under load) is tried again rather than trusted.
    def _put_checked(self, path: str, data: bytes) -> None:
        for _ in range(_REMOTE_ATTEMPTS):
            self._fs.pipe_file(path, data)
            if self._fs.info(path).get("size") == len(data):
                return
            self._fs.invalidate_cache(path)
        raise SpillError(f"{path}: the stored object is not the {len(data)} bytes uploaded")

    def _get_checked(self, path: str) -> bytes:
        for _ in range(_REMOTE_ATTEMPTS):
            self._fs.invalidate_cache(path)
            data: bytes = self._fs.cat_file(path)
            if len(data) == self._fs.info(path).get("size"):
                return data
        raise SpillError(f"{path}: could not read the whole object")

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._delete, f"{self._root}/{name}")

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(path)

    async def names(self, area: str) -> list[str]:
        return await asyncio.to_thread(self._names, area)

    def _names(self, area: str) -> list[str]:
        self._fs.invalidate_cache()  # listings are cached; another process may have written
        base = f"{self._root}/{area}"
        try:
            found = self._fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self._root.lstrip("/") + "/"
        return sorted(str(path).lstrip("/").removeprefix(prefix) for path in found)


_REMOTE_ATTEMPTS = 3


def default_spill_url() -> str:
    """Return the per-user spill directory as a file:// URL."""
    return (Path(platformdirs.user_data_dir("spot")) / "spill").as_uri()


def open_store(url: str, storage_options: Mapping[str, str] | None = None) -> SpillStore:
    """Return the store of a fallback URL: file:///dir, or gs://bucket/prefix (any fsspec URL)."""
    parsed = urlparse(url or default_spill_url())
    if parsed.scheme == "file":
        return LocalSpill(Path(unquote(parsed.path)))
    return RemoteSpill(url, storage_options)


class FallbackStorage:
    """Write batches as spills, list them, read them back, remove them once stored."""

    def __init__(self, store: SpillStore, compression: Compression = "zstd") -> None:
        self.store = store
        self.compression = compression
        self.files_written = 0
        self.rows_written = 0

    def __repr__(self) -> str:
        return (
            f"<FallbackStorage {self.store.url} files_written={self.files_written}"
            f" rows_written={self.rows_written}>"
        )

    @property
    def url(self) -> str:
        return self.store.url

    async def write(
        self,
        table: str,
        columns: Columns,
        rows: Sequence[Row],
        *,
        area: Area = "pending",
        reason: str = "",
    ) -> SpillRef:
        """Write `rows` of `table` as one spill; raise SpillError when the store fails."""
        now = datetime.now(UTC)
        data = encode_spill(
            table,
            columns,
            rows,
            compression=self.compression,
            reason=reason,
            created_at_us=_to_us(now),
        )
        stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
        ref = SpillRef(f"{area}/{table}/{stamp}-{secrets.token_hex(4)}{_SUFFIX[self.compression]}")
        try:
            await self.store.put(ref.name, data)
        except OSError as exc:
            raise SpillError(f"cannot write spill {ref.name} to {self.url}: {exc}") from exc
        self.files_written += 1
        self.rows_written += len(rows)
        return ref

    async def pending(self) -> list[SpillRef]:
        """Return the spills waiting to be stored, oldest first within each table."""
        return [SpillRef(name) for name in await self._names("pending")]

    async def rejected(self) -> list[SpillRef]:
        """Return the spills of rows PostgreSQL refused."""
        return [SpillRef(name) for name in await self._names("rejected")]

    async def _names(self, area: str) -> list[str]:
        try:
            return await self.store.names(area)
        except OSError as exc:
            raise SpillError(f"cannot list spills at {self.url}: {exc}") from exc

    async def read(self, ref: SpillRef) -> Spill:
        """Return one spill's header and rows."""
        try:
            data = await self.store.get(ref.name)
        except OSError as exc:
            raise SpillError(f"cannot read spill {ref.name}: {exc}") from exc
        header, rows = decode_spill(data)
        return Spill(ref, header, rows)

    async def remove(self, ref: SpillRef) -> None:
        """Delete a spill whose rows are stored."""
        try:
            await self.store.delete(ref.name)
        except OSError as exc:
            raise SpillError(f"cannot remove spill {ref.name}: {exc}") from exc


def open_fallback(config: FallbackConfig) -> FallbackStorage:
    """Return the fallback storage the configuration describes."""
    return FallbackStorage(open_store(config.url, config.storage_options), config.compression)


ColumnsOf = Callable[[str], Columns]


class SpillBuffer:
    """Gather rows per table and spill them by size, by age, and on close.

    Stream-mode overflow arrives a few rows at a time: one file per row would be slow and
    unreadable. Rows wait in memory at most `max_age_secs` (flush them with `run`) and up to
    `max_rows` per table. If the store fails, rows stay buffered up to `max_rows * 10` per table;
    beyond that they are counted in `rows_lost` and logged, so memory stays bounded.
    """

    def __init__(
        self,
        storage: FallbackStorage,
        columns_of: ColumnsOf,
        *,
        max_rows: int = 10_000,
        max_age_secs: float = 5.0,
        reason: str = "queue overflow",
    ) -> None:
        self.storage = storage
        self._columns_of = columns_of
        self.max_rows = max_rows
        self.max_age_secs = max_age_secs
        self.reason = reason
        self._rows: dict[str, list[Row]] = {}
        self._closed = asyncio.Event()
        self.rows_spilled = 0
        self.rows_lost = 0

    def __repr__(self) -> str:
        buffered = sum(len(rows) for rows in self._rows.values())
        return (
            f"<SpillBuffer buffered={buffered} spilled={self.rows_spilled} lost={self.rows_lost}>"
        )

    async def add(self, table: str, rows: Sequence[Row]) -> None:
        """Buffer `rows` of `table`; spill the table's buffer once it holds `max_rows`."""
        buffer = self._rows.setdefault(table, [])
        buffer.extend(rows)
        if len(buffer) >= self.max_rows:
            await self._flush_table(table)

    async def flush(self) -> None:
        """Spill every buffered row now."""
        for table in list(self._rows):
            await self._flush_table(table)

    async def run(self) -> None:
        """Flush every `max_age_secs` until `close`, then flush the rest."""
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.max_age_secs)
            await self.flush()
        await self.flush()  # close() may have come before run() started

    def close(self) -> None:
        """Make `run` flush what is left and return."""
        self._closed.set()

    async def _flush_table(self, table: str) -> None:
        rows = self._rows.pop(table, [])
        if not rows:
            return
        try:
            await self.storage.write(table, self._columns_of(table), rows, reason=self.reason)
        except SpillError as exc:
            self._keep(table, rows, exc)
            return
        self.rows_spilled += len(rows)
        log.warning("[⚠] Spilled %d overflowing rows of %s to %s", len(rows), table, self.url)

    @property
    def url(self) -> str:
        return self.storage.url

    def _keep(self, table: str, rows: list[Row], error: SpillError) -> None:
        buffer = self._rows.setdefault(table, [])
        buffer[:0] = rows  # the older rows first, as they came
        excess = len(buffer) - self.max_rows * 10
        if excess > 0:
            del buffer[:excess]
            self.rows_lost += excess
        log.error(
            "Cannot spill %d rows of %s (%s); keeping them in memory, %d lost so far",
            len(rows),
            table,
            error,
            self.rows_lost,
        )
