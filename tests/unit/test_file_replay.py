"""File replay without a database: formats, rows, skips, errors, progress, HTTP line handling."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spot.config import settings_from_dict
from spot.data_processor import DataProcessor, ProcessorCounters
from spot.db_writer import WriterCounters
from spot.errors import BadInputFile, ConfigError
from spot.file_replay import (
    DetectedFormat,
    FileReplaySource,
    FileReport,
    book_snapshot_header,
    detect_csv_format,
    expand_paths,
)
from spot.http_replay import error_message_of, replay_http_url, split_lines
from spot.messages import Frame
from spot.progress import ProgressSample, eta_secs, progress_line, summary_lines
from spot.tables import Kind, Row
from spot.tickers import TickerNormalizer
from tests.conftest import fixture_path

TRADES_HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount"
INCREMENTAL_HEADER = "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"


class ListSink:
    """Rows as the queue manager would receive them."""

    def __init__(self) -> None:
        self.rows: list[tuple[Kind, str, Row]] = []

    async def put(self, kind: Kind, ticker: str, row: Row) -> None:
        self.rows.append((kind, ticker, row))


async def replay(
    *paths: Path, depth: int = 15, interval_ms: int = 100
) -> tuple[FileReplaySource, DataProcessor, ListSink, list[Frame]]:
    processor = DataProcessor(depth, TickerNormalizer())
    sink = ListSink()
    source = FileReplaySource(paths, snapshot_interval_ms=interval_ms)
    source.attach(processor, sink)
    frames = [frame async for frame in source.frames()]
    return source, processor, sink, frames


def write(path: Path, text: str, *, compress: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def without_received_at(row: Row) -> Row:
    return row[:-1]


# Formats


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bitmex_trades_XBTUSD.csv", DetectedFormat("trades")),
        ("binance-futures_book_snapshot_5_BTCUSDT.csv", DetectedFormat("book_snapshot", 5)),
        ("binance-futures_book_snapshot_25_BTCUSDT.csv", DetectedFormat("book_snapshot", 25)),
        ("deribit_incremental_book_L2_BTC-PERPETUAL.csv", DetectedFormat("incremental_book_L2")),
        ("huobi-dm-swap_quotes_BTC-USD.csv", DetectedFormat("quotes")),
    ],
)
def test_real_sample_headers_are_recognised(name: str, expected: DetectedFormat) -> None:
    header = fixture_path("tardis", name).read_text().splitlines()[0].split(",")

    assert detect_csv_format(header) == expected


def test_book_snapshot_header_interleaves_asks_and_bids_per_level() -> None:
    assert book_snapshot_header(2)[4:] == (
        "asks[0].price", "asks[0].amount", "bids[0].price", "bids[0].amount",
        "asks[1].price", "asks[1].amount", "bids[1].price", "bids[1].amount",
    )  # fmt: skip


@pytest.mark.parametrize(
    "header",
    [
        "exchange,symbol,timestamp,local_timestamp,side,id,price,amount",  # columns swapped
        "exchange,symbol,timestamp,local_timestamp,bids[0].price,bids[0].amount,"
        "asks[0].price,asks[0].amount",  # bid before ask: not Tardis' layout
        "a,b,c",
    ],
)
def test_unknown_headers_are_not_guessed(header: str) -> None:
    assert detect_csv_format(header.split(",")) is None


async def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path: Path) -> None:
    text = f"{TRADES_HEADER}\nbitmex,XBTUSD,1583020803145000,1583020803307160,a,buy,1.5,2\n"
    gzipped_named_plain = write(tmp_path / "trades.csv", text, compress=True)
    plain_named_gzip = write(tmp_path / "trades2.csv.gz", text.replace(",a,", ",b,"))

    source, _, sink, _ = await replay(gzipped_named_plain, plain_named_gzip)

    assert [row[2] for _, _, row in sink.rows] == ["a", "b"]
    assert [report.format for report in source.reports] == ["trades CSV", "trades CSV"]


async def test_ndjson_lines_become_frames_and_blank_lines_are_dropped(tmp_path: Path) -> None:
    lines = fixture_path("tardis", "tardis_machine_18_offline_binance_synthetic.ndjson")
    text = lines.read_text().replace("\n", "\n\n", 3)
    path = write(tmp_path / "capture.ndjson.gz", text, compress=True)

    source, _, sink, frames = await replay(path)

    assert [frame.data for frame in frames] == lines.read_bytes().splitlines()
    assert sink.rows == []
    assert source.reports[0].format == "NDJSON"
    assert source.completed


# Rows: the same values as the WebSocket path


async def test_csv_trades_equal_the_same_trades_as_tardis_machine_json(tmp_path: Path) -> None:
    # Arrange: with id; two identical id-less trades (derived ids must differ); µs timestamps.
    csv_text = (
        f"{TRADES_HEADER}\n"
        "coinbase,BTC-USD,1709251200123000,1709251200200000,77,buy,61000.5,0.25\n"
        "coinbase,BTC-USD,1709251200123000,1709251200200001,,sell,61000,1\n"
        "coinbase,BTC-USD,1709251200123000,1709251200200001,,sell,61000,1\n"
        "coinbase,BTC-USD,1709251200123456,1709251200300001,,unknown,0.00002257,12\n"
    )
    machine = [
        {"id": "77", "side": "buy", "price": 61000.5, "amount": 0.25,
         "timestamp": "2024-03-01T00:00:00.123Z", "localTimestamp": "2024-03-01T00:00:00.200Z"},
        {"side": "sell", "price": 61000, "amount": 1,
         "timestamp": "2024-03-01T00:00:00.123Z", "localTimestamp": "2024-03-01T00:00:00.200001Z"},
        {"side": "sell", "price": 61000, "amount": 1,
         "timestamp": "2024-03-01T00:00:00.123Z", "localTimestamp": "2024-03-01T00:00:00.200001Z"},
        {"side": "unknown", "price": 0.00002257, "amount": 12,
         "timestamp": "2024-03-01T00:00:00.123456Z",
         "localTimestamp": "2024-03-01T00:00:00.300001Z"},
    ]  # fmt: skip
    json_processor = DataProcessor(15, TickerNormalizer())
    expected = []
    for fields in machine:
        message = {"type": "trade", "symbol": "BTC-USD", "exchange": "coinbase", **fields}
        normalized = json_processor.process(Frame(json.dumps(message), 0))
        assert normalized is not None
        expected.append(without_received_at(normalized.row))

    # Act
    _, _, sink, _ = await replay(write(tmp_path / "trades.csv", csv_text))

    # Assert
    assert [without_received_at(row) for _, _, row in sink.rows] == expected
    assert {ticker for _, ticker, _ in sink.rows} == {"btc_usd"}
    ids = [row[2] for _, _, row in sink.rows]
    assert ids[0] == "77" and ids[1] != ids[2] and all(i.startswith("~") for i in ids[1:])
    assert sink.rows[3][2][8] == 1709251200123456  # timestamp_us, exact
    assert sink.rows[3][2][6] == datetime(2024, 3, 1, 0, 0, 0, 123456, tzinfo=UTC)


async def test_book_snapshot_levels_are_cut_or_padded_and_empty_cells_are_absent(
    tmp_path: Path,
) -> None:
    header = ",".join(book_snapshot_header(3))
    text = (
        f"{header}\n"
        # three levels, then a thin book: one bid, two asks
        "binance,BTCUSDT,1000,2000,11,1,10,2,12,3,9,4,13,5,8,6\n"
        "binance,BTCUSDT,3000,4000,11,1,10,2,12,3,,,,,,\n"
    )
    path = write(tmp_path / "book.csv", text)

    _, _, deep, _ = await replay(path, depth=2)
    _, _, shallow, _ = await replay(path, depth=4)

    # key columns, then bid prices, bid amounts, ask prices, ask amounts
    assert deep.rows[0][2][6:-1] == (10.0, 9.0, 2.0, 4.0, 11.0, 12.0, 1.0, 3.0)
    assert shallow.rows[0][2][6:-1] == (
        10.0, 9.0, 8.0, None, 2.0, 4.0, 6.0, None,
        11.0, 12.0, 13.0, None, 1.0, 3.0, 5.0, None,
    )  # fmt: skip
    assert shallow.rows[1][2][6:-1] == (
        10.0, None, None, None, 2.0, None, None, None,
        11.0, 12.0, None, None, 1.0, 3.0, None, None,
    )  # fmt: skip


async def test_incremental_book_rows_are_sampled_snapshots(tmp_path: Path) -> None:
    text = (
        f"{INCREMENTAL_HEADER}\n"
        "deribit,BTC-PERPETUAL,1000000,1000500,true,bid,100,1\n"
        "deribit,BTC-PERPETUAL,1000000,1000500,true,ask,101,2\n"
        "deribit,BTC-PERPETUAL,1050000,1050500,false,bid,100.5,3\n"
        "deribit,BTC-PERPETUAL,1250000,1250500,false,ask,101,0\n"
    )

    _, processor, sink, _ = await replay(
        write(tmp_path / "l2.csv.gz", text, compress=True), depth=2
    )

    rows = [row for _, _, row in sink.rows]
    assert [(row[4], row[5]) for row in rows] == [(1000000, 1000500), (1100000, 1250500)]
    assert rows[1][6:-1] == (100.5, 100.0, 3.0, 1.0, 101.0, None, 2.0, None)
    assert processor.counters.books == 2


# Bad input


async def test_bad_lines_are_skipped_counted_and_logged_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        f"{TRADES_HEADER}\n"
        "bitmex,XBTUSD,1583020803145000,1583020803307160,a,buy,1.5,2\n"
        "bitmex,XBTUSD,1583020803145000,1583020803307160,b,buy,abc,2\n"  # line 3
        "bitmex,XBTUSD,1583020803145000,1583020803307160,c,buy,1.5\n"  # line 4
        "bitmex,XBTUSD,15830208031450xx,1583020803307160,d,buy,1.5,2\n"  # line 5
        "bitmex,XBTUSD,1583020803145000,1583020803307160,e,buy,-1,2\n"  # line 6
        "bitmex,XBTUSD,1583020803145000,1583020803307160,f,sideways,1,2\n"  # line 7
        "bitmex,XBTUSD,1583020803145000,1583020803307160,g,sell,2,3\n"
    )
    path = write(tmp_path / "trades.csv", text)

    with caplog.at_level(logging.WARNING, "spot.file_replay"):
        source, _, sink, _ = await replay(path)

    assert [row[2] for _, _, row in sink.rows] == ["a", "g"]
    report = source.reports[0]
    assert report.skipped == Counter(
        not_a_number=1, wrong_column_count=1, bad_timestamp=1, invalid_price=1, invalid_side=1
    )
    assert report.skipped_by_table["trade_xbt_usd", "not_a_number"] == 1
    assert f"{path}:3: skipped line (1 so far): not_a_number: price 'abc'" in caplog.text
    assert f"{path}:4: skipped line" in caplog.text and "wrong_column_count" in caplog.text
    assert report.completed


async def test_timestamps_out_of_range_are_skipped_in_every_csv_format(tmp_path: Path) -> None:
    huge = "99999999999999999999"
    header = ",".join(book_snapshot_header(1))
    book = write(tmp_path / "book.csv", f"{header}\nbinance,BTCUSDT,{huge},1,1,1,1,1\n")
    l2 = write(tmp_path / "l2.csv", f"{INCREMENTAL_HEADER}\nx,S,1,{huge},true,bid,1,1\n")
    trades = write(tmp_path / "t.csv", f"{TRADES_HEADER}\nx,S,{huge},1,a,buy,1,1\n")

    source, _, sink, _ = await replay(book, l2, trades)

    assert sink.rows == []
    assert [report.skipped for report in source.reports] == [Counter(bad_timestamp=1)] * 3


async def test_truncated_gzip_names_the_file_after_handing_on_what_it_read(tmp_path: Path) -> None:
    lines = [TRADES_HEADER] + [
        f"bitmex,XBTUSD,{1583020803145000 + i},1583020803307160,id{i},buy,{i + 1},2"
        for i in range(20_000)
    ]
    whole = gzip.compress("\n".join(lines).encode() + b"\n")
    path = tmp_path / "trades.csv.gz"
    path.write_bytes(whole[: len(whole) // 2])

    processor = DataProcessor(15, TickerNormalizer())
    sink = ListSink()
    source = FileReplaySource([path], snapshot_interval_ms=100)
    source.attach(processor, sink)
    with pytest.raises(
        BadInputFile, match=r"trades\.csv\.gz: truncated or corrupt gzip after line"
    ):
        async for _ in source.frames():
            pass

    assert 0 < len(sink.rows) < 20_000
    # Every row handed on is whole: the cut line is never half-read.
    assert [row[2] for _, _, row in sink.rows] == [f"id{i}" for i in range(len(sink.rows))]
    assert source.reports[0].error is not None and not source.completed


async def test_unknown_header_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "mystery.csv", "when,what\n1,2\n")

    with pytest.raises(BadInputFile, match=r"mystery\.csv: line 1: unknown header 'when,what'"):
        await replay(path)


async def test_quotes_and_empty_files_are_skipped_whole(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.csv", "")

    source, _, sink, _ = await replay(
        fixture_path("tardis", "huobi-dm-swap_quotes_BTC-USD.csv"), empty
    )

    assert sink.rows == []
    assert "spot stores no quotes" in source.reports[0].note
    assert "empty" in source.reports[1].note
    assert source.completed


async def test_stop_ends_the_replay_at_the_next_checkpoint(tmp_path: Path) -> None:
    body = "".join(
        f"bitmex,XBTUSD,{1583020803145000 + i},1583020803307160,id{i},buy,1,2\n"
        for i in range(10_000)
    )
    path = write(tmp_path / "trades.csv", f"{TRADES_HEADER}\n{body}")
    sink = ListSink()
    source = FileReplaySource([path], snapshot_interval_ms=100)
    source.attach(DataProcessor(15, TickerNormalizer()), sink)

    async for _ in source.frames():
        pass
    stopped = FileReplaySource([path], snapshot_interval_ms=100)
    stopped_sink = ListSink()
    stopped.attach(DataProcessor(15, TickerNormalizer()), stopped_sink)
    await stopped.stop()
    async for _ in stopped.frames():
        pass

    assert len(sink.rows) == 10_000 and source.completed
    assert stopped_sink.rows == [] and not stopped.completed


# Paths


def test_expand_paths_takes_files_globs_and_directories_in_order(tmp_path: Path) -> None:
    for name in ("b.csv.gz", "a.csv", "c.ndjson", "notes.txt", ".hidden.csv"):
        (tmp_path / name).write_text("x")
    odd = tmp_path / "named_outright.data"
    odd.write_text("x")

    found = expand_paths([str(odd), str(tmp_path), str(tmp_path / "*.csv")])

    names = [path.name for path in found]
    assert names == ["named_outright.data", "a.csv", "b.csv.gz", "c.ndjson"]


def test_expand_paths_refuses_what_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(BadInputFile, match="no such file"):
        expand_paths([str(tmp_path / "missing.csv")])
    with pytest.raises(BadInputFile, match="no data files"):
        expand_paths([str(tmp_path / "*.csv")])


# Progress and summary


def test_progress_line_reports_bytes_lines_rate_and_eta() -> None:
    sample = ProgressSample(
        bytes_done=25_000_000, bytes_total=100_000_000, lines=500_000, rows_stored=480_000,
        elapsed_secs=5.0, files_done=1, files_total=4, current="day2.csv.gz",
    )  # fmt: skip

    line = progress_line(sample)

    assert line == (
        "Replay 25.0% (25.0 MB of 100.0 MB), 500,000 lines read (100,000/s), 480,000 rows "
        "stored, ETA 15s; file 2/4 day2.csv.gz"
    )
    assert eta_secs(0, 10, 1.0) is None


def test_summary_lists_each_table_with_inserted_already_stored_and_skipped() -> None:
    source = FileReplaySource([Path("t.csv")], snapshot_interval_ms=100)
    writers = {"trade_xbt_usd": WriterCounters(rows_inserted=8, rows_duplicate=2)}
    processor = ProcessorCounters(skipped_types=Counter(book_change=3))
    report = FileReport(Path("t.csv"), format="trades CSV", lines=12, rows=10, completed=True)
    report.skipped.update(not_a_number=2)
    report.skipped_by_table["trade_xbt_usd", "not_a_number"] = 2
    source.reports.append(report)

    lines = summary_lines(writers, processor, source.reports)

    assert lines[0].split() == ["table", "inserted", "already", "stored", "skipped"]
    assert lines[1].split() == ["trade_xbt_usd", "8", "2", "2", "(not_a_number", "2)"]
    assert "NDJSON messages spot does not store: 3 (book_change 3)" in lines
    assert "files: 1 of 1 read to the end" in lines


# HTTP replay lines and the transport setting


def test_http_lines_are_split_across_chunks() -> None:
    lines, rest = split_lines(b'{"a"', b':1}\n{"b":2}\n{"c"')

    assert (lines, rest) == ([b'{"a":1}', b'{"b":2}'], b'{"c"')


def test_tardis_machine_error_lines_are_told_from_messages() -> None:
    assert error_message_of(b'{"message":"upstream failed","url":"x"}') == "upstream failed"
    assert error_message_of(b'{"type":"trade","message":"x"}') is None
    assert error_message_of(b'{"type":"trade"}') is None


def test_http_url_carries_the_options_array() -> None:
    url = replay_http_url("http://127.0.0.1:8000/", [{"exchange": "binance"}])

    assert (
        url
        == "http://127.0.0.1:8000/replay-normalized?options=%5B%7B%22exchange%22%3A%22binance%22%7D%5D"
    )


def test_http_transport_needs_an_http_url_and_replay_mode() -> None:
    replay = {"mode": "replay", "from": "2024-03-01", "to": "2024-03-02"}

    ok = settings_from_dict({"tardis": {"transport": "http", "url": "http://h:8000", **replay}})
    with pytest.raises(ConfigError, match="url must start with http"):
        settings_from_dict({"tardis": {"transport": "http", **replay}})
    with pytest.raises(ConfigError, match="replays only"):
        settings_from_dict({"tardis": {"transport": "http", "url": "http://h:8000"}})

    assert ok.tardis.transport == "http"
    assert settings_from_dict({}).tardis.transport == "websocket"
