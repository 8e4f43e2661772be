"""The submit path: reserve budget and journal each task as ``submitted`` (the
journaler), send journaled tasks as slots free up (the submitters), and act on each
submit's answer, down to stopping for credit.

Why a room of its own: it holds the "never pay twice" order (a task's ``submitted``
line is durable before its request leaves) and the journal-ahead that keeps a freed
slot from waiting for an fsync; nothing else sends a task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Final, Protocol

import anyio
from anyio.abc import TaskGroup

from pipeline.accounts import Accounts
from pipeline.answers import SubmitOutcome
from pipeline.client import CREDIT_HINT, RunwareClient
from pipeline.config import Settings
from pipeline.errors import AuthError, StorageError
from pipeline.feed import inherited_uploads
from pipeline.flow import Queue, SlotGate, UrgentRequests
from pipeline.journal_events import Event, SentEvent, SubmittedEvent, utc_now
from pipeline.limits import AdaptiveLimit
from pipeline.poller import Poller
from pipeline.records import Flight, Prepared, lost_event
from pipeline.references import ReferenceUploader
from pipeline.wire import ErrorItem, ImageResult

log = logging.getLogger(__name__)

SUBMITTERS: Final = 2
"""Two submits may be in flight: slots freed while one waits for its answer go out
with the other."""


class Append(Protocol):
    async def __call__(self, *events: Event) -> None: ...


class Replies(Protocol):
    """What a submit's answer hands on (``replies.Replies``)."""

    async def take_results(
        self, results: list[ImageResult], by_uuid: dict[str, Flight]
    ) -> None: ...

    async def fail(self, flight: Flight, error: ErrorItem) -> None: ...


