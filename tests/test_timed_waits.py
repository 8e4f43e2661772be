"""Timed waits in the engine (flow.cancel_at) on uvloop's millisecond clock.

uvloop's clock and timers count whole milliseconds and round a delay to the nearest
one; anyio re-arms a deadline's timer whenever it fires before ``current_time()``
has reached the deadline. A deadline between two ticks therefore spun the loop until
the clock ticked over. The engine's timed waits put their deadlines on the
millisecond grid. The spin itself is counted as the timers the loop is asked to
arm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.flow import cancel_at, on_ms_grid


@given(st.floats(0.0, 1e7, allow_nan=False))
def test_a_deadline_goes_up_to_the_next_whole_millisecond(deadline: float) -> None:
    rounded = on_ms_grid(deadline)
    assert deadline <= rounded < deadline + 0.001 + 1e-9
    assert math.isclose(rounded * 1000, round(rounded * 1000), abs_tol=1e-6)


def test_no_deadline_stays_no_deadline() -> None:
    assert on_ms_grid(math.inf) == math.inf


def _rearms_per_wait(make_scope: Callable[[float], anyio.CancelScope]) -> float:
    """Timers armed per timed-out wait of ~10 ms, on uvloop (the loop's ``call_at``,
    counted on a loop of our own: a wait arms one, a spin re-arms it again and again).
    """
    uvloop = pytest.importorskip("uvloop")
    calls = 0

    class CountingLoop(uvloop.Loop):  # type: ignore[misc, name-defined]
        def call_at(self, when: float, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return super().call_at(when, *args, **kwargs)

    waits = 20

    async def main() -> None:
        never = anyio.Event()
        for i in range(waits):
            with make_scope(0.0102 + 0.0013 * (i % 7)):
                await never.wait()

    anyio.run(main, backend="asyncio", backend_options={"loop_factory": CountingLoop})
    return calls / waits


def test_a_timed_wait_on_the_grid_does_not_spin_the_loop() -> None:
    on_grid = _rearms_per_wait(lambda s: cancel_at(anyio.current_time() + s))
    assert on_grid <= 3
    # what it replaced: the same waits off the grid re-armed many times each
    off_grid = _rearms_per_wait(anyio.move_on_after)
    assert off_grid > 3 * on_grid
