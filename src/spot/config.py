"""Settings: one frozen tree, decoded from TOML, validated at start, unknown keys rejected.

`load_settings(path, env)` is the only entry point. Environment variables override the file:
SPOT_DATABASE_URL (database.url) and SPOT_TARDIS_URL (tardis.url).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from spot.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
IntervalText = Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(ms|s|m)$")]

_INTERVAL_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000}


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ExchangeConfig(_Section, frozen=True):
    """One exchange and its exchange-native symbols, e.g. binance: BTCUSDT."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    symbols: Annotated[list[str], msgspec.Meta(min_length=1)]


class TardisConfig(_Section, frozen=True):
    """Where the Tardis Machine WebSocket is and what to ask it for."""

    url: str = "ws://127.0.0.1:8001"
    mode: Literal["stream", "replay"] = "stream"
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    with_disconnect_messages: bool = True
    reconnect_initial_secs: PositiveFloat = 0.5
    reconnect_max_secs: PositiveFloat = 30.0
    # Replay mode: give up after this many reconnects in a row without a message.
    max_reconnect_attempts: PositiveInt = 20
    # Replay over the WebSocket, or over HTTP GET /replay-normalized (url = "http://host:8000").
    transport: Literal["websocket", "http"] = "websocket"

    def __post_init__(self) -> None:
        if self.transport == "http":
            _check_http_transport(self.url, self.mode)
        elif not re.match(r"^wss?://", self.url):
            raise ValueError(f"url must start with ws:// or wss://, got {self.url!r}")
        if self.mode == "replay" and (self.from_ is None or self.to is None):
            raise ValueError("replay mode needs both `from` and `to`")


def _check_http_transport(url: str, mode: str) -> None:
    if not re.match(r"^https?://", url):
        raise ValueError(
            f'transport "http" reads Tardis Machine\'s HTTP port: url must start with http:// '
            f'or https:// (e.g. "http://127.0.0.1:8000"), got {url!r}'
        )
    if mode != "replay":
        raise ValueError('transport "http" serves replays only: set mode = "replay"')


class BookConfig(_Section, frozen=True):
    """Order book snapshot depth and interval (the data type book_snapshot_{levels}_{interval})."""

    orderbook_levels: Annotated[int, msgspec.Meta(ge=1, le=100)] = 15
    snapshot_interval: IntervalText = "100ms"

    @property
    def data_type(self) -> str:
        return f"book_snapshot_{self.orderbook_levels}_{self.snapshot_interval}"

    @property
    def interval_ms(self) -> int:
        number, unit = re.fullmatch(r"([0-9]+)(ms|s|m)", self.snapshot_interval).groups()  # type: ignore[union-attr]
        return int(number) * _INTERVAL_UNIT_MS[unit]


class QueueConfig(_Section, frozen=True):
    """Bounded per-ticker queues and how they are cut into batches."""

    # Memory is about tables x (capacity + 2 x batch_size) rows (a queue, a batch filling, one in
    # COPY), ~2 kB per 15-level book row: 2,000 / 2,000 keeps 20 tables under ~200 MB RSS, and
    # batches of 2,000 wrote books as fast as 5,000 (bench, mixed 300k: 237 -> 193 MB).
    capacity: PositiveInt = 2_000
    batch_size: PositiveInt = 2_000
    # A quiet table's rows wait up to this long for company: it bounds receive -> commit latency
    # (p99 at 10k msgs/s: 519 ms with 0.5 s, 110 ms with 0.1 s). Shorter means smaller batches,
    # which cost throughput at full speed (books: 59k rows/s at 0.25-0.5 s, 44k at 0.2, 31-42k
    # at 0.1): 0.2 s keeps p99 under 250 ms.
    flush_interval_secs: PositiveFloat = 0.2
    # Stream mode: how long the reader may wait on a full queue before the rows overflow.
    stream_put_timeout_secs: PositiveFloat = 2.0


class DatabaseConfig(_Section, frozen=True):
    """PostgreSQL. An empty url starts the embedded server in `embedded_data_dir`."""

    url: str = ""
    pool_size: PositiveInt = 4
    embedded_data_dir: str = ""
    connect_timeout_secs: PositiveFloat = 10.0


