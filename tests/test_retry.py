"""Tests for the backoff policy: waits, Retry-After parsing, and call_with_retry."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import RetrySettings
from pipeline.errors import (
    AuthError,
    PipelineError,
    ProtocolError,
    RateLimitedError,
    ServerError,
)
from pipeline.retry import backoff_waits, call_with_retry, retry_after_s

durations = st.floats(min_value=0, max_value=100, allow_nan=False)
retry_settings = st.builds(
    RetrySettings,
    attempts=st.integers(min_value=1, max_value=30),
    wait_initial_s=durations,
    wait_max_s=durations,
    total_s=st.floats(min_value=0, max_value=1000, allow_nan=False),
    jitter=st.booleans(),
)


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Raises the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: PipelineError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@given(retry_settings, st.integers(min_value=0, max_value=2**32))
def test_waits_non_decreasing_capped_and_within_total(
    policy: RetrySettings, seed: int
) -> None:
    """Waits never decrease, never pass wait_max_s, and never sum past total_s."""
    waits = list(backoff_waits(policy, random.Random(seed)))
    assert len(waits) <= policy.attempts - 1
    assert all(0 <= w <= policy.wait_max_s for w in waits)
    assert all(a <= b for a, b in pairwise(waits))
    assert sum(waits) <= policy.total_s + 1e-9


def test_waits_double_without_jitter() -> None:
    """Without jitter the waits are the plain doubling sequence up to the cap."""
    policy = RetrySettings(
        attempts=7, wait_initial_s=0.5, wait_max_s=4, total_s=100, jitter=False
    )
    assert list(backoff_waits(policy)) == [0.5, 1, 2, 4, 4, 4]


def test_waits_stop_at_total() -> None:
    """The sequence ends before a wait that would overrun the total budget."""
    policy = RetrySettings(
        attempts=10, wait_initial_s=1, wait_max_s=100, total_s=7, jitter=False
    )
    assert list(backoff_waits(policy)) == [1, 2, 4]


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("3", 3.0), ("1.5", 1.5), ("-2", 0.0), ("soon", None)],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    """Retry-After in delta-seconds parses; junk and absence give None."""
    assert retry_after_s(header) == expected


def test_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is the time until then, and 0 once it passed."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=42), usegmt=True)
    assert retry_after_s(later, now=now) == pytest.approx(42)
    assert retry_after_s(later, now=now + timedelta(minutes=5)) == 0.0


async def test_retries_then_succeeds() -> None:
    """Retryable errors are retried and the eventual value returned."""
    fake = FakeTime()
    fn = Flaky(ServerError("boom"), ProtocolError("bad body"))
    seen: list[tuple[str, int]] = []
    policy = RetrySettings(attempts=3, wait_initial_s=0, wait_max_s=0)
    result = await call_with_retry(
        fn,
        policy,
        sleep=fake.sleep,
        clock=fake.clock,
        on_retry=lambda exc, n, _w: seen.append((type(exc).__name__, n)),
    )
    assert result == "ok"
    assert fn.calls == 3
    assert seen == [("ServerError", 1), ("ProtocolError", 2)]


async def test_non_retryable_raised_at_once() -> None:
    """A non-retryable error propagates on the first attempt, with no wait."""
    fake = FakeTime()
    fn = Flaky(AuthError("no key"))
    with pytest.raises(AuthError, match="no key"):
        await call_with_retry(fn, RetrySettings(), sleep=fake.sleep, clock=fake.clock)
    assert fn.calls == 1
    assert fake.sleeps == []


async def test_exhausted_reraises_last_error() -> None:
    """When attempts run out the last retryable error is raised."""
    fake = FakeTime()
    fn = Flaky(*(ServerError(f"boom {i}") for i in range(10)))
    policy = RetrySettings(attempts=4, wait_initial_s=0, wait_max_s=0)
    with pytest.raises(ServerError, match="boom 3"):
        await call_with_retry(fn, policy, sleep=fake.sleep, clock=fake.clock)
    assert fn.calls == 4


@settings(deadline=None)
@given(floor=st.floats(min_value=0, max_value=50, allow_nan=False))
async def test_retry_after_is_a_floor(floor: float) -> None:
    """A retry_after_s on the error raises the wait to at least that many seconds."""
    fake = FakeTime()
    fn = Flaky(RateLimitedError("slow down", retry_after_s=floor))
    policy = RetrySettings(attempts=2, wait_initial_s=0.1, wait_max_s=1, total_s=100)
    assert await call_with_retry(fn, policy, sleep=fake.sleep, clock=fake.clock)
    assert len(fake.sleeps) == 1
    assert fake.sleeps[0] >= floor
    assert fake.sleeps[0] >= 0.05


async def test_retry_after_past_total_gives_up() -> None:
    """A Retry-After beyond the total budget ends the retries instead of waiting."""
    fake = FakeTime()
    fn = Flaky(RateLimitedError("slow down", retry_after_s=500))
    policy = RetrySettings(attempts=5, wait_initial_s=0, wait_max_s=0, total_s=60)
    with pytest.raises(RateLimitedError, match="slow down"):
        await call_with_retry(fn, policy, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


async def test_total_time_bounds_waits_with_noop_sleep() -> None:
    """The total budget holds even when sleep does not move the clock."""
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    fn = Flaky(*(ServerError("boom") for _ in range(50)))
    policy = RetrySettings(attempts=50, wait_initial_s=1, wait_max_s=1, total_s=3.5)
    with pytest.raises(ServerError):
        await call_with_retry(fn, policy, sleep=no_sleep)
    assert sum(sleeps) <= 3.5


@settings(deadline=None)
@given(retry_settings, st.integers(min_value=0, max_value=2**32))
async def test_attempts_and_time_bounded(policy: RetrySettings, seed: int) -> None:
    """An always-failing call is attempted at most `attempts` times within total_s."""
    fake = FakeTime()
    fn = Flaky(*(ServerError("boom") for _ in range(policy.attempts + 1)))
    with pytest.raises(ServerError):
        await call_with_retry(
            fn, policy, sleep=fake.sleep, clock=fake.clock, rng=random.Random(seed)
        )
    assert 1 <= fn.calls <= policy.attempts
    assert fake.now <= policy.total_s + 1e-9
