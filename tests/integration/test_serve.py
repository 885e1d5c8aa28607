"""spot's Tardis-Machine-compatible server, spoken to over real loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import spot
from spot.serve import ServeOptions, TardisMachineServer

DATA = Path(spot.__file__).parent / "data"
DEMO = DATA / "demo_capture.ndjson.gz"
MANIFEST: dict[str, Any] = json.loads((DATA / "demo_capture.json").read_text())
SAMPLE = (
    Path(__file__).parents[1]
    / "fixtures"
    / "tardis"
    / "tardis_machine_18_offline_binance_synthetic.ndjson"
)
DEMO_LINES = gzip.decompress(DEMO.read_bytes()).decode().splitlines()
ALL_DAY = {"from": "2024-03-01", "to": "2024-03-02"}
BINANCE_TYPES = ["trade", "book_snapshot_15_100ms", "quote", "book_change", "derivative_ticker"]
COINBASE_TYPES = ["trade", "book_snapshot_15_100ms"]

pytestmark = pytest.mark.timeout(10)


@dataclass
class Received:
    lines: list[str]
    close_code: int | None
    reason: str


@pytest.fixture
async def demo_server() -> AsyncIterator[TardisMachineServer]:
    async with TardisMachineServer(ServeOptions(captures=(DEMO,))) as server:
        yield server


async def receive_all(
    server: TardisMachineServer,
    options: object,
    path: str = "/ws-replay-normalized",
    limit: int | None = None,
) -> Received:
    """Read text frames until the server ends the connection (or `limit` frames came)."""
    lines: list[str] = []
    reason = ""
    params = {"options": options if isinstance(options, str) else json.dumps(options)}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.ws_url + path, params=params) as ws,
    ):
        while limit is None or len(lines) < limit:
            message = await ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                reason = message.extra if isinstance(message.extra, str) else ""
                break
            lines.append(message.data)
        return Received(lines, ws.close_code, reason)


def demo_lines(exchange: str, data_types: set[str], minute: str = "") -> list[str]:
    """Return the demo capture's lines a replay with these filters must send, in order."""
    selected = []
    for line in DEMO_LINES:
        message = json.loads(line)
        kind = message.get("name", message["type"])
        wanted = message["exchange"] == exchange and kind in data_types
        if wanted and message["localTimestamp"].startswith(minute):
            selected.append(line)
    return selected


def counts(lines: list[str]) -> dict[str, Counter[str]]:
    per_symbol: dict[str, Counter[str]] = {}
    for line in lines:
        message = json.loads(line)
        kind = message.get("name", message["type"])
        per_symbol.setdefault(message["symbol"], Counter())[kind] += 1
    return per_symbol


async def test_replay_of_one_exchange_sends_the_manifest_counts_then_closes_1000(
    demo_server: TardisMachineServer,
) -> None:
    # Arrange
    options = {
        "exchange": "binance",
        "symbols": ["btcusdt", "ETHUSDT"],
        "dataTypes": ["trade", "book_snapshot_15_100ms"],
        **ALL_DAY,
    }
    expected = MANIFEST["exchanges"]["binance"]["counts"]

    # Act
    received = await receive_all(demo_server, options)

    # Assert
    assert received.close_code == 1000
    assert counts(received.lines) == {
        symbol: Counter(
            trade=expected[symbol]["trade"],
            book_snapshot_15_100ms=expected[symbol]["book_snapshot_15_100ms"],
        )
        for symbol in ("BTCUSDT", "ETHUSDT")
    }
    assert demo_server.messages_sent == len(received.lines)
    assert demo_server.connections == 1


