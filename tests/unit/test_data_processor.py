from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from spot.data_processor import (
    DataProcessor,
    InvalidMessage,
    SkippedType,
    book_row,
    decode,
    pad_levels,
    parse_timestamp,
)
from spot.messages import BookSnapshot, Frame, Level, Trade
from spot.tables import TRADE_COLUMNS, book_columns
from spot.tickers import TickerNormalizer
from tests.conftest import fixture_path

RECEIVED_NS = 1_709_251_200_500_000_000
RECEIVED_AT = datetime(2024, 3, 1, 0, 0, 0, 500000, tzinfo=UTC)


def _snapshot(bids: list[dict[str, float]], asks: list[dict[str, float]]) -> bytes:
    return json.dumps(
        {
            "type": "book_snapshot",
            "symbol": "BTCUSDT",
            "exchange": "binance",
            "name": "book_snapshot_15_100ms",
            "depth": 15,
            "interval": 100,
            "bids": bids,
            "asks": asks,
            "timestamp": "2024-03-01T00:00:11.000Z",
            "localTimestamp": "2024-03-01T00:00:12.132456Z",
        }
    ).encode()


def _levels(count: int, start: float) -> list[dict[str, float]]:
    return [{"price": start - i, "amount": 1.0 + i} for i in range(count)]


@pytest.mark.parametrize("real_levels", [0, 3, 15, 25])
@pytest.mark.parametrize("absent_as", ["empty_objects", "short_array"])
def test_book_row_has_exactly_the_configured_levels(real_levels: int, absent_as: str) -> None:
    bids, asks = _levels(real_levels, 100.0), _levels(real_levels, 200.0)
    if absent_as == "empty_objects" and real_levels < 15:
        bids += [{}] * (15 - real_levels)  # type: ignore[list-item]
        asks += [{}] * (15 - real_levels)  # type: ignore[list-item]
    message = decode(_snapshot(bids, asks))
    assert isinstance(message, BookSnapshot)

    row = book_row(message, 15, RECEIVED_AT)

    assert len(row) == len(book_columns(15))
    bid_prices, bid_amounts = row[6:21], row[21:36]
    ask_prices = row[36:51]
    kept = min(real_levels, 15)
    assert bid_prices[:kept] == tuple(100.0 - i for i in range(kept))
    assert bid_amounts[:kept] == tuple(1.0 + i for i in range(kept))
    assert ask_prices[:kept] == tuple(200.0 - i for i in range(kept))
    assert bid_prices[kept:] == (None,) * (15 - kept)
    assert row[-1] == RECEIVED_AT


def test_pad_levels_cuts_deeper_books_and_pads_thinner() -> None:
    levels = [Level(1.0, 2.0), Level(), Level(3.0, 4.0)]

    assert pad_levels(levels, 2) == ([1.0, None], [2.0, None])
    assert pad_levels(levels, 4) == ([1.0, None, 3.0, None], [2.0, None, 4.0, None])


@pytest.mark.parametrize(
    ("text", "microseconds"),
    [
        ("2024-03-01T00:00:00Z", 1_709_251_200_000_000),
        ("2024-03-01T00:00:00.1Z", 1_709_251_200_100_000),
        ("2024-03-01T00:00:00.123Z", 1_709_251_200_123_000),
        ("2024-03-01T00:00:00.123456Z", 1_709_251_200_123_456),
        ("2024-03-01T00:00:00.1234567Z", 1_709_251_200_123_456),
        ("2024-03-01T00:00:00.123456789Z", 1_709_251_200_123_456),
        ("2024-03-01T00:00:00.9999999Z", 1_709_251_200_999_999),
        ("1970-01-01T00:00:00.000001Z", 1),
    ],
)
def test_timestamps_keep_microseconds_and_truncate_longer_fractions(
    text: str, microseconds: int
) -> None:
    moment, unix_us = parse_timestamp(text)

    assert unix_us == microseconds
    assert moment.tzinfo is not None
    assert moment == datetime.fromtimestamp(microseconds // 1_000_000, UTC).replace(
        microsecond=microseconds % 1_000_000
    )


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01T00:00:00Z", "", "2024-03-01T25:00Z"])
def test_bad_timestamps_are_invalid_messages(text: str) -> None:
    with pytest.raises(InvalidMessage) as raised:
        parse_timestamp(text)

    assert raised.value.reason == "bad_timestamp"


def _process_file(path: Path) -> tuple[DataProcessor, list[object]]:
    processor = DataProcessor(15, TickerNormalizer())
    rows = []
    for line in path.read_bytes().splitlines():
        normalized = processor.process(Frame(line, RECEIVED_NS))
        if normalized is not None:
            rows.append(normalized)
    return processor, rows


