"""Symbol refresh without restart: a new subscription for the new symbols, then a clean handover.

On SIGHUP, or when the config file changes (mtime and size polled: no extra dependency), the file
is read again. An invalid file is rejected with one log line and the running set goes on. A valid
one with other exchanges or symbols makes main_loop open a NEW Tardis Machine subscription while
the old one keeps running, hand every kept symbol over at a cut in exchange time (`Handover`),
then stop the old one; what it queued is still written. Stream mode only: a replay has a fixed
period and keeps its symbols.

Why a cut rather than overlap plus primary keys alone: derived trade ids are positions within a
run of identical id-less trades, so a subscription joining mid-run numbers them differently; and
on a real Tardis Machine two subscriptions' book snapshots differ in localTimestamp, which is part
of their key. So, per (exchange, symbol, kind), the new subscription's first run (its first
exchange timestamp) is left to the old one, and from the next timestamp on (the cut) the new one
writes everything while the old one writes only what lies before the cut. Where both still write
a row (a cut behind the old subscription's position, as when a capture is served from its start)
the rows are identical and the tables' primary keys keep one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec

from spot.config import Settings
from spot.errors import ConfigError
from spot.tables import Kind, Row

log = logging.getLogger(__name__)

SymbolKey = tuple[str, str]  # (exchange, SYMBOL)
StreamKey = tuple[str, str, Kind]
# Settings a new subscription takes up; any other change waits for a restart.
LIVE_FIELDS: Final = frozenset({"exchanges", "ticker_overrides", "tardis"})
_TIMESTAMP_US: Final[dict[Kind, int]] = {"trade": 8, "orderbook": 4}  # tables.py column order


def symbol_set(settings: Settings) -> frozenset[SymbolKey]:
    """Return the configured (exchange, symbol) pairs, symbols upper-cased as Tardis sends them."""
    return frozenset(
        (exchange.name, symbol.upper())
        for exchange in settings.exchanges
        for symbol in exchange.symbols
    )


class RefreshPlan(msgspec.Struct, frozen=True):
    """What a refresh changes: the settings to run next and the symbols added, removed, kept."""

    settings: Settings
    added: frozenset[SymbolKey]
    removed: frozenset[SymbolKey]
    kept: frozenset[SymbolKey]
    needs_restart: tuple[str, ...]  # changed settings this refresh does not apply


def plan_refresh(running: Settings, loaded: Settings) -> RefreshPlan | None:
    """Return the refresh from `running` to `loaded`, None when nothing live changed.

    Raises ConfigError for a change that cannot happen live (the mode).
    """
    if loaded.tardis.mode != running.tardis.mode:
        raise ConfigError(
            f"tardis.mode changed from {running.tardis.mode} to {loaded.tardis.mode}: "
            "that needs a restart"
        )
    needs_restart = tuple(
        name
        for name in msgspec.structs.asdict(running)
        if name not in LIVE_FIELDS and getattr(running, name) != getattr(loaded, name)
    )
    if all(getattr(running, name) == getattr(loaded, name) for name in LIVE_FIELDS):
        return None
    old, new = symbol_set(running), symbol_set(loaded)
    settings = msgspec.structs.replace(
        running,
        exchanges=loaded.exchanges,
        ticker_overrides=loaded.ticker_overrides,
        tardis=loaded.tardis,
    )
    return RefreshPlan(settings, new - old, old - new, old & new, needs_restart)


class Handover:
    """Decide, row by row, which of two overlapping subscriptions writes a kept stream."""

    def __init__(self, kept: frozenset[SymbolKey]) -> None:
        self._kept = kept
        self._cut: dict[StreamKey, int] = {}
        self._old_active: set[StreamKey] = set()
        self._passed: set[StreamKey] = set()
        self._new_live = False
        self.closing = False
        self.complete = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<Handover kept={len(self._kept)} cuts={len(self._cut)} "
            f"handed_over={len(self._passed)} pending={len(self.pending())}>"
        )

    @property
    def new_live(self) -> bool:
        """Return whether the new subscription delivered anything yet."""
        return self._new_live

    def pending(self) -> list[StreamKey]:
        """Return the streams the old subscription still delivers and has not handed over."""
        return sorted(self._old_active - self._passed)

    def accept_old(self, kind: Kind, row: Row) -> bool:
        """Return whether the old subscription writes `row`: all but a kept stream past its cut."""
        symbol: SymbolKey = (row[0], row[1].upper())
        if symbol not in self._kept:
            return True  # a removed symbol: written until the old subscription stops
        key: StreamKey = (*symbol, kind)
        self._old_active.add(key)
        cut = self._cut.get(key)
        if cut is None or row[_TIMESTAMP_US[kind]] < cut:
            return True
        if key not in self._passed:
            self._passed.add(key)
            self._check_complete()
        return False

    def accept_new(self, kind: Kind, row: Row) -> bool:
        """Return whether the new subscription writes `row`: new symbols, kept ones past the cut."""
        if not self._new_live:
            self._new_live = True
            self._check_complete()
        symbol: SymbolKey = (row[0], row[1].upper())
        if symbol not in self._kept or self.closing:
            return True
        key: StreamKey = (*symbol, kind)
        timestamp_us: int = row[_TIMESTAMP_US[kind]]
        cut = self._cut.get(key)
        if cut is None:
            # This run may have begun before we joined: it stays with the old subscription.
            self._cut[key] = timestamp_us + 1
            return False
        return timestamp_us >= cut

    def _check_complete(self) -> None:
        if self._new_live and self._old_active <= self._passed:
            self.complete.set()

    async def wait(self, timeout_secs: float) -> bool:
        """Wait until every stream was handed over; return False after `timeout_secs`."""
        try:
            await asyncio.wait_for(self.complete.wait(), timeout_secs)
        except TimeoutError:
            return False
        return True


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class ConfigWatcher:
    """Read the config file again on SIGHUP or when it changes; hand valid settings to `apply`.

    `apply` returns True when it applied a change and raises ConfigError to reject one.
    `poll_secs` None: no polling, requests (SIGHUP) only (wait_for then waits without end).
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[], Settings],
        apply: Callable[[Settings], Awaitable[bool]],
        *,
        poll_secs: float | None,
    ) -> None:
        self.path = path
        self._load = load
        self._apply = apply
        self.poll_secs = poll_secs
        self._signature = _signature(path)
        self._requested = asyncio.Event()
        self.reloads: Counter[str] = Counter()  # applied / rejected / unchanged

    def __repr__(self) -> str:
        return f"<ConfigWatcher {self.path} reloads={dict(self.reloads)}>"

    def request(self, why: str = "request") -> None:
        """Reload at the next chance (the SIGHUP handler calls this)."""
        log.info("[↻] %s: reloading %s", why, self.path)
        self._requested.set()

    async def run(self) -> None:
        """Poll the file and wait for requests until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), self.poll_secs)
            requested = self._requested.is_set()
            self._requested.clear()
            signature = _signature(self.path)
            if requested or signature != self._signature:
                self._signature = signature
                await self.reload("SIGHUP" if requested else "config file changed")

    async def reload(self, why: str) -> None:
        """Load the file and apply it; log and count a rejection, keeping what runs."""
        try:
            applied = await self._apply(self._load())
        except ConfigError as exc:
            self.reloads["rejected"] += 1
            log.error(
                "[✗] Config reload (%s) rejected, still running the previous symbols: %s", why, exc
            )
            return
        except Exception:  # a failed refresh must not take the running pipeline down with it
            self.reloads["rejected"] += 1
            log.exception("[✗] Config reload (%s) failed, still running the previous symbols", why)
            return
        self.reloads["applied" if applied else "unchanged"] += 1

    @contextlib.contextmanager
    def on_sighup(self) -> Iterator[None]:
        """Reload on SIGHUP while in this block."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.request, "SIGHUP")
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
