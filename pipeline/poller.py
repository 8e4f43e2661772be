"""Poll timing: when to ask about each task in flight and which tasks share a
getResponse. The submit path hands it each sent task, and the replies each answer's
verdicts; its loop hands each due question to the replies to send and handle."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from pipeline.client import PollOutcome
from pipeline.config import Settings
from pipeline.dialect import PollBatching, PollMode
from pipeline.flow import Signal, cancel_at
from pipeline.latency import LatencyEstimate
from pipeline.limits import RateMeter
from pipeline.records import Flight

log = logging.getLogger(__name__)

_REASK_AGE_SHARE: Final = 0.02
"""A task still processing is asked again within this share of its age: before the
latency is learnt, a gap growing 1.5x from 10 ms overshoots a slow first round."""
_REASK_AGE_SHARE_IDLE: Final = 0.10
"""The same share while no task waits for a slot (a job that fits in one round, or
its last round): a result seen sooner then frees a slot nobody takes, so precision
only shortens the wait for the job's last images, by at most this share of their
age."""
_RIDE_ALONG_SHARE: Final = 0.5
"""A question going out anyway also carries, in its request's spare room, the tasks
still processing whose next question is at least this share of its wait away from
their last one (see Poller._riders): tasks sent a few at a time then share requests
instead of each keeping a clock of its own. Riding costs no request, only a question
asked sooner."""


class Poller:
    """Times the questions about the tasks in flight and runs the loop that asks
    them: the first when the latency estimate says a task is done, then less and
    less often; several due tasks (and some about due) in one request.

    ``ask`` sends one getResponse about its tasks and handles the answer
    (``replies``); ``tasks_waiting`` says whether tasks not yet sent remain.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        clock: Callable[[], float],
        rate: RateMeter,
        ask: Callable[[list[Flight]], Awaitable[None]],
        tasks_waiting: Callable[[], bool],
        poll_mode: PollMode = PollMode.UNKNOWN,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._rate = rate
        self._ask = ask
        self._tasks_waiting = tasks_waiting
        self.latency = LatencyEstimate()
        self._polling: dict[str, Flight] = {}
        self._wakeup = Signal()
        self._floor = math.inf
        """At or below every task's next question time (inf: being asked, or none):
        lowered by each ask_at, set exactly by the loop's scans. While now is
        short of it nothing can be due, and a wake-up (one per answer and submit)
        skips the scan of all tasks in flight (most scans found nothing due)."""
        self.batching = PollBatching(poll_mode, settings.limits.poll_batch)

    # ------------------------------------------------------------- the engine's

    def first_delay(self) -> float:
        """Ask first when the task is expected to be done, never sooner than
        ``poll.first_after_s``."""
        poll = self._settings.poll
        first = self.latency.first_question()
        return max(poll.first_after_s, poll.interval_s if first is None else first)

    def gap(self) -> float:
        poll = self._settings.poll
        gap = self.latency.gap(poll.min_interval_s)
        if gap is None:  # nothing learnt yet
            gap = max(poll.min_interval_s, LatencyEstimate.GAP_SHARE * poll.interval_s)
        return min(poll.max_interval_s, gap)

    def ask_at(self, flight: Flight, at: float) -> None:
        """Time ``flight``'s next question. Every finite time is set here: it keeps
        the poller's floor (see run) at or below all of them."""
        flight.next_poll_at = at
        if at < self._floor:
            self._floor = at

    def wake(self) -> None:
        self._wakeup.notify()

    def track(self, flight: Flight) -> None:
        """Ask about ``flight`` (taken over from an earlier run) at its
        ``next_poll_at``."""
        self.ask_at(flight, flight.next_poll_at)
        self._polling[flight.task_uuid] = flight

    def schedule_first(self, flights: list[Flight], now: float) -> None:
        """Time the first question about each of ``flights``, sent at ``now``."""
        first_at, gap = now + self.first_delay(), self.gap()
        for flight in flights:
            self.ask_at(flight, first_at)
            flight.backoff_s = gap
            self._polling[flight.task_uuid] = flight

    def get(self, task_uuid: str) -> Flight | None:
        """The task in flight under ``task_uuid``, if any."""
        return self._polling.get(task_uuid)

    def forget(self, flight: Flight) -> None:
        """No more questions about ``flight`` (done, failed or given up)."""
        self._polling.pop(flight.task_uuid, None)

    def ask_again(self, flights: list[Flight], now: float) -> None:
        """Time the next question about each of ``flights``, still unfinished at an
        answer received at ``now``: after its backoff, which grows 1.5x a time up
        to a share of the task's age."""
        share = self._reask_age_share()
        gap, longest = self.gap(), self._settings.poll.max_interval_s
        for flight in flights:
            self.ask_at(flight, now + flight.backoff_s)
            flight.backoff_s = min(
                flight.backoff_s * 1.5,
                longest,
                max(gap, share * (now - flight.submitted_at)),
            )

    def observe_latency(self, flight: Flight, done_by: float) -> None:
        """Learn when to first ask about a task from when this one was done: by
        ``done_by``, after the last question that found it processing."""
        if not flight.teaches_latency:
            return
        busy_at = flight.last_processing_at
        learnt = self.latency.value is not None
        self.latency.observe(
            done_by=done_by - flight.submitted_at,
            busy_at=None if busy_at is None else busy_at - flight.submitted_at,
        )
        if not learnt:
            # The tasks put off while learning (_sample_while_learning); one not
            # found yet waits to be visible, not to be done, and keeps its timing.
            self._ask_by_estimate(
                lambda f: f.teaches_latency and not f.finished and not f.not_found
            )

    def judge_first_questions(
        self, flights: list[Flight], outcome: PollOutcome, asked_at: float
    ) -> None:
        """Tell the latency estimate whether a first question came too late."""
        firsts = [f for f in flights if f.asks == 0 and f.teaches_latency]
        for flight in flights:
            flight.asks += 1
        if not firsts:
            return
        done = {r.task_uuid for r in outcome.results}
        asked_after = asked_at - max(f.submitted_at for f in firsts)
        if any(f.task_uuid in outcome.processing for f in firsts):
            self.latency.first_questions(all_done=False, asked_after=asked_after)
        elif all(f.task_uuid in done for f in firsts) and self.latency.first_questions(
            all_done=True, asked_after=asked_after
        ):
            # The cut is put to the test now, not a latency later: first questions
            # not yet asked go when the new estimate says.
            self._ask_by_estimate(lambda f: f.asks == 0)

    def judge_batch(self, flights: list[Flight], outcome: PollOutcome) -> bool:
        """Let one answer judge batched getResponse (``dialect.PollBatching``) on the
        tasks the API is known to hold; returns whether the mode changed."""
        if len(flights) < 2 or self.batching.mode is not PollMode.UNKNOWN:
            return False
        known = {f.task_uuid for f in flights if f.acked or f.seen}
        asked = [f.task_uuid for f in flights]
        return self.batching.judge(
            asked, outcome.answered, known, refused=outcome.batch_refused
        )

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Ask about every due task, without waiting for earlier questions' answers.

        A task being asked about has ``next_poll_at`` = inf until its answer sets
        the next one, so it is never in two questions at once; a cohort coming due
        while another's answer is on its way is asked on time.
        """
        async with anyio.create_task_group() as asking:
            while True:
                batch = self.batching.size
                now = self._clock()
                coalesce = self.gap()
                due_by = now + coalesce / 2
                if due_by < self._floor:
                    due = []
                else:
                    due = [
                        f
                        for f in self._polling.values()
                        if not f.finished and f.next_poll_at <= due_by
                    ]
                    if not due:
                        self._floor = min(
                            (
                                f.next_poll_at
                                for f in self._polling.values()
                                if not f.finished
                            ),
                            default=math.inf,
                        )
                if not due:
                    # No await since the scan: a wake-up now finds us waiting.
                    wait_s = max(self._floor - now, 0.0)
                    with cancel_at(anyio.current_time() + wait_s):
                        await self._wakeup.wait()
                    continue
                if not self._rate.ready():
                    # Requests are scarce: ask once one may start, about all that is
                    # due by then, rather than queue a question per tick.
                    await self._rate.wait_ready()
                    continue
                if self.latency.value is None:
                    due = self._sample_while_learning(due, now)
                else:
                    due += self._riders(len(due), now, due_by, batch)
                for flight in due:
                    flight.next_poll_at = math.inf
                for start in range(0, len(due), batch):
                    asking.start_soon(self._ask_chunk, due[start : start + batch])

    async def _ask_chunk(self, flights: list[Flight]) -> None:
        try:
            await self._ask(flights)
        finally:
            self.wake()  # their next questions are due at new times

    def _riders(
        self, due_count: int, now: float, due_by: float, batch: int
    ) -> list[Flight]:
        """Tasks not due by ``due_by`` that fit in the last request of the
        ``due_count`` due ones (never one more request).

        A task seen processing rides at least _RIDE_ALONG_SHARE of the way from its
        last question to its next. One not yet asked rides within a re-ask gap of
        its first question (asked now, its next question comes about when the first
        would have: first questions of tasks sent a few at a time each took a
        request of their own), or within the latency's spread of it: first
        questions lead the estimate by one spread (LatencyEstimate.SPREAD_LEAD),
        and a task done early in the spread waited for its question. Not within a
        share of its age: at a steady latency that is far earlier than a re-ask gap,
        so riders met "processing" and then re-asks growing 1.5x; a varying
        latency's gap is that share anyway. Re-asks go first, the furthest on their
        way; then first questions, the nearest due.
        """
        room = -due_count % batch
        if not room:
            return []
        first_within = self.gap()
        ready: list[tuple[float, Flight]] = []
        for flight in self._polling.values():
            at = flight.next_poll_at
            if flight.finished or at <= due_by or at == math.inf:
                continue  # done, due, or being asked
            busy_at = flight.last_processing_at
            if busy_at is not None:
                part = (now - busy_at) / (at - busy_at)
                if part >= _RIDE_ALONG_SHARE:
                    ready.append((part, flight))
            elif flight.acked and not flight.ambiguous and not flight.asks:
                early = at - now
                if early <= max(first_within, self.latency.spread):
                    ready.append((-early, flight))
        if len(ready) > room:
            ready.sort(key=lambda pair: pair[0], reverse=True)
        return [flight for _, flight in ready[:room]]

    def _sample_while_learning(self, due: list[Flight], now: float) -> list[Flight]:
        """Before anything has finished, ask only about one request's worth of the
        tasks sent first; the rest wait until the latency is learnt
        (observe_latency then asks about them by the estimate).

        They are all in the same state, and those sent later finish later: asking
        about all of them every 2% of their age made many requests that told
        nothing new.
        """
        learners = [
            f for f in self._polling.values() if f.teaches_latency and not f.finished
        ]
        if len(learners) <= self.batching.size:
            return due
        learners.sort(key=lambda f: f.submitted_at)  # stable: send order within one
        sample = {id(f) for f in learners[: self.batching.size]}
        gap = self.gap()
        asked: list[Flight] = []
        for flight in due:
            if not flight.teaches_latency or id(flight) in sample:
                asked.append(flight)
            else:  # comes due again only to be put off, until the latency is known
                self.ask_at(
                    flight,
                    now + max(gap, _REASK_AGE_SHARE * (now - flight.submitted_at)),
                )
        return asked

    def _ask_by_estimate(self, wanted: Callable[[Flight], bool]) -> None:
        """Bring the next question about each ``wanted`` task (not being asked about
        now) forward to when the latency estimate says it is done; past: at once."""
        first = self.latency.first_question()
        if first is None:
            return
        for flight in self._polling.values():
            if flight.next_poll_at != math.inf and wanted(flight):
                self.ask_at(
                    flight, min(flight.next_poll_at, flight.submitted_at + first)
                )
        self.wake()

    def _reask_age_share(self) -> float:
        """Within which share of its age a task still processing is asked again."""
        return _REASK_AGE_SHARE if self._tasks_waiting() else _REASK_AGE_SHARE_IDLE
