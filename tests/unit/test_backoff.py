import pytest

from spot.errors import SourceError
from spot.websocket import Backoff


def test_waits_double_with_jitter_up_to_the_maximum() -> None:
    backoff = Backoff(1.0, 4.0, give_up_after=None)

    waits = [backoff.next_wait("drop") for _ in range(5)]

    for wait, delay in zip(waits, [1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert 0.5 * delay <= wait <= 1.5 * delay


def test_progress_starts_the_backoff_over() -> None:
    backoff = Backoff(1.0, 60.0, give_up_after=3)
    for _ in range(3):
        backoff.next_wait("drop")

    backoff.progressed()

    assert backoff.failures == 0
    assert backoff.next_wait("drop") <= 1.5


def test_gives_up_after_that_many_failures_in_a_row_naming_the_last_reason() -> None:
    backoff = Backoff(0.01, 0.01, give_up_after=2)
    backoff.next_wait("refused")
    backoff.next_wait("refused")

    with pytest.raises(SourceError, match="gave up after 2 reconnects in a row: refused"):
        backoff.next_wait("refused")


async def test_stop_cuts_a_sleep_short() -> None:
    backoff = Backoff(1.0, 1.0, give_up_after=None)
    backoff.stop()

    await backoff.sleep(3600)  # returns at once: the test's timeout would catch a real sleep
