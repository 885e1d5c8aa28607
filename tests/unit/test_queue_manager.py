import asyncio

from spot.queue_manager import QueueManager
from spot.tables import Row


def _row(i: int) -> Row:
    return ("binance", "BTCUSDT", i)


async def test_queues_are_created_on_first_sight_and_announced() -> None:
    announced: list[str] = []
    queues = QueueManager(10, "replay", on_new_queue=announced.append)

    await queues.put("trade", "btc_usdt", _row(1))
    await queues.put("orderbook", "btc_usdt", _row(2))
    await queues.put("trade", "never_configured", _row(3))

    assert announced == ["trade_btc_usdt", "orderbook_btc_usdt", "trade_never_configured"]
    assert set(queues.trade_queues) == {"btc_usdt", "never_configured"}
    assert set(queues.order_book_queues) == {"btc_usdt"}
    assert queues.depth() == 3


async def test_batches_cut_by_size_and_drain_everything_after_close() -> None:
    queues = QueueManager(100, "replay")
    for i in range(25):
        await queues.put("trade", "btc_usdt", _row(i))
    await queues.close()

    batches = [batch async for batch in queues.batches("trade_btc_usdt", 10, 5.0)]

    assert [len(b) for b in batches] == [10, 10, 5]
    assert [row[2] for b in batches for row in b] == list(range(25))


async def test_batches_flush_a_partial_batch_after_the_interval() -> None:
    queues = QueueManager(100, "replay")
    await queues.put("trade", "btc_usdt", _row(1))
    batches = queues.batches("trade_btc_usdt", 1000, 0.05)

    batch = await asyncio.wait_for(anext(batches), 2.0)

    assert batch == [_row(1)]


async def test_replay_mode_full_queue_makes_the_reader_wait() -> None:
    queues = QueueManager(2, "replay")
    await queues.put("trade", "btc_usdt", _row(1))
    await queues.put("trade", "btc_usdt", _row(2))

    blocked = asyncio.create_task(queues.put("trade", "btc_usdt", _row(3)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    queues.trade_queues["btc_usdt"].get_nowait()
    await asyncio.wait_for(blocked, 1.0)

    assert queues.depth("trade_btc_usdt") == 2


async def test_stream_mode_overflows_after_the_timeout_then_at_once() -> None:
    overflowed: list[tuple[str, list[Row]]] = []

    async def spill(table: str, rows: list[Row]) -> None:
        overflowed.append((table, rows))

    queues = QueueManager(1, "stream", stream_put_timeout_secs=0.05, on_overflow=spill)
    await queues.put("trade", "btc_usdt", _row(1))

    loop = asyncio.get_running_loop()
    started = loop.time()
    await queues.put("trade", "btc_usdt", _row(2))
    await queues.put("trade", "btc_usdt", _row(3))
    waited = loop.time() - started

    assert overflowed == [("trade_btc_usdt", [_row(2)]), ("trade_btc_usdt", [_row(3)])]
    assert queues.overflowed_rows == 2
    assert waited < 1.0  # waited once for the timeout, not once per row
