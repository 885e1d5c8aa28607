"""The L2 book rebuild and Tardis Machine's snapshot rule: real output, hand-computed books."""

from __future__ import annotations

import json

import pytest

from spot.data_processor import parse_timestamp
from spot.incremental_book import BookSide, ComputedSnapshot, IncrementalBooks
from tests.conftest import fixture_path

T = 1_600_000_000_000_000  # µs, on a 100 ms boundary


def feed(books: IncrementalBooks, rows: list[tuple[int, int, bool, str, float, float]]) -> list:
    """Add (timestamp_us, local_us, is_snapshot, side, price, amount) rows of exchange x, S."""
    out: list[ComputedSnapshot] = []
    for timestamp_us, local_us, is_snapshot, side, price, amount in rows:
        level = (side == "bid", price, amount)
        out += books.add("x", "S", timestamp_us, local_us, is_snapshot, level)
    return out + books.finish()


def test_book_side_orders_bids_down_and_asks_up_and_amount_zero_removes() -> None:
    bids, asks = BookSide(descending=True), BookSide(descending=False)
    for price in (99.5, 101.0, 100.0):
        bids.set(price, 1.0, 10)
        asks.set(price, 2.0, 10)

    bids.set(101.0, 0, 10)
    asks.set(100.0, 3.0, 10)
    asks.set(555.0, 0, 10)  # removing an absent level is a no-op

    assert bids.top(5) == ((100.0, 1.0), (99.5, 1.0))
    assert asks.top(2) == ((99.5, 2.0), (100.0, 3.0))
    assert len(asks) == 3


def test_set_tells_whether_a_level_within_depth_moved() -> None:
    asks = BookSide(descending=False)
    for price in (1.0, 2.0, 3.0):
        asks.set(price, 1.0, 2)

    assert asks.set(4.0, 1.0, 2) is False  # inserted at index 3
    assert asks.set(3.0, 5.0, 2) is False  # amount changed at index 2
    assert asks.set(2.0, 5.0, 2) is True  # amount changed at index 1
    assert asks.set(0.5, 1.0, 2) is True  # new best
    assert asks.set(9.0, 0, 2) is False  # absent


def test_tardis_node_compute_sequence_is_reproduced_exactly() -> None:
    # Arrange: the book_change messages and the book_snapshot_2_1000ms tardis-node computed.
    text = fixture_path("tardis", "tardis_node_compute_sequence.ndjson").read_text()
    messages = [json.loads(line) for line in text.splitlines()]
    expected = [
        (
            parse_timestamp(m["timestamp"])[1],
            parse_timestamp(m["localTimestamp"])[1],
            tuple((float(lv["price"]), float(lv["amount"])) for lv in m["bids"] if lv),
            tuple((float(lv["price"]), float(lv["amount"])) for lv in m["asks"] if lv),
        )
        for m in messages
        if m["type"] == "book_snapshot" and m["name"] == "book_snapshot_2_1000ms"
    ]
    books = IncrementalBooks(depth=2, interval_ms=1000)

    # Act
    computed: list[ComputedSnapshot] = []
    for m in (m for m in messages if m["type"] == "book_change"):
        timestamp_us = parse_timestamp(m["timestamp"])[1]
        local_us = parse_timestamp(m["localTimestamp"])[1]
        levels = [(True, lv["price"], lv["amount"]) for lv in m["bids"]]
        levels += [(False, lv["price"], lv["amount"]) for lv in m["asks"]]
        for level in levels:
            computed += books.add(
                m["exchange"], m["symbol"], timestamp_us, local_us, m["isSnapshot"], level
            )
        computed += books.finish()

    # Assert
    assert len(expected) == 3
    assert [(s.timestamp_us, s.local_timestamp_us, s.bids, s.asks) for s in computed] == expected


