"""Decode Tardis Machine frames and normalize them into table rows.

`decode` and the `*_row` functions are pure (no clock, no I/O); `DataProcessor` adds the counting
and the little state normalizing needs (derived trade ids). main_loop reads frames through it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol

import msgspec

from spot.messages import BookSnapshot, Disconnect, Envelope, Frame, Level, Message, Trade
from spot.tables import Kind, Row
from spot.tickers import TickerNormalizer

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KNOWN_TYPES = frozenset({"trade", "book_snapshot", "disconnect"})
TRADE_SIDES = frozenset({"buy", "sell", "unknown"})

_message_decoder = msgspec.json.Decoder(Message)
_envelope_decoder = msgspec.json.Decoder(Envelope)


class InvalidMessage(ValueError):
    """A message that decoded but cannot become a row; `reason` is the counter's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkippedType(Exception):
    """A well-formed message of a type spot does not store (book_change, quote, ...)."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__(envelope.type)
        self.envelope = envelope


def decode(data: bytes | str) -> Message:
    """Decode one frame; raise SkippedType for other types, InvalidMessage for bad ones."""
    try:
        message: Message = _message_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(data, exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidMessage("not_json", str(exc)) from None
    except UnicodeDecodeError as exc:  # bytes frames: msgspec checks UTF-8 inside strings
        raise InvalidMessage("not_utf8", str(exc)) from None
    if isinstance(message, BookSnapshot) and not message.name.startswith("book_snapshot_"):
        # A `quote` data type arrives as a depth-1 book_snapshot named "quote".
        raise SkippedType(Envelope(message.name, message.exchange, message.symbol))
    return message


def _classify(data: bytes | str, error: msgspec.ValidationError) -> Exception:
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return InvalidMessage("wrong_shape", str(error))
    if envelope.type and envelope.type not in KNOWN_TYPES:
        return SkippedType(envelope)
    return InvalidMessage("wrong_shape", str(error))


def parse_timestamp(text: str) -> tuple[datetime, int]:
    """Return (aware datetime, Unix microseconds); 7-9 fractional digits are truncated."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidMessage("bad_timestamp", repr(text)) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - EPOCH
    return moment, (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class _UtcCalendar:
    """Aware UTC datetimes of Unix microseconds, keeping the calendar fields of the last second.

    Times come in order, so nearly every call shares its second with the one before and builds
    the datetime from cached fields (~160 ns) instead of `EPOCH + timedelta` (~400 ns).
    """

    __slots__ = ("_fields", "_second")

    def __init__(self) -> None:
        self._second: int | None = None
        self._fields = (1970, 1, 1, 0, 0, 0)

    def at(self, unix_us: int) -> datetime:
        """Return the datetime of `unix_us`; OverflowError outside datetime's range."""
        second, microsecond = divmod(unix_us, 1_000_000)
        if second != self._second:
            moment = EPOCH + timedelta(seconds=second)
            self._fields = (
                moment.year,
                moment.month,
                moment.day,
                moment.hour,
                moment.minute,
                moment.second,
            )
            self._second = second
        year, month, day, hour, minute, whole_second = self._fields
        return datetime(year, month, day, hour, minute, whole_second, microsecond, UTC)


_received_calendar = _UtcCalendar()
_data_calendar = _UtcCalendar()


def datetime_from_ns(unix_ns: int) -> datetime:
    """Return the aware UTC datetime of a `time.time_ns()` value, to the microsecond."""
    return _received_calendar.at(unix_ns // 1000)


def _check_positive(what: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise InvalidMessage(f"invalid_{what}", repr(value))


def trade_row(message: Trade, received_at: datetime, trade_ids: TradeIds) -> Row:
    """Return the `trade_<ticker>` row of a trade; `trade_ids` names trades that come without."""
    _check_positive("price", message.price)
    _check_positive("amount", message.amount)
    if message.side not in TRADE_SIDES:
        raise InvalidMessage("invalid_side", repr(message.side))
    timestamp, timestamp_us = parse_timestamp(message.timestamp)
    local_timestamp, local_timestamp_us = parse_timestamp(message.local_timestamp)
    trade_id = message.id
    if trade_id is None:
        trade_id = trade_ids.derive(
            message.exchange,
            message.symbol,
            timestamp_us,
            message.price,
            message.amount,
            message.side,
        )
    return (
        message.exchange,
        message.symbol,
        trade_id,
        message.side,
        message.price,
        message.amount,
        timestamp,
        local_timestamp,
        timestamp_us,
        local_timestamp_us,
        received_at,
    )


def pad_levels(levels: list[Level], depth: int) -> tuple[list[float | None], list[float | None]]:
    """Return exactly `depth` prices and amounts: `{}` and missing levels are None, deeper cut."""
    prices: list[float | None] = [level.price for level in levels[:depth]]
    amounts: list[float | None] = [level.amount for level in levels[:depth]]
    missing = depth - len(prices)
    if missing > 0:
        prices.extend([None] * missing)
        amounts.extend([None] * missing)
    return prices, amounts


def book_row(message: BookSnapshot, depth: int, received_at: datetime) -> Row:
    """Return the `orderbook_<ticker>` row of a snapshot, padded or cut to `depth` levels."""
    timestamp, timestamp_us = parse_timestamp(message.timestamp)
    local_timestamp, local_timestamp_us = parse_timestamp(message.local_timestamp)
    bid_prices, bid_amounts = pad_levels(message.bids, depth)
    ask_prices, ask_amounts = pad_levels(message.asks, depth)
    return (
        message.exchange,
        message.symbol,
        timestamp,
        local_timestamp,
        timestamp_us,
        local_timestamp_us,
        *bid_prices,
        *bid_amounts,
        *ask_prices,
        *ask_amounts,
        received_at,
    )


class TradeIds:
    """Derive deterministic ids for trades that arrive without one.

    Identical id-less trades (same instant, price, amount, side) are told apart by their position
    in the run, so a replay of the same data derives the same ids and none collapse into another.
    The instant is the parsed microsecond, so `.123Z` and `.123000Z` derive the same id.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], tuple[int, Counter[str]]] = {}

    def derive(
        self, exchange: str, symbol: str, timestamp_us: int, price: float, amount: float, side: str
    ) -> str:
        """Return the id of an id-less trade (call once per trade, in arrival order)."""
        key = (exchange, symbol)
        run = self._runs.get(key)
        if run is None or run[0] != timestamp_us:
            run = self._runs[key] = (timestamp_us, Counter())
        fingerprint = f"{timestamp_us}|{price!r}|{amount!r}|{side}"
        occurrence = run[1][fingerprint]
        run[1][fingerprint] += 1
        digest = hashlib.blake2b(f"{key}|{fingerprint}".encode(), digest_size=8).hexdigest()
        return f"~{digest}-{occurrence}"


class RowSink(Protocol):
    """Where normalized rows go (the queue manager)."""

    async def put(self, kind: Kind, ticker: str, row: Row) -> None: ...


@dataclass
class ProcessorCounters:
    """What the processor saw; exposed in logs, health and the run summary."""

    frames: int = 0
    trades: int = 0
    books: int = 0
    disconnects: int = 0
    disconnects_by_exchange: Counter[str] = field(default_factory=Counter)  # stream health
    skipped_types: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)


class NormalizedRow(NamedTuple):
    """A row and where it goes (a NamedTuple: built per message, ~170 ns vs ~320 as a dataclass)."""

    kind: Kind
    ticker: str
    row: Row


_MAX_PENDING_DISCONNECTS = 10_000


class DataProcessor:
    """Turn frames into rows, counting everything it does not store."""

    def __init__(self, orderbook_levels: int, tickers: TickerNormalizer) -> None:
        self.orderbook_levels = orderbook_levels
        self.tickers = tickers
        self.trade_ids = TradeIds()
        self.counters = ProcessorCounters()
        # Disconnects not yet turned into gaps (gaps.DisconnectGaps takes them). Bounded: a
        # processor nobody drains (a test, a tool) must not grow with a flapping exchange.
        self.pending_disconnects: deque[Disconnect] = deque(maxlen=_MAX_PENDING_DISCONNECTS)

    def process(self, frame: Frame) -> NormalizedRow | None:
        """Return the row of one frame, or None for a frame that is counted and skipped."""
        self.counters.frames += 1
        try:
            message = decode(frame.data)
            return self._normalize(message, datetime_from_ns(frame.received_ns))
        except SkippedType as skipped:
            self.counters.skipped_types[skipped.envelope.type] += 1
        except InvalidMessage as invalid:
            self._count_invalid(invalid, frame)
        return None

    def _normalize(self, message: Message, received_at: datetime) -> NormalizedRow | None:
        if isinstance(message, Trade):
            row = trade_row(message, received_at, self.trade_ids)
            self.counters.trades += 1
            return NormalizedRow("trade", self.tickers(message.symbol), row)
        if isinstance(message, BookSnapshot):
            row = book_row(message, self.orderbook_levels, received_at)
            self.counters.books += 1
            return NormalizedRow("orderbook", self.tickers(message.symbol), row)
        self.counters.disconnects += 1
        self.counters.disconnects_by_exchange[message.exchange] += 1
        self.pending_disconnects.append(message)
        log.warning(
            "[!] Tardis Machine reports a disconnect from %s at %s (symbols: %s): data has a gap",
            message.exchange,
            message.local_timestamp,
            ",".join(message.symbols or []) or "all",
        )
        return None

    def _count_invalid(self, invalid: InvalidMessage, frame: Frame) -> None:
        self.counters.invalid[invalid.reason] += 1
        count = self.counters.invalid[invalid.reason]
        # Log the first few of each kind with a sample, then every 1000th: a flood of garbage
        # must stay visible without drowning the log.
        if count <= 5 or count % 1000 == 0:
            log.warning(
                "Skipped invalid frame (%s, %d so far): %s; frame starts %r",
                invalid.reason,
                count,
                invalid,
                frame.data[:200],
            )


# Rows from Unix-microsecond times (Tardis CSV datasets): the same tuples as trade_row / book_row,
# without formatting and re-parsing timestamp text.


def datetime_from_us(unix_us: int) -> datetime:
    """Return the aware UTC datetime of Unix microseconds, exactly."""
    try:
        return _data_calendar.at(unix_us)
    except OverflowError:
        raise InvalidMessage("bad_timestamp", repr(unix_us)) from None


def trade_row_us(
    exchange: str,
    symbol: str,
    trade_id: str,
    side: str,
    price: float,
    amount: float,
    timestamp_us: int,
    local_timestamp_us: int,
    received_at: datetime,
) -> Row:
    """Return the `trade_<ticker>` row of a trade timed in Unix microseconds.

    Checked like `trade_row`; equal to `trade_row` of the same trade as Tardis Machine JSON.
    """
    _check_positive("price", price)
    _check_positive("amount", amount)
    if side not in TRADE_SIDES:
        raise InvalidMessage("invalid_side", repr(side))
    return (
        exchange,
        symbol,
        trade_id,
        side,
        price,
        amount,
        datetime_from_us(timestamp_us),
        datetime_from_us(local_timestamp_us),
        timestamp_us,
        local_timestamp_us,
        received_at,
    )


def fit_levels(values: list[float | None], depth: int) -> list[float | None]:
    """Return exactly `depth` values: deeper ones cut, missing ones None."""
    if len(values) >= depth:
        return values[:depth]
    return values + [None] * (depth - len(values))


def book_row_us(
    exchange: str,
    symbol: str,
    timestamp_us: int,
    local_timestamp_us: int,
    bids: tuple[list[float | None], list[float | None]],
    asks: tuple[list[float | None], list[float | None]],
    depth: int,
    received_at: datetime,
) -> Row:
    """Return the `orderbook_<ticker>` row of a snapshot given as (prices, amounts) per side.

    Sides are best first; None is an absent level. Cut or padded to `depth` like `book_row`.
    """
    return (
        exchange,
        symbol,
        datetime_from_us(timestamp_us),
        datetime_from_us(local_timestamp_us),
        timestamp_us,
        local_timestamp_us,
        *fit_levels(bids[0], depth),
        *fit_levels(bids[1], depth),
        *fit_levels(asks[0], depth),
        *fit_levels(asks[1], depth),
        received_at,
    )
