"""Meters for the API account: request rate, adaptive concurrency, and budget.

Each meter is independent and clock-injectable, so its invariants are tested on a fake
clock. ``AccountPacer`` ties the rate and concurrency meters to what the client sees
(429/503/504 answers and successes) through the small ``Pacer`` protocol.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Final, Protocol

import anyio

__all__ = ["AccountPacer", "AdaptiveLimit", "Budget", "Pacer", "RateMeter"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


_ROUND_OFF_S: Final = 1e-9
"""A start due within this is due now: the TAT is a sum of 1/rate steps, and 8 of
them can land a hair above 8/rate (a 1e-16 s "wait" where a burst allows none)."""


class RateMeter:
    """Request starts per second, with a burst allowance (GCRA).

    GCRA keeps one number, the theoretical arrival time (TAT) of the next request. A
    request may start once ``now >= tat - tau`` where ``tau = (burst - 1) / rate``, so
    ``burst`` requests can start at once and then one per ``1 / rate`` seconds. Each
    caller reserves its slot before sleeping, so concurrent callers need no lock and
    never start in the same slot.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if not rate_per_s > 0 or not math.isfinite(rate_per_s):
            raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._interval_s = 1.0 / rate_per_s
        self._tau_s = (burst - 1) * self._interval_s
        self._tat = -math.inf
        self._not_before = -math.inf

    def __repr__(self) -> str:
        return f"RateMeter(rate_per_s={self.rate_per_s}, burst={self.burst})"

    async def acquire(self) -> None:
        """Wait until one more request may start, then count it as started."""
        while True:
            now = self._clock()
            tat = max(self._tat, now)
            self._tat = tat + self._interval_s
            delay = tat - self._tau_s - now
            if delay > _ROUND_OFF_S:
                await self._sleep(delay)
            # A hold_off() may have arrived while this caller slept on its slot: the
            # slot is forfeited and the caller queues again behind the hold.
            if self._clock() + _ROUND_OFF_S >= self._not_before:
                return

    def ready(self) -> bool:
        """Whether a request could start at once."""
        now = self._clock()
        return self._start_at(now) <= now + _ROUND_OFF_S

    def _start_at(self, now: float) -> float:
        return max(max(self._tat, now) - self._tau_s, self._not_before)

    async def wait_ready(self) -> None:
        """Wait until a request could start at once, reserving nothing.

        A caller that composes its request only then (the poller) puts everything
        that came due while requests were scarce into one request.
        """
        while True:
            now = self._clock()
            ready_at = self._start_at(now)
            if ready_at <= now + _ROUND_OFF_S:
                return
            await self._sleep(ready_at - now)

    def hold_off(self, seconds: float) -> None:
        """Start no request before ``now + seconds`` (a Retry-After for the account).

        After the hold, requests resume at the steady rate rather than in a burst.
        """
        if seconds <= 0:
            return
        until = self._clock() + seconds
        if until <= self._not_before:
            return
        self._not_before = until
        self._tat = max(self._tat, until + self._tau_s)
        log.debug("holding off requests for %.2fs", seconds)


class AdaptiveLimit:
    """An AIMD target for tasks in flight: halve on congestion, creep back up.

    ``congested()`` halves the target at most once per ``cooldown_s``, so the burst of
    429s that one overloaded batch produces counts as one signal. ``succeeded()`` adds
    about one per ``value`` successes (one "round trip" of the current window).
    """

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        *,
        cooldown_s: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(
                "need 1 <= minimum <= initial <= maximum, got "
                f"minimum={minimum}, initial={initial}, maximum={maximum}"
            )
        self.minimum = minimum
        self.maximum = maximum
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._level = float(initial)
        self._last_decrease = -math.inf

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimit(value={self.value}, minimum={self.minimum}, "
            f"maximum={self.maximum})"
        )

    @property
    def value(self) -> int:
        """The current target: how many tasks may be in flight now."""
        return max(self.minimum, min(self.maximum, math.floor(self._level)))

    def congested(self) -> None:
        """The API pushed back: halve the target, once per cooldown."""
        now = self._clock()
        if now - self._last_decrease < self.cooldown_s:
            return
        self._last_decrease = now
        before = self.value
        self._level = max(float(self.minimum), self._level * 0.5)
        log.debug("congestion: in-flight target %d -> %d", before, self.value)

    def succeeded(self, n: int = 1) -> None:
        """``n`` requests went through: grow the target by about n / value."""
        if n <= 0:
            return
        self._level = min(float(self.maximum), self._level + n / self.value)


