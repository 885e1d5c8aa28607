"""10,000 hostile frames mixed into good traffic: every good row stored, every bad frame counted."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from spot.main_loop import run
from spot.serve import ServeOptions, TardisMachineServer
from tests.database import Connection, duplicate_keys, table_counts
from tests.faults.conftest import fault_settings, spilled_rows
from tests.integration.capture_builder import START, iso, mixed_capture

pytestmark = pytest.mark.slow


def _trade(at: str, **fields: object) -> bytes:
    message = {
        "type": "trade",
        "symbol": "BTCUSDT",
        "exchange": "binance",
        "id": "x",
        "price": 100.0,
        "amount": 1.0,
        "side": "buy",
        "timestamp": at,
        "localTimestamp": at,
    }
    message.update(fields)
    return json.dumps(message).encode()


def _hostile(n: int) -> tuple[bytes, str]:
    """Return the n-th hostile line and the reason spot should count (or "rejected")."""
    at = iso(START + timedelta(milliseconds=100 * (n // 4)))
    kinds: list[tuple[bytes, str]] = [
        (b"not json at all %d" % n, "not_json"),
        (b"\xff\xfe\xfd not UTF-8 " + bytes([0x80 + n % 64]), "not_json"),
        # Invalid UTF-8 inside a JSON string; `"name": 5` makes spot serve pass it through.
        (b'{"type":"trade","name":5,"symbol":"BTC\xffUSDT","exchange":"binance"}', "not_utf8"),
        (b'{"type":"trade","symbol":"BTCUSDT","exchange":"bin', "not_json"),
        (b"[" * 5000 + b"]" * 5000, "wrong_shape"),
        (b'{"type":"book_snapshot","symbol":"ETHUSDT","bids":"many"}', "wrong_shape"),
        (b"{}", "wrong_shape"),
        (_trade(at, price=-1.5, id=f"neg{n}"), "invalid_price"),
        (_trade(at, amount=0, id=f"zero{n}"), "invalid_amount"),
        (_trade(at, side="sideways", id=f"side{n}"), "invalid_side"),
        (_trade(at, timestamp="yesterday", id=f"ts{n}"), "bad_timestamp"),
        (_trade(at).replace(b'"price": 100.0', b'"price": 1e400'), "wrong_shape"),
        # Decodes fine, but PostgreSQL refuses a NUL byte in text: a poisoned row in a batch.
        (_trade(at, id=f"nul\u0000{n}"), "rejected"),
    ]
    return kinds[n % len(kinds)]


async def test_hostile_frames_are_counted_and_never_cost_a_good_row(
    pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    capture = mixed_capture(3000)
    hostile = [_hostile(n) for n in range(10_000)]
    lines: list[bytes] = []
    for i, line in enumerate(capture.lines):  # one hostile frame after each good line
        lines.append(line.encode())
        if i < len(hostile):
            lines.append(hostile[i][0])
    lines.extend(raw for raw, _ in hostile[len(capture.lines) :])
    path = tmp_path / "hostile.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reasons = Counter(reason for _, reason in hostile)
    rejected = reasons.pop("rejected")
    spill_dir = tmp_path / "spill"

    async with TardisMachineServer(
        ServeOptions(captures=(path,), passthrough_invalid=True)
    ) as server:
        summary = await run(fault_settings(server.ws_url, pg_url, spill_dir))

    assert summary.completed
    assert summary.processor.invalid == reasons
    assert sum(summary.processor.invalid.values()) + rejected == 10_000
    assert sum(w.rows_rejected for w in summary.writers.values()) == rejected
    assert await spilled_rows(spill_dir, "rejected") == {"trade_btc_usdt": rejected}
    assert await table_counts(pg) == dict(capture.expected_rows)
    assert await duplicate_keys(pg) == 0


async def test_a_frame_over_the_size_limit_is_counted_and_what_came_before_is_stored(
    pg_url: str, pg: Connection, tmp_path: Path
) -> None:
    from spot.errors import SourceError
    from spot.main_loop import tardis_source
    from spot.websocket import MAX_FRAME_BYTES, TardisMachineSource

    capture = mixed_capture(300)
    at = json.loads(capture.lines[-1])["localTimestamp"]
    huge = _trade(at, id="x" * (MAX_FRAME_BYTES + 1))
    path = tmp_path / "huge.ndjson"
    path.write_bytes("\n".join(capture.lines).encode() + b"\n" + huge + b"\n")

    async with TardisMachineServer(ServeOptions(captures=(path,))) as server:
        settings = fault_settings(
            server.ws_url, pg_url, tmp_path / "spill", tardis={"max_reconnect_attempts": 2}
        )
        source = tardis_source(settings)
        # The frame cannot be read, so a replay cannot skip it: it ends with a clear error.
        with pytest.raises(SourceError, match="exceeds limit"):
            await run(settings, source)

    assert isinstance(source, TardisMachineSource)
    assert source.oversized_frames == 3  # the first connection and two reconnects
    assert await table_counts(pg) == dict(capture.expected_rows)