async def test_array_options_merge_two_captures_in_local_timestamp_order(tmp_path: Path) -> None:
    # Arrange: the demo capture split by exchange into two files, one gzipped.
    binance = [line for line in DEMO_LINES if '"exchange":"binance"' in line]
    coinbase = [line for line in DEMO_LINES if '"exchange":"coinbase"' in line]
    (tmp_path / "binance.ndjson").write_text("\n".join(binance) + "\n")
    (tmp_path / "coinbase.ndjson.gz").write_bytes(gzip.compress(("\n".join(coinbase)).encode()))
    captures = (tmp_path / "binance.ndjson", tmp_path / "coinbase.ndjson.gz")
    options = [
        {"exchange": "binance", "dataTypes": BINANCE_TYPES, "withDisconnectMessages": True},
        {"exchange": "coinbase", "dataTypes": COINBASE_TYPES, "withDisconnectMessages": True},
    ]
    options = [option | ALL_DAY for option in options]

    # Act
    async with TardisMachineServer(ServeOptions(captures=captures)) as server:
        received = await receive_all(server, options)

    # Assert: exactly the original interleaving, byte for byte.
    assert received.close_code == 1000
    assert len(received.lines) == MANIFEST["messages"] == 5422
    assert received.lines == DEMO_LINES


@pytest.mark.parametrize(
    ("data_types", "expected_kinds"),
    [
        (["trade"], {"trade"}),
        (["book_snapshot_15_100ms"], {"book_snapshot_15_100ms"}),
        (["quote", "book_change"], {"quote", "book_change"}),
        (["derivative_ticker"], {"derivative_ticker"}),
    ],
)
async def test_data_types_select_types_and_snapshot_names(
    demo_server: TardisMachineServer, data_types: list[str], expected_kinds: set[str]
) -> None:
    options = {"exchange": "binance", "dataTypes": data_types, **ALL_DAY}

    received = await receive_all(demo_server, options)

    assert received.close_code == 1000
    assert received.lines == demo_lines("binance", expected_kinds)
    expected = MANIFEST["exchanges"]["binance"]["counts"]
    assert len(received.lines) == sum(
        n for symbol in expected.values() for kind, n in symbol.items() if kind in expected_kinds
    )


async def test_from_and_to_are_cut_to_the_minute_from_inclusive_to_exclusive(
    demo_server: TardisMachineServer,
) -> None:
    options = {
        "exchange": "coinbase",
        "dataTypes": ["trade"],
        "from": "2024-03-01T00:01:42.250Z",
        "to": "2024-03-01T00:02:10Z",
    }

    received = await receive_all(demo_server, options)

    assert received.close_code == 1000
    expected = demo_lines("coinbase", {"trade"}, minute="2024-03-01T00:01")
    assert received.lines == expected
    assert len(expected) == 327
    first = json.loads(received.lines[0])["localTimestamp"]
    assert "2024-03-01T00:01:00" <= first < "2024-03-01T00:01:42"


@pytest.mark.parametrize(("with_disconnects", "expected"), [(True, 1), (False, 0)])
async def test_disconnect_messages_only_when_asked(
    demo_server: TardisMachineServer, with_disconnects: bool, expected: int
) -> None:
    options = {
        "exchange": "binance",
        "symbols": ["SOLUSDT"],
        "dataTypes": ["trade"],
        "withDisconnectMessages": with_disconnects,
        **ALL_DAY,
    }

    received = await receive_all(demo_server, options)

    types = Counter(json.loads(line)["type"] for line in received.lines)
    trades = MANIFEST["exchanges"]["binance"]["counts"]["SOLUSDT"]["trade"]
    assert (types["trade"], types["disconnect"], len(types)) == (trades, expected, 1 + expected)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ("{not json", "Invalid options: JSON is malformed"),
        ({"dataTypes": ["trade"], **ALL_DAY}, "Invalid options: Object missing required field"),
        ([{"exchange": "binance", "dataTypes": ["trade"], "to": "2024-03-02"}], 'Invalid "from"'),
        (
            {
                "exchange": "binance",
                "dataTypes": ["trade"],
                "from": "yesterday",
                "to": "2024-03-02",
            },
            'Invalid "from" argument: yesterday',
        ),
        (
            {
                "exchange": "binance",
                "dataTypes": ["trade"],
                "from": "2024-03-01T00:01:10Z",
                "to": "2024-03-01T00:01:50Z",
            },
            'Invalid "to" and "from" arguments combination',
        ),
    ],
)
async def test_invalid_options_close_1011_with_the_error_as_reason(
    demo_server: TardisMachineServer, options: object, reason: str
) -> None:
    received = await receive_all(demo_server, options)

    assert received.lines == []
    assert received.close_code == 1011
    assert received.reason.startswith(reason)


