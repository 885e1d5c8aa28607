"""Focused micro-benchmarks of spot's per-message steps, in this process, without PostgreSQL.

`python -m bench.micro [--messages N]` prints one line per step: nanoseconds per call (best of 5).
Run it before and after a change to see that step's effect; `python -m bench` shows the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from bench.workload import Workload
from spot.data_processor import DataProcessor, datetime_from_ns
from spot.messages import Frame
from spot.queue_manager import QueueManager
from spot.tickers import TickerNormalizer
from spot.websocket import local_timestamp_of


def best_ns_per_call(step: Callable[[], int], repeat: int = 5) -> float:
    """Return the best of `repeat` runs of `step` (which returns how many calls it made)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        calls = step()
        best = min(best, (time.perf_counter_ns() - started) / calls)
    return best


def frames_of(kind: str, messages: int) -> list[Frame]:
    now = time.time_ns()
    data = list(Workload(kind, messages).frames())  # type: ignore[arg-type]
    return [Frame(item, now + i * 1000) for i, item in enumerate(data)]


def process_step(frames: list[Frame]) -> Callable[[], int]:
    def step() -> int:
        processor = DataProcessor(15, TickerNormalizer({}))
        for frame in frames:
            processor.process(frame)
        return len(frames)

    return step


def queue_step(frames: list[Frame]) -> Callable[[], int]:
    """Rows into the queues and out again as batches: the hand-over between the two stages."""
    normalized = [DataProcessor(15, TickerNormalizer({})).process(frame) for frame in frames]
    rows = [item for item in normalized if item is not None]

    async def round_trip() -> None:
        queues = QueueManager(len(rows) + 1, "replay")
        for item in rows:
            await queues.put(item.kind, item.ticker, item.row)
        await queues.close()
        for table in queues.tables:
            async for _ in queues.batches(table, 5_000, 0.5):
                pass

    def step() -> int:
        asyncio.run(round_trip())
        return len(rows)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    args = parser.parse_args()
    books, trades = frames_of("books", args.messages), frames_of("trades", args.messages)
    book_data = books[0].data

    def local_timestamp() -> int:
        for _ in range(100_000):
            local_timestamp_of(book_data)
        return 100_000

    def received_at() -> int:
        for frame in trades:
            datetime_from_ns(frame.received_ns)
        return len(trades)

    steps: dict[str, Callable[[], int]] = {
        "local_timestamp_of (book frame)": local_timestamp,
        "datetime_from_ns": received_at,
        "process (book frame)": process_step(books),
        "process (trade frame)": process_step(trades),
        "queue put + batch (book rows)": queue_step(books),
        "queue put + batch (trade rows)": queue_step(trades),
    }
    for name, step in steps.items():
        print(f"{name:40s} {best_ns_per_call(step):8.0f} ns")


if __name__ == "__main__":
    main()