# Hand-computed: depth 2, interval 100 ms. Each comment says what the row does to the book.
ROWS = [
    (T + 1_000, T + 1_500, False, "bid", 99.0, 1.0),  # before any snapshot: ignored
    (T + 10_000, T + 10_500, True, "bid", 100.0, 1.0),  # snapshot run (one change) ...
    (T + 10_000, T + 10_500, True, "bid", 99.0, 2.0),
    (T + 10_000, T + 10_500, True, "ask", 101.0, 3.0),
    (T + 10_000, T + 10_500, True, "ask", 102.0, 4.0),  # ... first snapshot right after it
    (T + 20_000, T + 20_700, False, "ask", 103.0, 5.0),  # third ask: outside depth 2
    (T + 30_000, T + 30_900, False, "bid", 100.0, 7.0),  # top changed, same interval
    (T + 40_000, T + 40_100, False, "bid", 100.0, 8.0),  # top changed, same interval
    (T + 150_000, T + 150_200, False, "ask", 101.0, 0.0),  # next interval: sample, then remove
    (T + 160_000, T + 160_100, True, "ask", 200.0, 1.0),  # a new snapshot run: fresh book
    (T + 160_000, T + 160_100, True, "bid", 150.0, 1.0),
    (T + 160_000, T + 160_100, True, "bid", 149.0, 2.0),
    (T + 420_000, T + 420_001, False, "bid", 149.0, 0.0),  # later interval: sample, then remove
]  # the last removal is never sampled: the input ends first, as in Tardis Machine


def test_hand_computed_snapshots_at_interval_100ms() -> None:
    books = IncrementalBooks(depth=2, interval_ms=100)

    snapshots = feed(books, ROWS)

    top_100 = ((100.0, 1.0), (99.0, 2.0)), ((101.0, 3.0), (102.0, 4.0))
    top_100_amended = ((100.0, 8.0), (99.0, 2.0)), ((101.0, 3.0), (102.0, 4.0))
    fresh = ((150.0, 1.0), (149.0, 2.0)), ((200.0, 1.0),)
    assert snapshots == [
        # First snapshot: the snapshot change's own times; the earlier bid was ignored.
        ComputedSnapshot("x", "S", T + 10_000, T + 10_500, *top_100),
        # The book as it stood at the end of the interval of T+40ms, seen by the change at T+150ms.
        ComputedSnapshot("x", "S", T + 100_000, T + 150_200, *top_100_amended),
        # The fresh book of the second snapshot run (no trace of 100/99/102/103).
        ComputedSnapshot("x", "S", T + 200_000, T + 420_001, *fresh),
    ]
    assert books.changes == 8


def test_interval_zero_samples_after_every_change_of_the_top_levels() -> None:
    books = IncrementalBooks(depth=2, interval_ms=0)

    snapshots = feed(books, ROWS)

    assert [(s.timestamp_us, s.local_timestamp_us) for s in snapshots] == [
        (T + 10_000, T + 10_500),
        (T + 30_000, T + 30_900),
        (T + 40_000, T + 40_100),
        (T + 150_000, T + 150_200),
        (T + 160_000, T + 160_100),
        (T + 420_000, T + 420_001),
    ]
    assert snapshots[3].asks == ((102.0, 4.0), (103.0, 5.0))


def test_symbols_keep_separate_books_and_runs() -> None:
    books = IncrementalBooks(depth=1, interval_ms=0)

    first = books.add("x", "A", T, T, True, (True, 10.0, 1.0))
    first += books.add("x", "B", T, T, True, (True, 20.0, 1.0))
    first += books.add("x", "A", T + 1, T + 1, False, (True, 11.0, 1.0))
    first += books.finish()

    assert [(s.symbol, s.bids) for s in first] == [
        ("A", ((10.0, 1.0),)),
        ("B", ((20.0, 1.0),)),
        ("A", ((11.0, 1.0),)),
    ]


def test_an_unchanged_top_is_not_sampled_again() -> None:
    books = IncrementalBooks(depth=1, interval_ms=0)

    snapshots = feed(
        books,
        [
            (T, T, True, "ask", 5.0, 1.0),
            (T + 1, T + 1, False, "ask", 5.0, 1.0),  # same amount: nothing changed
            (T + 2, T + 2, False, "ask", 6.0, 1.0),  # below the top
        ],
    )

    assert len(snapshots) == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        IncrementalBooks(depth=0, interval_ms=100)