async def test_unknown_websocket_path_is_closed_with_1008(
    demo_server: TardisMachineServer,
) -> None:
    received = await receive_all(demo_server, {"exchange": "binance"}, path="/ws-replay")

    assert (received.lines, received.close_code) == ([], 1008)


async def test_http_replay_sends_the_same_lines_as_the_websocket(
    demo_server: TardisMachineServer,
) -> None:
    options = {"exchange": "coinbase", "dataTypes": COINBASE_TYPES, **ALL_DAY}
    received = await receive_all(demo_server, options)

    async with (
        aiohttp.ClientSession() as session,
        session.get(
            demo_server.http_url + "/replay-normalized", params={"options": json.dumps(options)}
        ) as response,
    ):
        body = await response.text()
        content_type = response.headers["Content-Type"]

    assert response.status == 200
    assert content_type == "application/x-json-stream"
    assert body.splitlines() == received.lines
    assert len(received.lines) == sum(
        sum(kinds.values()) for kinds in MANIFEST["exchanges"]["coinbase"]["counts"].values()
    )


async def test_http_replay_with_bad_options_is_a_500_with_a_message(
    demo_server: TardisMachineServer,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            demo_server.http_url + "/replay-normalized",
            params={"options": json.dumps({"exchange": "binance", "dataTypes": []})},
        ) as response,
    ):
        body = await response.json()

    assert response.status == 500
    assert body == {
        "message": 'Invalid "from" argument: missing. Please provide valid date string.'
    }


async def test_health_check_answers_200_json(demo_server: TardisMachineServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(demo_server.http_url + "/health-check") as response,
    ):
        body = await response.json()

    assert response.status == 200
    assert body["status"] == "Healthy"


async def test_drop_every_aborts_each_connection_after_n_messages_without_a_close_frame() -> None:
    options = {"exchange": "binance", "dataTypes": ["trade"], **ALL_DAY}
    expected = demo_lines("binance", {"trade"})

    async with TardisMachineServer(ServeOptions(captures=(DEMO,), drop_every=100)) as server:
        first = await receive_all(server, options)
        second = await receive_all(server, options)

    assert first.lines == second.lines == expected[:100]
    assert first.close_code == second.close_code == 1006  # abnormal closure: no close frame
    assert server.messages_sent == 200
    assert server.connections == 2


async def test_stream_with_loop_restamps_each_loop_strictly_later() -> None:
    # Arrange: the real tardis-machine sample, 23 messages over 63.7 s of localTimestamps.
    sample = SAMPLE.read_text().splitlines()
    options = {
        "exchange": "binance",
        "dataTypes": ["trade", "book_snapshot_15_100ms", "quote", "trade_bar_10s", "book_change"],
        "withDisconnectMessages": True,
    }

    # Act
    async with TardisMachineServer(ServeOptions(captures=(SAMPLE,), loop=True)) as server:
        received = await receive_all(server, options, "/ws-stream-normalized", limit=3 * 23)

    # Assert
    first, second, third = (received.lines[i * 23 : (i + 1) * 23] for i in range(3))
    assert first == sample
    assert json.loads(second[0])["localTimestamp"] > json.loads(first[-1])["localTimestamp"]
    for loop, lines in ((1, second), (2, third)):
        for original, later in zip(first, lines, strict=True):
            assert json.loads(later) == restamped(json.loads(original), minutes=2 * loop)


def restamped(message: dict[str, Any], minutes: int) -> dict[str, Any]:
    # The sample lies within 00:00 to 00:01:03: shifting by whole minutes only touches HH:MM.
    shifted = dict(message)
    for field in ("timestamp", "localTimestamp", "openTimestamp", "closeTimestamp"):
        if field in message:
            minute = int(message[field][14:16]) + minutes
            shifted[field] = f"{message[field][:14]}{minute:02d}{message[field][16:]}"
    return shifted