def test_real_tardis_machine_output_normalizes_with_padding_and_skips() -> None:
    processor, rows = _process_file(
        fixture_path("tardis", "tardis_machine_18_offline_binance_synthetic.ndjson")
    )

    counters = processor.counters
    assert (counters.frames, counters.trades, counters.books, counters.disconnects) == (23, 4, 4, 1)
    assert counters.skipped_types == {"book_change": 6, "quote": 4, "trade_bar": 4}
    assert not counters.invalid
    first_book = rows[0]
    assert first_book.kind == "orderbook" and first_book.ticker == "btc_usdt"  # type: ignore[attr-defined]
    row = first_book.row  # type: ignore[attr-defined]
    assert row[4] == 1_709_251_200_002_123  # 6-digit exchange timestamp kept
    assert row[6:14] == (
        61130.97,
        61130.96,
        61130.95,
        61130.94,
        61130.93,
        61130.92,
        61130.91,
        61130.9,
    )
    assert row[14:21] == (None,) * 7  # the 7 `{}` levels


def test_tardis_node_mapper_outputs_never_crash_and_every_trade_is_kept() -> None:
    path = fixture_path("tardis", "tardis_node_mapper_outputs.ndjson")
    processor, rows = _process_file(path)
    trades_in_file = sum(1 for line in path.read_text().splitlines() if '"type":"trade"' in line)

    assert processor.counters.trades == trades_in_file == 159
    assert not processor.counters.invalid
    trade_ids = [r.row[2] for r in rows if r.kind == "trade"]  # type: ignore[attr-defined]
    assert all(trade_ids)
    assert sum(1 for i in trade_ids if i.startswith("~")) == 25  # derived for the id-less ones


def test_id_less_trades_sharing_a_timestamp_get_distinct_deterministic_ids() -> None:
    trade = _trade_frame(
        symbol="BTC-USD",
        exchange="coinbase",
        price=1.5,
        amount=2,
        timestamp="2024-03-01T00:00:00.000001Z",
    )
    first, _ = _process_file_bytes([trade, trade, trade])
    again, _ = _process_file_bytes([trade, trade, trade])

    assert len(set(first)) == 3
    assert first == again


def test_derived_ids_do_not_depend_on_how_the_timestamp_is_spelled() -> None:
    three_digits, _ = _process_file_bytes([_trade_frame(timestamp="2024-03-01T00:00:00.123Z")])
    six_digits, _ = _process_file_bytes([_trade_frame(timestamp="2024-03-01T00:00:00.123000Z")])

    assert three_digits == six_digits


def _process_file_bytes(lines: list[bytes]) -> tuple[list[str], DataProcessor]:
    processor = DataProcessor(15, TickerNormalizer())
    ids = [processor.process(Frame(line, RECEIVED_NS)).row[2] for line in lines]  # type: ignore[union-attr]
    return ids, processor


def _trade_frame(**fields: object) -> bytes:
    message: dict[str, object] = {
        "type": "trade",
        "symbol": "BTCUSDT",
        "exchange": "binance",
        "price": 1,
        "amount": 1,
        "side": "buy",
        "timestamp": "2024-03-01T00:00:00Z",
        "localTimestamp": "2024-03-01T00:00:00Z",
    }
    message.update(fields)
    return json.dumps(message).encode()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"not json at all", "not_json"),
        (b'{"type":"trade","symbol":"X"}', "wrong_shape"),
        (_trade_frame(price="abc"), "wrong_shape"),
        (_trade_frame(price=None), "wrong_shape"),
        (_trade_frame(price=-1), "invalid_price"),
        (_trade_frame(price=12345).replace(b"12345", b"1e400"), "wrong_shape"),
        (_trade_frame(amount=0), "invalid_amount"),
        (_trade_frame(side="up"), "invalid_side"),
        (_trade_frame(timestamp="soon"), "bad_timestamp"),
        (_trade_frame(timestamp="0000-01-01T00:00:00Z"), "bad_timestamp"),
        (b"[1,2,3]", "wrong_shape"),
        (b"\xff\xfe{", "not_json"),
    ],
)
def test_malformed_frames_are_counted_by_reason_not_raised(frame: bytes, reason: str) -> None:
    processor = DataProcessor(15, TickerNormalizer())

    assert processor.process(Frame(frame, RECEIVED_NS)) is None
    assert processor.counters.invalid == {reason: 1}


def test_other_message_types_are_skipped_with_a_count() -> None:
    with pytest.raises(SkippedType):
        decode(b'{"type":"derivative_ticker","symbol":"X","exchange":"deribit"}')
    with pytest.raises(SkippedType):
        decode(_snapshot([{}], [{}]).replace(b"book_snapshot_15_100ms", b"quote"))


def test_trade_decodes_to_a_frozen_struct() -> None:
    message = decode(fixture_path("tardis", "machine_messages.ndjson").read_bytes().splitlines()[3])

    assert isinstance(message, Trade)
    assert (message.id, message.price, message.side) == ("3445374963", 61130.98, "sell")
    with pytest.raises(AttributeError):
        message.price = 1.0  # type: ignore[misc]
    assert len(TRADE_COLUMNS) == 11
    assert msgspec.json.encode(message)
