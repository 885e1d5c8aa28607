from __future__ import annotations

import asyncio
import math
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spot.db_writer import QueueProcessor
from spot.errors import DatabaseUnavailable, RowsRejected, SpillError
from spot.fallback_storage import (
    FallbackStorage,
    LocalSpill,
    SpillBuffer,
    decode_spill,
    encode_spill,
    open_store,
)
from spot.gaps import DisconnectGaps
from spot.messages import Disconnect
from spot.tables import TRADE_COLUMNS, Kind, Row, book_columns

MOMENT = datetime(2024, 3, 1, 0, 0, 0, 123456, tzinfo=UTC)


def _trade(i: int, trade_id: str | None = None) -> Row:
    return (
        "binance",
        "BTCUSDT",
        trade_id or f"t{i}",
        "buy",
        0.1 + i,
        1e-9,
        MOMENT + timedelta(microseconds=i),
        MOMENT,
        1_709_251_200_123_456 + i,
        -(2**62),
        MOMENT,
    )


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_spill_rows_come_back_identical_with_a_self_describing_header(compression: str) -> None:
    levels = 3
    book = (
        "bybit",
        "ÉTH-€",
        MOMENT,
        MOMENT,
        1,
        2,
        -0.0,
        math.inf,
        5e-324,
        None,
        *[1.5] * 8,
        MOMENT,
    )
    rows = [book, book[:6] + (None,) * 12 + (MOMENT,)]

    data = encode_spill(
        "orderbook_eth_eur", book_columns(levels), rows, compression=compression, reason="test"
    )  # type: ignore[arg-type]
    header, back = decode_spill(data)

    assert back == rows
    assert str(back[0][6]) == "-0.0" and back[0][2].tzinfo is UTC
    assert (header.format, header.version, header.table) == ("spot-spill", 1, "orderbook_eth_eur")
    assert header.columns[:3] == ["exchange", "symbol", "timestamp"]
    assert header.types[2:6] == ["timestamptz", "timestamptz", "bigint", "bigint"]
    assert (header.row_count, header.reason) == (2, "test")


def test_nan_survives_a_spill() -> None:
    row = (*_trade(1)[:4], math.nan, *_trade(1)[5:])

    _, back = decode_spill(encode_spill("trade_x_y", TRADE_COLUMNS, [row]))

    assert math.isnan(back[0][4])


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"\x28\xb5\x2f\xfd broken zstd", b"\x1f\x8b broken gzip"]
)
def test_corrupt_spills_raise_spill_error(data: bytes) -> None:
    with pytest.raises(SpillError):
        decode_spill(data)


async def test_local_spills_are_listed_read_and_removed_and_temp_files_ignored(
    tmp_path: Path,
) -> None:
    storage = FallbackStorage(open_store(tmp_path.as_uri()))
    first = await storage.write("trade_btc_usdt", TRADE_COLUMNS, [_trade(1), _trade(2)])
    second = await storage.write("trade_btc_usdt", TRADE_COLUMNS, [_trade(3)])
    rejected = await storage.write("trade_btc_usdt", TRADE_COLUMNS, [_trade(4)], area="rejected")
    (tmp_path / "pending" / "trade_btc_usdt" / ".tmp-half-written.spill.zst").write_bytes(b"x")

    assert await storage.pending() == sorted([first, second], key=lambda ref: ref.name)
    assert await storage.rejected() == [rejected]
    assert (await storage.read(first)).rows == [_trade(1), _trade(2)]
    await storage.remove(first)
    await storage.remove(first)  # already gone: another recoverer was faster
    assert await storage.pending() == [second]
    assert first.table == "trade_btc_usdt" and first.area == "pending"


async def test_spills_in_an_fsspec_store_round_trip() -> None:
    pytest.importorskip("fsspec")
    storage = FallbackStorage(open_store("memory://spot-unit-test/prefix"), "gzip")

    ref = await storage.write("trade_btc_usdt", TRADE_COLUMNS, [_trade(7)])

    assert await storage.pending() == [ref]
    assert (await storage.read(ref)).rows == [_trade(7)]
    await storage.remove(ref)
    assert await storage.pending() == []


class _FailingStore(LocalSpill):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failing = True

    async def put(self, name: str, data: bytes) -> None:
        if self.failing:
            raise OSError("disk full")
        await super().put(name, data)


async def test_spill_buffer_writes_by_size_and_keeps_rows_while_the_store_fails(
    tmp_path: Path,
) -> None:
    store = _FailingStore(tmp_path)
    storage = FallbackStorage(store)
    buffer = SpillBuffer(storage, lambda table: TRADE_COLUMNS, max_rows=10, max_age_secs=60)

    await buffer.add("trade_btc_usdt", [_trade(i) for i in range(25)])  # size reached: fails
    store.failing = False
    await buffer.add("trade_btc_usdt", [_trade(25)])  # retried with the kept rows
    await buffer.add("trade_btc_usdt", [_trade(26)])
    buffer.close()
    await buffer.run()  # flushes the rest and returns

    rows = [row for ref in await storage.pending() for row in (await storage.read(ref)).rows]
    assert sorted(rows) == sorted(_trade(i) for i in range(27))
    assert (buffer.rows_spilled, buffer.rows_lost) == (27, 0)


async def test_spill_buffer_bounds_memory_when_the_store_stays_down(tmp_path: Path) -> None:
    buffer = SpillBuffer(
        FallbackStorage(_FailingStore(tmp_path)), lambda t: TRADE_COLUMNS, max_rows=2
    )

    for i in range(30):
        await buffer.add("trade_btc_usdt", [_trade(i)])

    assert buffer.rows_lost == 10  # 20 = max_rows * 10 kept, the oldest dropped and counted