def _require_decimal(name: str, value: object) -> Decimal:
    if not isinstance(value, Decimal):
        raise TypeError(f"{name} must be a Decimal, got {type(value).__name__}")
    return value


class Budget:
    """A hard USD cap: reserve a task's estimate before submitting, settle on result.

    Money is Decimal only: floats are refused so the ledger sums to the cent.
    """

    def __init__(
        self, cap_usd: Decimal | None, spent_usd: Decimal = Decimal(0)
    ) -> None:
        if cap_usd is not None:
            _require_decimal("cap_usd", cap_usd)
            if cap_usd < 0:
                raise ValueError(f"cap_usd must not be negative, got {cap_usd}")
        self.cap_usd = cap_usd
        self._spent = _require_decimal("spent_usd", spent_usd)
        self._reserved = Decimal(0)

    def __repr__(self) -> str:
        return (
            f"Budget(cap_usd={self.cap_usd}, spent_usd={self._spent}, "
            f"reserved_usd={self._reserved})"
        )

    @property
    def spent_usd(self) -> Decimal:
        return self._spent

    @property
    def reserved_usd(self) -> Decimal:
        return self._reserved

    @property
    def remaining_usd(self) -> Decimal | None:
        """What may still be reserved; None without a cap. Never negative."""
        if self.cap_usd is None:
            return None
        return max(Decimal(0), self.cap_usd - self._spent - self._reserved)

    @property
    def exhausted(self) -> bool:
        """True when nothing more can be reserved."""
        remaining = self.remaining_usd
        return remaining is not None and remaining <= 0

    def try_reserve(self, amount: Decimal) -> bool:
        """Reserve ``amount`` if it fits under the cap; False (and no change) if not."""
        _require_decimal("amount", amount)
        if amount < 0:
            raise ValueError(f"amount must not be negative, got {amount}")
        if (
            self.cap_usd is not None
            and self._spent + self._reserved + amount > self.cap_usd
        ):
            return False
        self._reserved += amount
        return True

    def commit(self, amount: Decimal) -> None:
        """Reserve money already committed (a task an earlier run sent): it is
        paid when it finishes, so it counts even past the cap."""
        _require_decimal("amount", amount)
        if amount < 0:
            raise ValueError(f"amount must not be negative, got {amount}")
        self._reserved += amount

    def settle(self, reserved: Decimal, actual: Decimal) -> None:
        """Release a reservation and record what the API actually charged."""
        _require_decimal("actual", actual)
        self.release(reserved)
        self._spent += actual

    def release(self, reserved: Decimal) -> None:
        """Give back a reservation that will not be charged (task failed, not sent)."""
        _require_decimal("reserved", reserved)
        if reserved < 0 or reserved > self._reserved:
            raise ValueError(
                f"cannot release {reserved}: only {self._reserved} is reserved"
            )
        self._reserved -= reserved


class Pacer(Protocol):
    """What the client calls around each request, so it holds no pacing policy."""

    async def before_request(self) -> None:
        """Wait until a request may start."""

    def congested(self, retry_after_s: float | None) -> None:
        """The API answered 429/503/504 (with its Retry-After, if any)."""

    def relieved(self) -> None:
        """The API answered 2xx."""


class AccountPacer:
    """The account-wide Pacer: a rate meter plus the adaptive in-flight target."""

    def __init__(
        self, rate: RateMeter, limit: AdaptiveLimit, *, default_hold_s: float = 1.0
    ) -> None:
        self.rate = rate
        self.limit = limit
        self.default_hold_s = default_hold_s

    def __repr__(self) -> str:
        return f"AccountPacer(rate={self.rate!r}, limit={self.limit!r})"

    async def before_request(self) -> None:
        await self.rate.acquire()

    def congested(self, retry_after_s: float | None) -> None:
        hold = self.default_hold_s if retry_after_s is None else retry_after_s
        self.rate.hold_off(hold)
        self.limit.congested()

    def relieved(self) -> None:
        self.limit.succeeded()
