from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import parse_qs, urlsplit

from spot.config import settings_from_dict
from spot.main_loop import data_types
from spot.messages import Frame
from spot.serve import ServeOptions, TardisMachineServer
from spot.websocket import TardisMachineSource
from tests.conftest import fixture_path

SAMPLE = fixture_path("tardis", "tardis_machine_18_offline_binance_synthetic.ndjson")


def _source(url: str, mode: str = "replay", **tardis: object) -> TardisMachineSource:
    settings = settings_from_dict(
        {
            "tardis": {
                "url": url,
                "mode": mode,
                "from": "2024-03-01",
                "to": "2024-03-02",
                **tardis,
            },
            "exchanges": [{"name": "binance", "symbols": ["BTCUSDT", "ETHUSDT"]}],
        }
    )
    return TardisMachineSource(settings.tardis, settings.exchanges, data_types(settings))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_url_carries_the_options_array_tardis_machine_expects() -> None:
    url = urlsplit(_source("ws://127.0.0.1:8001").url())

    assert url.path == "/ws-replay-normalized"
    [options] = parse_qs(url.query)["options"]
    assert json.loads(options) == [
        {
            "exchange": "binance",
            "symbols": ["BTCUSDT", "ETHUSDT"],
            "dataTypes": ["trade", "book_snapshot_15_100ms"],
            "withDisconnectMessages": True,
            "from": "2024-03-01",
            "to": "2024-03-02",
        }
    ]
    assert urlsplit(_source("ws://h:1", "stream").url()).path == "/ws-stream-normalized"


async def test_replay_yields_every_frame_with_its_receive_time_then_completes() -> None:
    async with TardisMachineServer(ServeOptions(captures=(SAMPLE,))) as server:
        source = _source(server.ws_url, with_disconnect_messages=False)
        frames: list[Frame] = [frame async for frame in source.frames()]

    sent = [line for line in SAMPLE.read_bytes().splitlines() if b'"disconnect"' not in line]
    wanted = [line for line in sent if b'"trade"' in line or b"book_snapshot_15_100ms" in line]
    assert [frame.data for frame in frames] == wanted
    assert all(frame.received_ns > 0 for frame in frames)
    assert source.completed and source.connects == 1


async def test_stop_during_a_reconnect_backoff_ends_the_frames_at_once() -> None:
    source = _source(f"ws://127.0.0.1:{_closed_port()}", "stream", reconnect_initial_secs=60.0)

    async def read_all() -> list[Frame]:
        return [frame async for frame in source.frames()]

    reading = asyncio.create_task(read_all())
    await asyncio.sleep(0.3)  # the first connect is refused; the 30-90 s backoff starts
    await source.stop()

    assert await asyncio.wait_for(reading, 10) == []
    assert source.connects == 0