class _FakeDatabase:
    """copy_rows that fails as told: unavailable for a while, or refusing rows marked bad."""

    def __init__(self, unavailable_calls: int = 0) -> None:
        self.unavailable_calls = unavailable_calls
        self.stored: list[Row] = []
        self.calls = 0

    async def copy_rows(self, table: str, rows: list[Row]) -> int:
        self.calls += 1
        if self.unavailable_calls:
            self.unavailable_calls -= 1
            raise DatabaseUnavailable("down")
        if any(row[2].startswith("bad") for row in rows):
            raise RowsRejected("bad row")
        self.stored.extend(rows)
        return len(rows)


async def _batches(*batches: list[Row]):  # type: ignore[no-untyped-def]
    for batch in batches:
        yield batch


async def test_bad_rows_are_isolated_and_the_rest_of_the_batch_is_written() -> None:
    db = _FakeDatabase()
    rejected: list[Row] = []

    async def reject(table: str, rows: list[Row], reason: str) -> None:
        rejected.extend(rows)

    batch = [_trade(i, "bad" if i in (3, 77) else None) for i in range(100)]
    writer = QueueProcessor(db, "trade_btc_usdt", _batches(batch), reject=reject)  # type: ignore[arg-type]
    await writer.run()

    assert rejected == [batch[3], batch[77]]
    assert db.stored == [row for i, row in enumerate(batch) if i not in (3, 77)]
    assert (writer.counters.rows_inserted, writer.counters.rows_rejected) == (98, 2)


async def test_batches_are_retried_then_spilled_and_later_ones_spill_at_once() -> None:
    db = _FakeDatabase(unavailable_calls=1000)
    spilled: list[list[Row]] = []

    async def spill(table: str, rows: list[Row]) -> None:
        spilled.append(rows)

    batches = [[_trade(i)] for i in range(5)]
    writer = QueueProcessor(
        db,  # type: ignore[arg-type]
        "trade_btc_usdt",
        _batches(*batches),
        retry_initial_secs=0.01,
        spill_after_secs=0.05,
        spill=spill,
    )
    await writer.run()

    assert spilled == batches
    assert writer.counters.rows_spilled == 5
    assert writer.counters.retries >= 1
    assert db.calls < 5 + writer.counters.retries  # in the outage most batches were not tried


async def test_spill_now_ends_the_retries_of_the_batch_in_hand() -> None:
    db = _FakeDatabase(unavailable_calls=10**9)
    spilled: list[list[Row]] = []

    async def spill(table: str, rows: list[Row]) -> None:
        spilled.append(rows)

    writer = QueueProcessor(
        db,
        "trade_btc_usdt",
        _batches([_trade(1)]),
        spill_after_secs=3600,
        spill=spill,  # type: ignore[arg-type]
    )
    running = asyncio.create_task(writer.run())
    while not writer.counters.retries:  # noqa: ASYNC110 - a counter, no event to wait on
        await asyncio.sleep(0.001)
    writer.spill_now()
    await asyncio.wait_for(running, 5)

    assert spilled == [[_trade(1)]]


class _Processor:
    def __init__(self) -> None:
        self.pending_disconnects: deque[Disconnect] = deque()


class _Sink:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    async def put(self, kind: Kind, ticker: str, row: Row) -> None:
        self.rows.append(row)


async def test_a_disconnect_gap_ends_at_the_exchanges_next_row() -> None:
    processor, sink = _Processor(), _Sink()
    gaps: list[tuple[str, datetime, datetime, str]] = []
    tracker = DisconnectGaps(processor, sink, lambda *gap: gaps.append(gap))
    later = MOMENT + timedelta(seconds=5)
    coinbase = ("coinbase", "BTC-USD", "1", "buy", 1.0, 1.0, later, later, 0, 0, later)

    await tracker.put("trade", "btc_usdt", _trade(1))
    processor.pending_disconnects.append(Disconnect("coinbase", "2024-03-01T00:00:00.123456Z"))
    await tracker.put("trade", "btc_usdt", _trade(2))  # binance: the gap stays open
    await tracker.put("trade", "btc_usd", coinbase)
    tracker.close()

    assert gaps == [("coinbase", MOMENT, later, "disconnect")]
    assert len(sink.rows) == 3


async def test_disconnects_of_two_exchanges_between_two_rows_open_two_gaps() -> None:
    processor, sink = _Processor(), _Sink()
    gaps: list[tuple[str, datetime, datetime, str]] = []
    tracker = DisconnectGaps(processor, sink, lambda *gap: gaps.append(gap))
    later = MOMENT + timedelta(seconds=5)
    coinbase = ("coinbase", "BTC-USD", "1", "buy", 1.0, 1.0, later, later, 0, 0, later)
    binance = ("binance", "BTCUSDT", "2", "buy", 1.0, 1.0, later, later, 0, 0, later)

    processor.pending_disconnects.append(Disconnect("coinbase", "2024-03-01T00:00:00Z"))
    processor.pending_disconnects.append(Disconnect("binance", "2024-03-01T00:00:00Z"))
    processor.pending_disconnects.append(Disconnect("coinbase", "2024-03-01T00:00:01Z"))
    await tracker.put("trade", "btc_usd", coinbase)
    await tracker.put("trade", "btc_usdt", binance)

    start = datetime(2024, 3, 1, tzinfo=UTC)
    assert gaps == [
        ("coinbase", start, later, "disconnect"),  # the second coinbase drop extends the first
        ("binance", start, later, "disconnect"),
    ]
