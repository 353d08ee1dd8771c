"""Backoff, the retry loop and the worker's wake-up decisions, without a database."""

from __future__ import annotations

import datetime

import pytest

from aiomq.claims import LOCKED_RETRY, due_after_empty_claim, merge_next_due
from aiomq.dberrors import Backoff, retrying
from aiomq.wakeup import sleep_delay

NOW = datetime.datetime(2030, 1, 1, 12, 0, 0)
SEC = datetime.timedelta(seconds=1)


def test_backoff_caps_at_the_last_interval() -> None:
    backoff = Backoff([1, 3, 5])
    assert [backoff.delay(a) for a in range(6)] == [1, 3, 5, 5, 5, 5]
    assert backoff.cap == 5
    assert len(backoff) == 3
    assert Backoff([]).intervals == [1.0]


def test_backoff_jitter_stays_within_bounds() -> None:
    backoff = Backoff([2], jitter=0.5)
    delays = [backoff.delay(0) for _ in range(200)]
    assert all(2 <= d <= 2.5 for d in delays)
    assert len(set(delays)) > 1


class Flaky:
    def __init__(self, failures: int, error: type[Exception] = OSError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "ok"


async def test_retrying_retries_until_it_succeeds() -> None:
    slept: list[float] = []
    told: list[tuple[str, int, float]] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    op = Flaky(3)
    result = await retrying(
        op,
        backoff=Backoff([1, 2]),
        give_up=lambda failures, ex: False,
        on_retry=lambda ex, failures, delay: told.append((str(ex), failures, delay)),
        sleep=sleep,
    )
    assert result == "ok"
    assert op.calls == 4
    assert slept == [1, 2, 2]
    assert told == [("failure 1", 0, 1), ("failure 2", 1, 2), ("failure 3", 2, 2)]


async def test_retrying_gives_up_by_the_callers_rule() -> None:
    async def sleep(delay: float) -> None:
        pass

    op = Flaky(10)
    with pytest.raises(OSError, match="failure 3"):
        await retrying(
            op,
            backoff=Backoff([0]),
            give_up=lambda failures, ex: failures >= 2,
            on_retry=lambda *a: None,
            sleep=sleep,
        )
    assert op.calls == 3
    op = Flaky(10, ValueError)
    with pytest.raises(ValueError, match="failure 1"):
        await retrying(
            op,
            backoff=Backoff([0]),
            give_up=lambda failures, ex: isinstance(ex, ValueError),
            on_retry=lambda *a: None,
            sleep=sleep,
        )
    assert op.calls == 1


def test_sleep_until_the_earliest_of_what_the_loop_waits_for() -> None:
    assert sleep_delay(NOW, maintenance_in=60, next_due=None, next_schedule=None) == 60
    assert sleep_delay(NOW, maintenance_in=60, next_due=NOW + 5 * SEC, next_schedule=None) == 5
    assert sleep_delay(NOW, maintenance_in=60, next_due=NOW + 5 * SEC, next_schedule=NOW + 2 * SEC) == 2
    assert sleep_delay(NOW, maintenance_in=1, next_due=NOW + 5 * SEC, next_schedule=NOW + 2 * SEC) == 1
    assert sleep_delay(NOW, maintenance_in=60, next_due=NOW - SEC, next_schedule=None) == -1


def test_after_an_empty_claim() -> None:
    # due jobs exist but are locked elsewhere: look again shortly, not in a spin
    assert due_after_empty_claim(NOW, NOW - SEC) == NOW + LOCKED_RETRY
    assert due_after_empty_claim(NOW, NOW) == NOW + LOCKED_RETRY
    # the hint was early: the database's time wins; nothing pending: wait for a hint
    assert due_after_empty_claim(NOW, NOW + 3 * SEC) == NOW + 3 * SEC
    assert due_after_empty_claim(NOW, None) is None


def test_a_hint_during_the_next_due_query_is_kept_if_earlier() -> None:
    assert merge_next_due(NOW + 5 * SEC, None) == NOW + 5 * SEC
    assert merge_next_due(NOW + 5 * SEC, NOW + SEC) == NOW + SEC
    assert merge_next_due(NOW, NOW + SEC) == NOW
    assert merge_next_due(None, NOW) == NOW
    assert merge_next_due(None, None) is None
