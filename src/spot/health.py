"""The HTTP endpoint: /metrics (Prometheus text), /health (JSON, 200 or 503), / (status page).

Listens on 127.0.0.1:9108 by default (`[health]` in the config). Every request takes one fresh
snapshot from the pipeline, so nothing is cached and nothing runs between requests. `spot check`
reads /health the way a container health check would.
"""

from __future__ import annotations

import html
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spot.config import HealthConfig
from spot.metrics import metrics_registry
from spot.stream_health import (
    LAG_BUCKETS_SECS,
    ExchangeStatus,
    HealthSnapshot,
    HistogramView,
    TableStatus,
)

log = logging.getLogger(__name__)

PAGE_REFRESH_SECS = 2
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def percentiles(view: HistogramView) -> dict[str, float | None]:
    """Return p50, p90 and p99 of a histogram view, in seconds (None without observations)."""
    return {name: view.quantile(q) for name, q in QUANTILES}


def health_document(snapshot: HealthSnapshot) -> dict[str, object]:
    """Return the /health JSON: overall status, then each exchange and table."""
    pipeline = snapshot.pipeline
    return {
        "status": snapshot.status,
        "mode": snapshot.mode,
        "uptime_secs": round(snapshot.uptime_secs, 3),
        "stale_after_secs": snapshot.stale_after_secs,
        "exchanges": {e.exchange: _exchange_document(e) for e in snapshot.exchanges},
        "tables": {t.table: _table_document(t) for t in pipeline.tables},
        "frames": pipeline.frames,
        "parse_errors": pipeline.parse_errors,
        "skipped_types": pipeline.skipped_types,
        "rows_overflowed": pipeline.rows_overflowed,
        "config_reloads": pipeline.config_reloads,
    }


def _exchange_document(exchange: ExchangeStatus) -> dict[str, object]:
    return {
        "status": exchange.status,
        "last_message_age_secs": round(exchange.last_message_age_secs, 3),
        "rates": {kind: round(rate, 2) for kind, rate in exchange.rates.items()},
        "messages": exchange.messages,
        "reconnects": exchange.reconnects,
        "gaps": exchange.gaps,
        "gap_secs": round(exchange.gap_secs, 3),
        "drift_events": exchange.drift_events,
        # Over the rate window: what the lag is now, not since start.
        "lag_secs": {
            "exchange_to_tardis": percentiles(exchange.recent_exchange_lag),
            "tardis_to_spot": percentiles(exchange.recent_source_lag),
        },
        "symbols": {
            symbol: {"last_message_age_secs": round(age, 3)}
            for symbol, age in exchange.symbols.items()
        },
    }


def _table_document(table: TableStatus) -> dict[str, object]:
    return {
        "queue_depth": table.queue_depth,
        "batches": table.batches,
        "rows_inserted": table.rows_inserted,
        "rows_duplicate": table.rows_duplicate,
        "retries": table.retries,
        "rows_spilled": table.rows_spilled,
        "commit_lag_secs": percentiles(table.commit_lag),  # since start
    }


class HealthServer:
    """The aiohttp app serving /metrics, /health and /; `async with` starts and stops it."""

    def __init__(self, config: HealthConfig, snapshot: Callable[[], HealthSnapshot]) -> None:
        self.config = config
        self._snapshot = snapshot
        self._registry = metrics_registry(snapshot)
        self._runner: web.AppRunner | None = None
        self.port = config.port
        self.requests = 0

    def __repr__(self) -> str:
        state = self.url if self._runner else "stopped"
        return f"<HealthServer {state} requests={self.requests}>"

    @property
    def url(self) -> str:
        """Return the base URL, e.g. http://127.0.0.1:9108."""
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        """Listen on the configured host and port (port 0: any free one, see `port`)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/", self._page)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError:
            await self.aclose()
            raise
        self.port = int(self._runner.addresses[-1][1])
        log.info("[+] Health endpoint on %s (/metrics, /health, /)", self.url)

    async def aclose(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _health(self, _request: web.Request) -> web.Response:
        self.requests += 1
        snapshot = self._snapshot()
        # 503 lets a load balancer or container runtime act on the status without parsing JSON.
        status = 200 if snapshot.status == "ok" else 503
        return web.json_response(health_document(snapshot), status=status)

    async def _page(self, _request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text=status_page(self._snapshot()), content_type="text/html")


def check_health(url: str, timeout_secs: float = 5.0) -> tuple[bool, str]:
    """Ask a running spot's /health; return (ok, one line saying why), arq --check style."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_secs) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"no answer from {url}: {reason}"
    try:
        document = json.loads(body)
        status = str(document["status"])
        exchanges: dict[str, dict[str, object]] = document["exchanges"]
    except (ValueError, KeyError, TypeError):
        return False, f"{url} did not answer with spot's /health JSON"
    parts = [
        f"{name} {info['status']} (last message {info['last_message_age_secs']} s ago)"
        for name, info in exchanges.items()
    ]
    return status == "ok", f"{status}: " + (", ".join(parts) or "no exchanges")


