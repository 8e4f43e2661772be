"""The primitives the engine's stages hand work and wake-ups through: signals, queues,
the slot gate, timed waits on the event loop's millisecond grid."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


class Signal:
    """A reusable wake-up for "something changed": waiters share one event, made
    only when someone waits (``anyio.Event()`` costs a backend lookup, and most
    changes, one per task or image, find nobody waiting)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


def on_ms_grid(deadline: float) -> float:
    """``deadline`` rounded up to a whole millisecond (infinity stays infinite).

    uvloop's clock and timers count whole milliseconds and round a delay to the
    nearest one, so a timer for a deadline between two ticks fired up to 0.5 ms
    early; anyio found the deadline not yet reached and re-armed the timer, which
    fired again at once, until the clock ticked over.
    """
    return deadline if math.isinf(deadline) else math.ceil(deadline * 1000) / 1000


def cancel_at(deadline: float) -> anyio.CancelScope:
    """A scope that ends at ``deadline`` (``anyio.current_time()``), on the grid."""
    return anyio.CancelScope(deadline=on_ms_grid(deadline))


async def send(stream: MemoryObjectSendStream[T], item: T) -> None:
    """Send, yielding to the loop only when the stream is full (``send`` always
    checkpoints first: one extra loop turn per image at each stage)."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


async def receive(stream: MemoryObjectReceiveStream[T]) -> T:
    """Receive, yielding to the loop only when nothing is queued.

    Raises:
        anyio.EndOfStream: the stream is closed and empty.
    """
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        return await stream.receive()


class UrgentRequests:
    """Counts the requests that hold concurrency slots idle until answered (submits,
    polls); downloads wait until none is out, for a bounded time.

    When a cohort finishes, its downloads, the next submit and the other cohorts'
    polls all go at once, and the event loops work through them in arrival order:
    downloads first delayed every slot of the next submit, while a download a few ms
    later costs nothing.
    """

    __slots__ = ("_none_out", "_timed", "count")

    def __init__(self) -> None:
        self.count = 0
        self._none_out = Signal()
        self._timed = False
        """A waiter is timing the bound for all that wait with it."""

    @contextlib.contextmanager
    def out(self) -> Iterator[None]:
        """Around one urgent request, from its send to its answer."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self._none_out.notify()

    async def wait_none_out(self, at_most_s: float) -> None:
        """Return at a moment when no urgent request is out, or after ``at_most_s``.

        Woken waiters go without looking again: a new request sent before they run
        would otherwise wake and re-park every waiting download, once per request.
        The first waiter times the bound and wakes the others when it is up: one
        timer for a cohort's downloads, not one each.
        """
        if not self.count:
            return
        if self._timed:
            await self._none_out.wait()
            return
        self._timed = True
        try:
            with cancel_at(anyio.current_time() + at_most_s):
                await self._none_out.wait()
        finally:
            self._timed = False
            self._none_out.notify()


class SlotGate:
    """Counts tasks in flight against a limit that AIMD may move."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self.in_flight = 0
        self.peak = 0
        self._changed = Signal()
        self._interrupted = False

    def _notify(self) -> None:
        self._changed.notify()

    @property
    def free(self) -> int:
        return max(0, self._limit() - self.in_flight)

    def interrupt(self) -> None:
        """From now on ``acquire`` returns 0 instead of waiting (a stop)."""
        self._interrupted = True
        self._notify()

    async def acquire(self, want: int) -> int:
        """Take between 1 and ``want`` slots, as many as are free once one is (a
        cohort's slots free together anyway, with the poll answer that frees them).
        Returns 0 once interrupted.
        """
        while self.free == 0:
            if self._interrupted:
                return 0
            await self._changed.wait()
        take = min(want, self.free)
        self.force_acquire(take)
        return take

    def force_acquire(self, n: int = 1) -> None:
        self.in_flight += n
        self.peak = max(self.peak, self.in_flight)

    def release(self, n: int = 1) -> None:
        self.in_flight -= n
        self._notify()


class Queue(Generic[T]):
    """A FIFO between stages: ``put`` waits while ``bound`` items are queued;
    ``put_urgent`` and ``extend`` never wait. Its producer may ``close`` it: its
    consumer's ``take_next`` then ends once it is empty."""

    def __init__(self, bound: int) -> None:
        self._items: deque[T] = deque()
        self._bound = bound
        self._changed = Signal()
        self.closed = False

    def close(self) -> None:
        """Nothing more will be put."""
        self.closed = True
        self._notify()

    async def take_next(self, most: int) -> list[T]:
        """Up to ``most`` items once there are any; [] once closed and empty."""
        while not self._items:
            if self.closed:
                return []
            await self._changed.wait()
        return self.take(most)

    def __len__(self) -> int:
        return len(self._items)

    def _notify(self) -> None:
        self._changed.notify()

    async def wait_for_room(self) -> None:
        while len(self._items) >= self._bound:
            await self._changed.wait()

    async def wait_for_any(self) -> None:
        while not self._items:
            await self._changed.wait()

    async def put(self, item: T) -> None:
        await self.wait_for_room()
        if self.closed:
            raise RuntimeError("put on a closed Queue")
        self._items.append(item)
        self._notify()

    def put_urgent(self, item: T) -> None:
        self._items.appendleft(item)
        self._notify()

    def extend(self, items: Iterable[T]) -> None:
        self._items.extend(items)
        self._notify()

    def take(self, most: int) -> list[T]:
        out = [self._items.popleft() for _ in range(min(most, len(self._items)))]
        self._notify()
        return out

    def drain(self) -> list[T]:
        return self.take(len(self._items))


async def watch_signals(
    *,
    grace_s: float,
    draining: Callable[[], bool],
    drain: Callable[[], None],
    stop_now: Callable[[], None],
) -> None:
    """SIGINT or SIGTERM: ``drain`` (no new submits), and ``stop_now`` after
    ``grace_s``; one while already ``draining``: ``stop_now`` at once."""
    log = logging.getLogger("pipeline.engine")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:
            async for signum in signals:
                name = signal.Signals(signum).name
                if draining():
                    log.warning("second %s: stopping now", name)
                    stop_now()
                    break
                log.warning(
                    "%s: no new submits; waiting up to %.0fs for in-flight tasks "
                    "(press Ctrl-C again to stop at once; rerun to resume)",
                    name,
                    grace_s,
                )
                drain()
                group.start_soon(_stop_after, grace_s, stop_now)
            group.cancel_scope.cancel()


async def _stop_after(delay_s: float, stop_now: Callable[[], None]) -> None:
    await anyio.sleep(delay_s)
    stop_now()
