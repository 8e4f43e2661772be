"""Tests for the meters: GCRA rate, AIMD concurrency target, budget, account pacer."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import anyio
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.limits import AccountPacer, AdaptiveLimit, Budget, Pacer, RateMeter


class FakeTime:
    """A clock that moves only when someone sleeps (or the test advances it)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


Op = (
    tuple[Literal["acquire"], int]
    | tuple[Literal["idle"], float]
    | tuple[Literal["hold"], float]
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(min_value=1, max_value=20)),
        st.tuples(st.just("idle"), st.floats(min_value=0, max_value=3)),
        st.tuples(st.just("hold"), st.floats(min_value=0, max_value=2)),
    ),
    max_size=30,
)


@settings(deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=20),
    script=ops,
)
async def test_rate_meter_window_bound_and_hold_off(
    rate: float, burst: int, script: list[Op]
) -> None:
    """Starts in any 1 s window are <= rate + burst, and none start inside a hold."""
    fake = FakeTime()
    meter = RateMeter(rate, burst, clock=fake.clock, sleep=fake.sleep)
    starts: list[float] = []
    holds: list[tuple[int, float]] = []
    for op in script:
        match op:
            case ("acquire", n):
                for _ in range(n):
                    await meter.acquire()
                    starts.append(fake.now)
            case ("idle", seconds):
                fake.now += seconds
            case ("hold", seconds):
                meter.hold_off(seconds)
                holds.append((len(starts), fake.now + seconds))
    for i, first in enumerate(starts):
        in_window = sum(1 for t in starts[i:] if t <= first + 1.0)
        assert in_window <= rate + burst
    for first_after, end in holds:
        assert all(t >= end - 1e-9 for t in starts[first_after:])


async def test_rate_meter_burst_then_steady() -> None:
    """A fresh meter lets `burst` requests through at once, then one per interval."""
    fake = FakeTime()
    meter = RateMeter(2.0, 3, clock=fake.clock, sleep=fake.sleep)
    starts = []
    for _ in range(5):
        await meter.acquire()
        starts.append(fake.now - 1000.0)
    assert starts == pytest.approx([0, 0, 0, 0.5, 1.0])


async def test_hold_off_delays_waiters_already_queued() -> None:
    """A hold that arrives while a caller sleeps on its slot still holds that caller."""
    fake = FakeTime()
    held: list[bool] = []

    async def sleep_then_hold(seconds: float) -> None:
        fake.now += seconds
        if not held:
            held.append(True)
            meter.hold_off(5.0)

    meter = RateMeter(1.0, 1, clock=fake.clock, sleep=sleep_then_hold)
    await meter.acquire()  # the first start needs no sleep
    await meter.acquire()  # sleeps 1 s for its slot; the hold lands mid-sleep
    assert fake.now >= 1000.0 + 1.0 + 5.0


async def test_rate_meter_concurrent_callers_get_distinct_slots() -> None:
    """Callers racing on a real clock are spaced by the interval after the burst."""
    meter = RateMeter(200.0, 2)
    starts: list[float] = []

    async def one() -> None:
        await meter.acquire()
        starts.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(one)
    starts.sort()
    assert starts[-1] - starts[0] >= 4 / 200.0 - 1e-3


def test_rate_meter_rejects_bad_settings() -> None:
    """A zero rate or an empty burst is a configuration error."""
    with pytest.raises(ValueError, match="rate_per_s"):
        RateMeter(0, 1)
    with pytest.raises(ValueError, match="burst"):
        RateMeter(1, 0)


def test_adaptive_limit_halves_once_per_cooldown() -> None:
    """A burst of congestion signals halves the target once; later ones halve again."""
    fake = FakeTime()
    limit = AdaptiveLimit(64, 4, 128, cooldown_s=2.0, clock=fake.clock)
    for _ in range(10):
        limit.congested()
    assert limit.value == 32
    fake.now += 2.0
    limit.congested()
    assert limit.value == 16
    for _ in range(5):
        fake.now += 2.0
        limit.congested()
    assert limit.value == 4


def test_adaptive_limit_additive_increase() -> None:
    """About `value` successes raise the target by one, never past the maximum."""
    limit = AdaptiveLimit(10, 1, 12)
    limit.succeeded(10)
    assert limit.value == 11
    for _ in range(100):
        limit.succeeded()
    assert limit.value == 12


@given(
    st.lists(
        st.one_of(st.just(None), st.integers(min_value=1, max_value=50)), max_size=60
    )
)
def test_adaptive_limit_stays_in_bounds(events: list[int | None]) -> None:
    """Whatever happens, minimum <= value <= maximum."""
    fake = FakeTime()
    limit = AdaptiveLimit(8, 2, 40, clock=fake.clock)
    for event in events:
        fake.now += 1.0
        if event is None:
            limit.congested()
        else:
            limit.succeeded(event)
        assert 2 <= limit.value <= 40