# The status page: plain HTML and a meta refresh, no script, so it works in any browser.

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.ok { color: #fff; background: #2e7d32; } .stale { color: #000; background: #f9a825; }
.down { color: #fff; background: #c62828; }
.badge { padding: .1em .5em; border-radius: .3em; font-weight: bold; }
small { color: #666; }
"""


def _badge(status: str) -> str:
    return f'<span class="badge {html.escape(status)}">{html.escape(status)}</span>'


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= LAG_BUCKETS_SECS[-1]:  # the +Inf bucket: only a lower bound is known
        return f"≥ {LAG_BUCKETS_SECS[-1]:g} s"
    return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"


def _exchange_section(exchange: ExchangeStatus) -> str:
    name = html.escape(exchange.exchange)
    lags = {
        "exchange → Tardis Machine (trades)": percentiles(exchange.recent_exchange_lag),
        "Tardis Machine → spot": percentiles(exchange.recent_source_lag),
    }
    rows = [
        ("status", _badge(exchange.status)),
        ("last message", f"{exchange.last_message_age_secs:.1f} s ago"),
        *(
            (f"{kind} /s", f"{exchange.rates[kind]:.1f} (total {exchange.messages[kind]})")
            for kind in ("trade", "book_snapshot", "disconnect")
        ),
        ("reconnects", str(exchange.reconnects)),
        ("gaps", f"{exchange.gaps} ({exchange.gap_secs:.1f} s)"),
        ("drift events", str(sum(exchange.drift_events.values()))),
        *(
            (f"lag {hop}", " / ".join(_secs(value) for value in values.values()))
            for hop, values in lags.items()
        ),
    ]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rows)
    symbols = "".join(
        f"<tr><td>{html.escape(symbol)}</td><td>{age:.1f} s ago</td></tr>"
        for symbol, age in exchange.symbols.items()
    )
    return (
        f"<h2>{name} {_badge(exchange.status)}</h2>"
        f"<table><tr><th>{name}</th><th>value <small>(lag: p50 / p90 / p99)</small></th></tr>"
        f"{body}</table>"
        f"<table><tr><th>symbol</th><th>last message</th></tr>{symbols}</table>"
    )


def _tables_section(tables: tuple[TableStatus, ...]) -> str:
    header = "".join(
        f"<th>{title}</th>"
        for title in (
            "table",
            "queue",
            "rows inserted",
            "duplicates",
            "batches",
            "retries",
            "spilled",
            "commit lag p50",
            "p99",
        )
    )
    rows = "".join(
        f"<tr><td>{html.escape(t.table)}</td><td>{t.queue_depth}</td><td>{t.rows_inserted}</td>"
        f"<td>{t.rows_duplicate}</td><td>{t.batches}</td><td>{t.retries}</td>"
        f"<td>{t.rows_spilled}</td><td>{_secs(t.commit_lag.quantile(0.5))}</td>"
        f"<td>{_secs(t.commit_lag.quantile(0.99))}</td></tr>"
        for t in tables
    )
    return f"<h2>Tables</h2><table><tr>{header}</tr>{rows}</table>"


def status_page(snapshot: HealthSnapshot) -> str:
    """Return the human status page: overall status, a table per exchange, then the tables."""
    pipeline = snapshot.pipeline
    errors = sum(pipeline.parse_errors.values())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{PAGE_REFRESH_SECS}'>"
        f"<title>spot: {snapshot.status}</title><style>{_STYLE}</style></head><body>"
        f"<h1>spot {_badge(snapshot.status)}</h1>"
        f"<p>{html.escape(snapshot.mode)} mode, up {snapshot.uptime_secs:.0f} s, "
        f"{pipeline.frames} frames, {errors} parse errors, "
        f"stale after {snapshot.stale_after_secs:g} s. "
        f"<small>Refreshes every {PAGE_REFRESH_SECS} s; "
        "<a href='/health'>/health</a>, <a href='/metrics'>/metrics</a></small></p>"
        + "".join(_exchange_section(exchange) for exchange in snapshot.exchanges)
        + _tables_section(pipeline.tables)
        + "</body></html>"
    )