class Sending:
    """The journaler and the submitters of one run, and what a submit's answer
    means for the tasks it carried."""

    def __init__(
        self,
        *,
        settings: Settings,
        clock: Callable[[], float],
        accounts: Accounts,
        client: RunwareClient,
        uploader: ReferenceUploader,
        gate: SlotGate,
        adaptive: AdaptiveLimit,
        backlog: Queue[Prepared],
        ready: Queue[Flight],
        poller: Poller,
        urgent: UrgentRequests,
        append: Append,
        draining: anyio.Event,
        request_stop: Callable[[str, str], None],
        replies: Callable[[], Replies],
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._accounts = accounts
        self._client = client
        self._uploader = uploader
        self._gate = gate
        self._adaptive = adaptive
        self._backlog = backlog
        self._ready = ready
        self._poller = poller
        self._urgent = urgent
        self._append = append
        self._draining = draining
        self._request_stop = request_stop
        self._replies = replies
        self._batch_max = settings.limits.submit_batch
        self._sent = SentLog(append)

    def start(self, tg: TaskGroup) -> None:
        """Start the journaler, the submitters and the sent log in ``tg``."""
        tg.start_soon(self._sent.run)
        tg.start_soon(self._journaler)
        for _ in range(SUBMITTERS):
            tg.start_soon(self._submitter)

    # ------------------------------------------------------------ the journaler

    async def _journaler(self) -> None:
        """Reserve budget for the next tasks and journal them as ``submitted``;
        done once the feeder has closed the backlog and it is empty.

        This runs ahead of the submitters, so the fsync that must precede a submit
        is not paid while a concurrency slot sits idle: a freed slot goes straight
        to a task whose ``submitted`` line is already durable. At most ``_ready``'s
        bound of journaled tasks wait unsent; a crash leaves them pending, and the
        rerun's questions about them find them unknown and send them again.
        """
        while True:
            await self._ready.wait_for_room()
            items = await self._backlog.take_next(self._batch_max)
            if not items:
                return
            flights = await self._journal(items)
            self._ready.extend(flights)

    async def admit_again(self, item: Prepared) -> None:
        """Journal a task going again under a new taskUUID and queue it first for
        a slot. It never waits for room: the poller sending it could otherwise
        block the very completions that free room (a deadlock)."""
        for flight in await self._journal([item]):
            self._ready.put_urgent(flight)

    async def _journal(self, items: list[Prepared]) -> list[Flight]:
        """Reserve and journal ``items``; those the budget or a stop refuses end
        unsent."""
        if self._draining.is_set():
            self._accounts.unsent(items)
            return []
        wall = utc_now()  # one timestamp for the batch: one append, one moment
        flights: list[Flight] = []
        for item in items:
            # Task by task: those reserved before the budget ran out still go
            # out; none after it (a task going again may still fit).
            if self._draining.is_set() or (
                not self._accounts.admitting and item.replaces is None
            ):
                self._accounts.unsent([item])
            elif (per_image := self._accounts.reserve(item.spec)) is not None:
                flights.append(self._new_flight(item, wall, per_image))
            else:
                self._accounts.unsent([item])
        if flights and self._draining.is_set():  # a stop: none of them goes out
            self._accounts.unsent(flights)
            return []
        if flights:
            await self._append(  # durable BEFORE any of them is sent
                *(
                    SubmittedEvent(
                        ts=wall,
                        key=flight.spec.key,
                        task_uuid=flight.task_uuid,
                        images=flight.spec.images,
                        estimate_usd=flight.reserved_per_image * flight.spec.images,
                        replaces=flight.replaces,
                    )
                    for flight in flights
                )
            )
        return flights

    def _new_flight(self, item: Prepared, wall: datetime, per_image: Decimal) -> Flight:
        return Flight(
            spec=item.spec,
            task_uuid=item.task_uuid,
            request=item.request,
            wire=item.request.wire,
            submitted_at=self._clock(),
            submitted_wall=wall,
            reserved_per_image=per_image,
            next_poll_at=math.inf,
            backoff_s=self._poller.gap(),
            inherited_uploads=inherited_uploads(self._uploader, item.request),
            replaces=item.replaces,
            holds_slot=False,
        )

    # ------------------------------------------------------------ the submitters

    async def _submitter(self) -> None:
        """Send journaled tasks as concurrency slots free up, many per request."""
        while True:
            await self._ready.wait_for_any()
            if self._draining.is_set():
                await self._unsent(self._ready.drain())
                continue
            want = min(self._batch_max, len(self._ready))
            slots = await self._gate.acquire(want)
            self._accounts.concurrency_now(self._adaptive.value)
            # One left for a rerun while it waited to go again is not sent.
            flights = [f for f in self._ready.take(slots) if not f.finished]
            if len(flights) < slots:  # the other submitter took some meanwhile
                self._gate.release(slots - len(flights))
            if not flights:
                continue
            if self._draining.is_set():
                self._gate.release(len(flights))
                await self._unsent(flights)
                continue
            await self._submit(flights)

    async def _unsent(self, flights: list[Flight]) -> None:
        """Journaled but never sent (a stop): a rerun submits them afresh. One
        waiting to be sent again was sent before: a rerun asks about it again."""
        flights = [f for f in flights if not f.finished]  # ended while waiting
        for flight in flights:
            if flight.resend:
                self._accounts.left_for_rerun(flight)
        flights = [f for f in flights if not f.resend]
        await self._append(*(lost_event(f) for f in flights))
        self._accounts.unsent(flights)

    async def _submit(self, flights: list[Flight]) -> None:
        """One submit request for flights that each hold a slot."""
        now = self._clock()
        wall = utc_now()
        for flight in flights:
            flight.holds_slot = True
            flight.submitted_at = now
            flight.submitted_wall = wall
            if flight.resend:
                flight.last_sent_at = now
        self._poller.schedule_first(flights, now)
        self._accounts.submit_sent(flights)
        self._sent.note(flights)
        try:
            with self._urgent.out():
                outcome = await self._client.submit_wire([f.wire for f in flights])
        except AuthError:
            # A definite refusal: nothing was accepted now, so nothing to poll later
            # (a task sent before is asked about again by a rerun).
            flights = [f for f in flights if not f.finished]  # ended meanwhile
            await self._append(*(lost_event(f) for f in flights if not f.resend))
            for flight in flights:
                if flight.resend:
                    self._accounts.left_for_rerun(flight)
                else:
                    self._accounts.unsent([flight])
            raise
        for flight in flights:
            flight.request = None  # sent: only its wire form is kept, for sidecars
        await self._handle_submit(flights, outcome)
        self._poller.wake()

    async def _handle_submit(
        self, flights: list[Flight], outcome: SubmitOutcome
    ) -> None:
        by_uuid = {f.task_uuid: f for f in flights}
        for sent in flights:
            sent.resend = False
        for task_uuid in [*outcome.accepted, *outcome.already_accepted]:
            if (flight := by_uuid.get(task_uuid)) is not None:
                flight.acked, flight.ambiguous, flight.not_found = True, False, 0
        for task_uuid in outcome.accepted:  # accepted now, sent again or not
            by_uuid[task_uuid].teaches_latency = True
        for task_uuid in outcome.already_accepted:
            # Accepted earlier (a resend, or a retried first send): maybe done.
            self._poller.ask_at(by_uuid[task_uuid], self._clock() + self._poller.gap())
        for task_uuid in outcome.ambiguous:
            if (flight := by_uuid.get(task_uuid)) is not None:
                flight.ambiguous = True
                self._poller.ask_at(
                    flight,
                    self._clock()
                    + min(self._poller.first_delay(), self._settings.poll.interval_s),
                )
        replies = self._replies()
        for task_uuid, error in outcome.failed.items():
            if (flight := by_uuid.get(task_uuid)) is not None:
                await replies.fail(flight, error)
        if outcome.credit_refused:
            refused = [
                by_uuid[u]
                for u in outcome.credit_refused
                if u in by_uuid and not by_uuid[u].finished
            ]
            # Not accepted now; one sent before may have been then: a rerun asks.
            for flight in refused:
                if flight.last_sent_at is not None:
                    self._accounts.left_for_rerun(flight)
            refused = [f for f in refused if f.last_sent_at is None]
            # Definitely not accepted: a rerun sends them afresh.
            await self._append(*(lost_event(f) for f in refused))
            for flight in refused:
                self._accounts.lost(flight)
            self._stop_for_credit(outcome)
        await replies.take_results(outcome.results, by_uuid)

    def _stop_for_credit(self, outcome: SubmitOutcome) -> None:
        """No more submits; what the API accepted is still collected (exit 3)."""
        self._request_stop(
            "credit",
            f"the account has insufficient credit ({outcome.credit_message}): "
            f"{CREDIT_HINT}",
        )


class SentLog:
    """Journals which tasks went out: one ``sent`` line per burst of submits, written
    beside the submit path, never ahead of it.

    For ``remix status`` alone (in flight vs queued), so no submit waits for it; a
    line lost in a crash shows its tasks as queued, and a resume asks about every
    journaled task either way.
    """

    def __init__(self, append: Append) -> None:
        self._append = append
        self._uuids: list[str] = []
        self._wake = anyio.Event()

    def note(self, flights: Iterable[Flight]) -> None:
        """These tasks' request is leaving now."""
        self._uuids.extend(f.task_uuid for f in flights)
        self._wake.set()

    async def run(self) -> None:
        """Write what was noted while the last line was being written, until
        cancelled; then what is left."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self._flush()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._flush()
                except StorageError as exc:  # the run is ending: status only
                    log.warning("could not journal the last sent tasks: %s", exc)

    async def _flush(self) -> None:
        # Dropped once written: cancelled while waiting, they go in the last line.
        uuids = list(self._uuids)
        if uuids:
            await self._append(SentEvent(ts=utc_now(), task_uuids=uuids))
            del self._uuids[: len(uuids)]
