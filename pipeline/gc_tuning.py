"""The cyclic garbage collector, run rarely while a job runs: almost all the engine
allocates is freed by reference counting, and full passes scanned every object."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Final

_GC_YOUNG_THRESHOLD: Final = 10_000
"""Allocations (net of frees) between two collections of the youngest generation
while the engine runs, instead of Python's 700 (see `sparing_collector`)."""
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def sparing_collector() -> Iterator[None]:
    """Run the cyclic garbage collector rarely inside this block.

    Almost all a run allocates (requests, answers, coroutines, journal lines) is
    freed by reference counting, yet at the default threshold the collector ran
    often and its full passes scanned every object the process holds. Overlapping
    blocks share one setting; the last one out restores what was there before.
    """
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        young, *older = _gc_saved
        gc.set_threshold(max(young, _GC_YOUNG_THRESHOLD), *older)
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0 and _gc_saved is not None:
            gc.set_threshold(*_gc_saved)
            _gc_saved = None
