"""Backoff policy: jittered exponential waits, Retry-After, and retrying one HTTP call.

Only errors whose class says ``retryable = True`` are retried (never a string match on
codes). Attempts and the total time spent are both bounded; a server's Retry-After is a
floor on the next wait, never a reason to wait past the total budget.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import anyio

from pipeline.config import RetrySettings
from pipeline.errors import PipelineError

__all__ = ["backoff_waits", "call_with_retry", "retry_after_s"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_JITTER_FLOOR = 0.5
"""A jittered wait is drawn from [0.5, 1.0] x its cap: spread out, never near zero."""


def backoff_waits(
    settings: RetrySettings, rng: random.Random | None = None
) -> Iterator[float]:
    """The waits between attempts: at most ``attempts - 1`` of them.

    The cap doubles from ``wait_initial_s`` up to ``wait_max_s``; with jitter each wait
    is drawn from the upper half of its cap, then raised to the previous wait so the
    sequence never decreases. The sequence stops before a wait that would push the sum
    past ``total_s`` (it is not truncated, so it stays non-decreasing).
    """
    rng = rng or random.Random()
    cap = settings.wait_initial_s
    previous = 0.0
    spent = 0.0
    for _ in range(settings.attempts - 1):
        bounded = min(cap, settings.wait_max_s)
        wait = bounded * rng.uniform(_JITTER_FLOOR, 1.0) if settings.jitter else bounded
        wait = min(max(wait, previous), settings.wait_max_s)
        if spent + wait > settings.total_s:
            return
        yield wait
        spent += wait
        previous = wait
        cap *= 2


def retry_after_s(
    header_value: str | None, now: datetime | None = None
) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date).

    Returns None when the header is missing or unreadable; a date in the past is 0.
    """
    if header_value is None:
        return None
    text = header_value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means "-0000"
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    settings: RetrySettings,
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    on_retry: Callable[[PipelineError, int, float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, retrying only retryable PipelineErrors.

    A ``retry_after_s`` attribute on the error is a floor on the next wait. Time spent
    is the larger of the clock's measure and the sum of waits asked for, so an
    injected no-op ``sleep`` (tests) still sees the ``total_s`` bound.

    Args:
        fn: makes one fresh attempt each call (e.g. one HTTP request).
        settings: attempts, waits and the total time budget.
        sleep: how to wait; tests pass a no-op.
        on_retry: called with (error, attempt number that failed, wait) before waiting.
        clock: monotonic seconds, for the total-time bound.
        rng: the jitter source (seed it for reproducible waits).

    Raises:
        PipelineError: the first non-retryable error at once, or the last retryable
            one when attempts or time run out.
    """
    start = clock()
    waited = 0.0
    waits = backoff_waits(settings, rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except PipelineError as exc:
            if not exc.retryable:
                raise
            wait = next(waits, None)
            if wait is None:
                log.debug("giving up after %d attempts: %s", attempt, exc)
                raise
            floor = getattr(exc, "retry_after_s", None)
            if isinstance(floor, int | float):
                wait = max(wait, float(floor))
            elapsed = max(clock() - start, waited)
            if elapsed + wait > settings.total_s:
                log.debug(
                    "giving up after %d attempts and %.1fs: %s", attempt, elapsed, exc
                )
                raise
            if on_retry is not None:
                on_retry(exc, attempt, wait)
            log.debug("attempt %d failed (%s); retrying in %.2fs", attempt, exc, wait)
            await sleep(wait)
            waited += wait
