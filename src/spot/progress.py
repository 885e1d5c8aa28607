"""Replay progress for people: a live bar on a terminal, periodic log lines elsewhere, a summary.

The reporter only reads counters (file_replay's ReplayProgress and a stored-rows callable), from
its own task; it never touches the pipeline. The functions that format are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final

from spot.data_processor import ProcessorCounters
from spot.db_writer import WriterCounters
from spot.file_replay import FileReport, ReplayProgress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

log = logging.getLogger(__name__)

TTY_REFRESH_SECS: Final = 0.25


@dataclass(frozen=True)
class ProgressSample:
    """What the display shows at one moment."""

    bytes_done: int
    bytes_total: int
    lines: int
    rows_stored: int
    elapsed_secs: float
    files_done: int
    files_total: int
    current: str


def eta_secs(done: int, total: int, elapsed_secs: float) -> float | None:
    """Return the seconds left at the rate so far, or None before there is a rate."""
    if done <= 0 or elapsed_secs <= 0 or total <= 0:
        return None
    return max(0.0, (total - done) * elapsed_secs / done)


def human_bytes(count: float) -> str:
    """Return a byte count as B, kB, MB or GB (decimal units, like file managers)."""
    for unit in ("B", "kB", "MB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def progress_line(sample: ProgressSample) -> str:
    """Return one log line: bytes and percent, lines and rate, rows stored, ETA, current file."""
    rate = sample.lines / sample.elapsed_secs if sample.elapsed_secs > 0 else 0.0
    percent = 100 * sample.bytes_done / sample.bytes_total if sample.bytes_total else 100.0
    eta = eta_secs(sample.bytes_done, sample.bytes_total, sample.elapsed_secs)
    eta_text = "?" if eta is None else f"{eta:.0f}s"
    return (
        f"Replay {percent:.1f}% ({human_bytes(sample.bytes_done)} of "
        f"{human_bytes(sample.bytes_total)}), {sample.lines:,} lines read ({rate:,.0f}/s), "
        f"{sample.rows_stored:,} rows stored, ETA {eta_text}; file "
        f"{min(sample.files_done + 1, sample.files_total)}/{sample.files_total} {sample.current}"
    )


class ProgressReporter:
    """Show a replay's progress until the `async with` block ends."""

    def __init__(
        self,
        progress: ReplayProgress,
        rows_stored: Callable[[], int],
        *,
        console: Console | None = None,
        log_every_secs: float = 10.0,
    ) -> None:
        self._progress = progress
        self._rows_stored = rows_stored
        self._console = console  # a console = a terminal: draw a bar; None = log lines
        self._log_every_secs = log_every_secs
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> ProgressSample:
        """Return the counters now."""
        progress = self._progress
        return ProgressSample(
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            lines=progress.lines,
            rows_stored=self._rows_stored(),
            elapsed_secs=time.monotonic() - self._started,
            files_done=progress.files_done,
            files_total=progress.files_total,
            current=progress.current,
        )

    async def __aenter__(self) -> ProgressReporter:
        self._started = time.monotonic()
        show = self._show_bar if self._console is not None else self._log_lines
        self._task = asyncio.create_task(show(), name="replay progress")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._console is None:
            log.info("%s", progress_line(self.sample()))

    async def _log_lines(self) -> None:
        while True:
            await asyncio.sleep(self._log_every_secs)
            log.info("%s", progress_line(self.sample()))

    async def _show_bar(self) -> None:
        assert self._console is not None
        with _bar(self._console) as bar:
            task = bar.add_task("replay", total=None, lines="", file="")
            try:
                while True:
                    _update_bar(bar, task, self.sample())
                    await asyncio.sleep(TTY_REFRESH_SECS)
            finally:
                _update_bar(bar, task, self.sample())


def _bar(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.fields[file]}"),
        BarColumn(bar_width=24),
        DownloadColumn(),
        TextColumn("{task.fields[lines]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=1 / TTY_REFRESH_SECS,
    )


def _update_bar(bar: Progress, task: TaskID, sample: ProgressSample) -> None:
    rate = sample.lines / sample.elapsed_secs if sample.elapsed_secs > 0 else 0.0
    bar.update(
        task,
        total=sample.bytes_total or None,
        completed=sample.bytes_done,
        file=f"{min(sample.files_done + 1, sample.files_total)}/{sample.files_total}",
        lines=f"{sample.lines:,} lines {rate:,.0f}/s · {sample.rows_stored:,} stored",
    )


def summary_lines(
    writers: Mapping[str, WriterCounters],
    processor: ProcessorCounters,
    reports: Sequence[FileReport],
) -> list[str]:
    """Return the closing summary: per table rows inserted, already stored and skipped (why)."""
    skipped: dict[str, Counter[str]] = {}
    for report in reports:
        for (table, reason), count in report.skipped_by_table.items():
            skipped.setdefault(table, Counter())[reason] += count
    tables = sorted(set(writers) | set(skipped))
    width = max([len("table"), *map(len, tables)])
    lines = [f"{'table':<{width}}  {'inserted':>10}  {'already stored':>14}  skipped"]
    for table in tables:
        counters = writers.get(table, WriterCounters())
        lines.append(
            f"{table:<{width}}  {counters.rows_inserted:>10,}  {counters.rows_duplicate:>14,}  "
            f"{_reasons(skipped.get(table, Counter()))}"
        )
    if processor.skipped_types:
        lines.append(f"NDJSON messages spot does not store: {_reasons(processor.skipped_types)}")
    if processor.invalid:
        lines.append(f"NDJSON lines skipped as invalid: {_reasons(processor.invalid)}")
    lines.extend(_file_lines(reports))
    return lines


def _reasons(counts: Counter[str]) -> str:
    if not counts:
        return "0"
    detail = ", ".join(f"{reason} {count:,}" for reason, count in counts.most_common())
    return f"{sum(counts.values()):,} ({detail})"


def _file_lines(reports: Sequence[FileReport]) -> list[str]:
    done = sum(1 for report in reports if report.completed)
    lines = [f"files: {done} of {len(reports)} read to the end"]
    for report in reports:
        if report.error is not None:
            lines.append(f"  {report.path}: FAILED: {report.error}")
        elif report.note:
            lines.append(f"  {report.path}: {report.note}")
        elif report.skipped or not report.completed:
            state = "" if report.completed else ", stopped before the end"
            lines.append(
                f"  {report.path} ({report.format}): {report.lines:,} lines, "
                f"{report.rows:,} rows, skipped {_reasons(report.skipped)}{state}"
            )
    return lines