class FallbackConfig(_Section, frozen=True):
    """Where batches go when PostgreSQL cannot take them in time, and how they come back."""

    enabled: bool = True
    # file:///dir (empty: the user data dir) or gs://bucket/prefix (needs the `gcs` extra).
    url: str = ""
    compression: Literal["zstd", "gzip"] = "zstd"
    # gcsfs options (project, token, endpoint_url); empty: Google's usual credential chain.
    storage_options: dict[str, str] = msgspec.field(default_factory=dict)
    # A batch retried this long without success is spilled instead.
    spill_after_secs: PositiveFloat = 30.0
    # Stream-mode overflow is gathered per table and spilled by size or age.
    buffer_rows: PositiveInt = 10_000
    buffer_secs: PositiveFloat = 5.0
    # The running service re-ingests spills this often once PostgreSQL answers.
    recover_interval_secs: PositiveFloat = 10.0

    def __post_init__(self) -> None:
        if self.url and not re.match(r"^(file|gs)://", self.url):
            raise ValueError(f"url must start with file:// or gs://, got {self.url!r}")


class HealthConfig(_Section, frozen=True):
    """Stream health, Prometheus metrics and the HTTP endpoint (/metrics, /health, status page)."""

    # Off: no per-message observation and no endpoint (what bench/metrics_overhead.py compares).
    enabled: bool = True
    http: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9108  # 0: any free port
    # An exchange with no message for this long is `stale` (its /health turns 503).
    stale_after_secs: PositiveFloat = 30.0
    # A lag past this bound (either sign) is logged as drift: usually clock skew between hosts.
    max_drift_secs: PositiveFloat = 5.0
    # Rates and lag percentiles in /health cover this much recent time.
    rate_window_secs: PositiveFloat = 10.0


class RefreshConfig(_Section, frozen=True):
    """Symbol refresh without restart (stream mode): on SIGHUP or when the config file changes."""

    watch_config: bool = True
    poll_secs: PositiveFloat = 2.0
    # The old subscription is stopped once the new one took over every symbol, or after this.
    handover_timeout_secs: PositiveFloat = 30.0


class Settings(_Section, frozen=True):
    """The whole configuration of one spot process."""

    tardis: TardisConfig = msgspec.field(default_factory=TardisConfig)
    exchanges: list[ExchangeConfig] = msgspec.field(default_factory=list)
    book: BookConfig = msgspec.field(default_factory=BookConfig)
    # Exchange-native symbol -> ticker, for symbols the quote-asset rule cannot split.
    ticker_overrides: dict[str, str] = msgspec.field(default_factory=dict)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    fallback: FallbackConfig = msgspec.field(default_factory=FallbackConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    refresh: RefreshConfig = msgspec.field(default_factory=RefreshConfig)
    # After the input ends, what PostgreSQL has not taken within this time is spilled.
    shutdown_timeout_secs: PositiveFloat = 30.0

    def __post_init__(self) -> None:
        names = [exchange.name for exchange in self.exchanges]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"exchange listed twice: {', '.join(duplicated)}")
        for symbol, ticker in self.ticker_overrides.items():
            if not re.fullmatch(r"[a-z0-9]+_[a-z0-9]+", ticker):
                raise ValueError(
                    f"ticker_overrides.{symbol} = {ticker!r} is not lowercase base_quote"
                )


ENV_OVERRIDES = {
    "SPOT_DATABASE_URL": ("database", "url"),
    "SPOT_TARDIS_URL": ("tardis", "url"),
}


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (TOML; None = defaults), apply environment overrides, validate."""
    raw: dict[str, object] = {}
    if path is not None:
        try:
            raw = msgspec.toml.decode(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = (env or {}).get(variable)
        if value:
            table = raw.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value
    return settings_from_dict(raw, source=str(path) if path else "defaults")


def settings_from_dict(raw: Mapping[str, object], source: str = "settings") -> Settings:
    """Validate a decoded configuration tree; errors name the key as `$.section.key`."""
    try:
        return msgspec.convert(raw, type=Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