def test_adaptive_limit_rejects_bad_bounds() -> None:
    """initial must lie between minimum and maximum."""
    with pytest.raises(ValueError, match="minimum <= initial"):
        AdaptiveLimit(1, 2, 3)


def test_budget_reserve_settle_release() -> None:
    """Reservations count against the cap until settled or released."""
    budget = Budget(Decimal("0.20"))
    assert budget.try_reserve(Decimal("0.08"))
    assert budget.try_reserve(Decimal("0.08"))
    assert not budget.try_reserve(Decimal("0.08"))
    assert budget.reserved_usd == Decimal("0.16")
    assert budget.remaining_usd == Decimal("0.04")
    budget.settle(Decimal("0.08"), Decimal("0.07"))
    budget.release(Decimal("0.08"))
    assert budget.spent_usd == Decimal("0.07")
    assert budget.reserved_usd == 0
    assert budget.remaining_usd == Decimal("0.13")
    assert not budget.exhausted


def test_budget_exhausted_and_uncapped() -> None:
    """A cap reached exactly is exhausted; no cap is never exhausted."""
    budget = Budget(Decimal("0.16"), spent_usd=Decimal("0.08"))
    assert budget.try_reserve(Decimal("0.08"))
    assert budget.exhausted
    free = Budget(None)
    assert free.try_reserve(Decimal(10**9))
    assert free.remaining_usd is None
    assert not free.exhausted


def test_budget_refuses_floats_and_over_release() -> None:
    """Floats are refused, and releasing more than is reserved is a bug."""
    budget = Budget(Decimal(1))
    with pytest.raises(TypeError, match="Decimal"):
        budget.try_reserve(0.08)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Decimal"):
        Budget(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only 0 is reserved"):
        budget.release(Decimal("0.08"))


@given(
    cap=st.decimals(min_value=0, max_value=10, places=2),
    amounts=st.lists(st.decimals(min_value=0, max_value=1, places=2), max_size=40),
)
def test_budget_never_passes_cap(cap: Decimal, amounts: list[Decimal]) -> None:
    """Spent plus reserved never exceeds the cap when costs match reservations."""
    budget = Budget(cap)
    for i, amount in enumerate(amounts):
        if budget.try_reserve(amount) and i % 2:
            budget.settle(amount, amount)
        assert budget.spent_usd + budget.reserved_usd <= cap


async def test_account_pacer() -> None:
    """congested() holds the account off and halves the target; relieved() grows it."""
    fake = FakeTime()
    rate = RateMeter(100.0, 1, clock=fake.clock, sleep=fake.sleep)
    limit = AdaptiveLimit(8, 1, 16, clock=fake.clock)
    pacer: Pacer = AccountPacer(rate, limit)
    await pacer.before_request()
    pacer.congested(3.0)
    assert limit.value == 4
    start = fake.now
    await pacer.before_request()
    assert fake.now >= start + 3.0
    fake.now += 10
    pacer.congested(None)  # no Retry-After: a short default hold
    start = fake.now
    await pacer.before_request()
    assert fake.now >= start + 1.0
    for _ in range(4):
        pacer.relieved()
    assert limit.value == 3


@settings(deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=10),
    taken=st.integers(min_value=0, max_value=30),
    hold=st.floats(min_value=0, max_value=2),
)
# Found in CI: 8 steps of 1/rate summed a hair above 8/rate, a 1e-16 s "wait".
@example(rate=8.84340359043609, burst=9, taken=8, hold=0.0)
@example(rate=1.0, burst=1, taken=0, hold=1.7e-13)  # the same slack for a hold
async def test_wait_ready_ends_when_an_acquire_would_not_wait(
    rate: float, burst: int, taken: int, hold: float
) -> None:
    """wait_ready reserves nothing and returns exactly when acquire would start at
    once: ready() agrees, and the next acquire does not sleep."""
    fake = FakeTime()
    meter = RateMeter(rate, burst, clock=fake.clock, sleep=fake.sleep)
    for _ in range(taken):
        await meter.acquire()
    meter.hold_off(hold)
    start = fake.now
    await meter.wait_ready()
    assert meter.ready()
    waited = fake.now - start
    await meter.wait_ready()  # reserved nothing: still ready, no more waiting
    assert fake.now - start == waited
    before = fake.now
    await meter.acquire()
    assert fake.now == before  # the request starts at once
    if taken < burst and hold == 0:
        assert waited == 0