async def test_stream_without_loop_closes_1000_at_the_end_of_the_captures() -> None:
    options = {"exchange": "binance", "dataTypes": ["trade"]}

    async with TardisMachineServer(ServeOptions(captures=(SAMPLE,))) as server:
        received = await receive_all(server, options, "/ws-stream-normalized")

    assert len(received.lines) == 4
    assert received.close_code == 1000


async def test_stream_speed_paces_by_local_timestamp_gaps() -> None:
    # The sample's localTimestamps span 63.685 s: at 1000x that takes at least 63 ms.
    options = {"exchange": "binance", "dataTypes": ["trade"], "withDisconnectMessages": True}
    loop = asyncio.get_running_loop()

    async with TardisMachineServer(ServeOptions(captures=(SAMPLE,), speed=1000)) as server:
        started = loop.time()
        received = await receive_all(server, options, "/ws-stream-normalized")
        elapsed = loop.time() - started

    assert len(received.lines) == 5
    assert elapsed >= 0.063


async def test_real_tardis_machine_sample_is_replayed_byte_for_byte() -> None:
    sample = SAMPLE.read_text().splitlines()
    options = {
        "exchange": "binance",
        "symbols": ["BTCUSDT", "ETHUSDT"],
        "dataTypes": ["trade", "book_snapshot_15_100ms", "quote", "trade_bar_10s", "book_change"],
        "withDisconnectMessages": True,
        "from": "2024-03-01",
        "to": "2024-03-01T00:02:00.000Z",
    }

    async with TardisMachineServer(ServeOptions(captures=(SAMPLE,))) as server:
        everything = await receive_all(server, options)
        quotes = await receive_all(
            server, options | {"dataTypes": ["quote"], "withDisconnectMessages": False}
        )

    assert everything.lines == sample
    assert len(quotes.lines) == 4
    assert {json.loads(line)["name"] for line in quotes.lines} == {"quote"}


@pytest.mark.parametrize(("passthrough", "expected_garbage"), [(True, 2), (False, 0)])
async def test_invalid_capture_lines_are_passed_through_only_when_asked(
    tmp_path: Path, passthrough: bool, expected_garbage: int
) -> None:
    sample = SAMPLE.read_text().splitlines()
    capture = tmp_path / "garbage.ndjson"
    capture.write_text("\n".join([*sample[:5], "not json {", *sample[5:9], "[1, 2]", ""]) + "\n")
    options = {"exchange": "binance", "dataTypes": ["trade", "book_change"], **ALL_DAY}

    async with TardisMachineServer(
        ServeOptions(captures=(capture,), passthrough_invalid=passthrough)
    ) as server:
        received = await receive_all(server, options)

    garbage = [line for line in received.lines if not line.startswith('{"type"')]
    assert garbage == ["not json {", "[1, 2]"][:expected_garbage]
    assert len(received.lines) == 5 + expected_garbage
    assert received.close_code == 1000


async def test_a_client_that_does_not_read_makes_the_replay_wait() -> None:
    # 20 copies of the demo capture (66 MB) are far more than socket buffers hold (~5 MB here).
    options = [{"exchange": "binance", "dataTypes": BINANCE_TYPES, **ALL_DAY}]
    captures = (DEMO,) * 20
    total = 20 * (MANIFEST["exchanges"]["binance"]["messages"] - 1)  # no disconnects asked

    async with (
        TardisMachineServer(ServeOptions(captures=captures)) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(
            server.ws_url + "/ws-replay-normalized", params={"options": json.dumps(options)}
        ) as ws,
    ):
        await asyncio.sleep(0.3)
        stalled_at = server.messages_sent
        received = 0
        async for message in ws:
            assert message.type is aiohttp.WSMsgType.TEXT
            received += 1

    assert stalled_at < total // 3
    assert received == server.messages_sent == total
