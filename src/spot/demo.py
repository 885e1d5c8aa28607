"""`spot demo`: the whole pipeline on a shipped capture, with nothing to set up.

Starts the embedded PostgreSQL and `spot serve` on loopback, replays the capture in
`spot/data/demo_capture.ndjson.gz` through `spot run`, and returns per-table counts and samples.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from spot.config import Settings, settings_from_dict
from spot.db_writer import PostgreSQLDatabase
from spot.embedded_database import EmbeddedPostgres, default_data_dir
from spot.main_loop import RunSummary, run
from spot.serve import ServeOptions, TardisMachineServer
from spot.tables import quote_ident

log = logging.getLogger(__name__)

DATA = resources.files("spot") / "data"


def demo_capture() -> Path:
    """Return the path of the shipped demo capture."""
    return Path(str(DATA / "demo_capture.ndjson.gz"))


def demo_manifest() -> dict[str, Any]:
    """Return the manifest of the demo capture (period, exchanges, exact message counts)."""
    manifest: dict[str, Any] = json.loads((DATA / "demo_capture.json").read_text())
    return manifest


def demo_settings(ws_url: str, database_url: str) -> Settings:
    """Return settings that replay the whole demo capture from `ws_url` into `database_url`."""
    manifest = demo_manifest()
    return settings_from_dict(
        {
            "tardis": {
                "url": ws_url,
                "mode": "replay",
                "from": manifest["from"],
                "to": manifest["to"],
            },
            "exchanges": [
                {"name": name, "symbols": exchange["symbols"]}
                for name, exchange in manifest["exchanges"].items()
            ],
            "database": {"url": database_url},
            # A one-second run: no endpoint to clash with a spot already serving on 9108.
            "health": {"http": False},
        },
        source="demo",
    )


@dataclass
class TableReport:
    """One table after the demo: its row count and one sample row."""

    table: str
    rows: int
    sample: dict[str, object]


async def run_demo(data_dir: Path | None = None) -> tuple[RunSummary, list[TableReport]]:
    """Replay the demo capture into the embedded PostgreSQL; return the summary and tables."""
    data_dir = data_dir or default_data_dir().with_name("demo-postgres")
    # A fresh cluster each time, so the counts shown are this run's (a second run into the same
    # tables would show idempotency instead: every row skipped as already stored).
    shutil.rmtree(data_dir, ignore_errors=True)
    embedded = EmbeddedPostgres(data_dir)
    server = TardisMachineServer(ServeOptions(captures=(demo_capture(),)))
    async with embedded, server:
        settings = demo_settings(server.ws_url, embedded.url)
        summary = await run(settings, handle_signals=True)
        return summary, await table_reports(settings)


async def table_reports(settings: Settings) -> list[TableReport]:
    """Return every spot table's row count and its latest row."""
    async with PostgreSQLDatabase(settings.database.url, settings.book.orderbook_levels) as db:
        tables = await db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema ="
            " current_schema() AND (table_name LIKE 'orderbook\\_%' OR table_name LIKE 'trade\\_%')"
            " ORDER BY table_name"
        )
        reports = []
        for (table,) in tables:
            name = quote_ident(str(table))
            [(count,)] = await db.execute(f"SELECT count(*) FROM {name}")
            sample = await db.execute(
                f"SELECT row_to_json(t)::text FROM {name} t ORDER BY timestamp_us DESC LIMIT 1"
            )  # identifiers validated by information_schema and quoted
            row = json.loads(str(sample[0][0])) if sample else {}
            reports.append(TableReport(str(table), int(str(count)), row))
        return reports


def sample_summary(report: TableReport) -> dict[str, object]:
    """Return a readable subset of a sample row: keys, timestamps, top level, depth present."""
    row = report.sample
    shown = {k: v for k, v in row.items() if not k[-1].isdigit() or k.endswith("_1")}
    shown.pop("received_at", None)
    if report.table.startswith("orderbook_"):
        shown["bid_levels"] = sum(1 for k, v in row.items() if k.startswith("bid_price_") and v)
        shown["ask_levels"] = sum(1 for k, v in row.items() if k.startswith("ask_price_") and v)
    return shown
