"""The worker pool: feed, submit (batched), one poller, fetch, store; one task group.

Why this shape:
- *Concurrency means tasks in flight at the API.* A slot is taken when a task is
  sent and given back as soon as the API has answered with all its images (or it
  failed); downloading and writing them overlap the next tasks, and bounded queues
  keep memory in check. ``submitted`` lines are journaled ahead, so no slot waits
  for an fsync.
- *Requests per image well below one.* Submits carry many tasks; one poller asks about
  every due taskUUID in batched getResponse requests. Each task is polled first when it
  is expected to be done (from the latency observed so far), then less and less often.
- *Never pay twice.* A ``submitted`` event is fsync'd before the request leaves. A
  submit whose outcome is unknown is settled by ``settle``'s rule: polled first, then
  sent again under the SAME taskUUID, which the API refuses if it has it.
- *Survive every dialect.* What an answer means is ``answers``'; whether getResponse
  may be batched, and what "processing" proves, is learnt (``dialect``) and kept in
  the run dir.
- *Credit running out stops submitting, not collecting.* Refused tasks wait for the
  next run; everything the API accepted is still polled, stored and billed.
- *The budget is a hard cap.* Each task's estimated cost is reserved before its submit.
- *One writer per resource.* Only the collector changes the summary and progress; the
  journal is appended under one lock so the ``submitted``-before-send order holds.

Here: the stages' wiring, what each answer means, and the run's accounting. Beside
it: what to send (feed), when to ask (poller), fetch and store (collector), the
records they pass (records) and the primitives they pass them through (flow).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, Final

import anyio

from pipeline.answers import SubmitOutcome
from pipeline.client import CREDIT_HINT, RunwareClient
from pipeline.collector import Collector
from pipeline.config import Settings
from pipeline.dialect import DIALECT_NAME, Dialect, UnknownTask
from pipeline.errors import (
    ApiError,
    AuthError,
    InsufficientCreditError,
    PipelineError,
    StorageError,
    TaskTimeoutError,
)
from pipeline.expand import TaskSpec
from pipeline.feed import UploadsAhead, selected, to_send, window
from pipeline.flow import (
    Queue,
    SlotGate,
    UrgentRequests,
    watch_signals,
)
from pipeline.journal import (
    Event,
    FailedEvent,
    JournalWriter,
    ResumeState,
    RunEndedEvent,
    SubmittedEvent,
    UploadedEvent,
    utc_now,
)
from pipeline.limits import AccountPacer, AdaptiveLimit, Budget, RateMeter
from pipeline.poller import Poller
from pipeline.progress import NullProgress, Progress
from pipeline.records import (
    EngineOptions,
    Fetch,
    FetchFailed,
    Flight,
    Prepared,
    RunSummary,
    Stored,
    lost_event,
)
from pipeline.references import ReferenceUploader
from pipeline.settle import Settler, Step
from pipeline.wire import ErrorItem, ImageInferenceRequest, ImageResult

log = logging.getLogger(__name__)

_SUBMITTERS: Final = 2
"""Two submits may be in flight: slots freed while one waits for its answer go out
with the other."""


_EXPIRED: Final = ErrorItem(
    code="taskFailedOrNotFound",
    message="the API no longer knows this task (expired?); "
    "rerun with --retry-failed to submit it again",
)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first real exception in a (possibly nested) group from task groups."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class Engine:
    """Runs one job's tasks against the API into a run directory."""

    def __init__(
        self,
        *,
        specs: Callable[[], Iterator[TaskSpec]],
        run_dir: Path,
        settings: Settings,
        options: EngineOptions,
        state: ResumeState,
        journal: JournalWriter,
        summary: RunSummary,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
        dialect: Dialect | None = None,
    ) -> None:
        self._specs = specs
        self._run_dir = run_dir
        self._settings = settings
        self._options = options
        self._state = state
        self._journal = journal
        self._journal_lock = anyio.Lock()
        self.summary = summary
        self._progress = progress or NullProgress()
        self._clock = clock
        limits = settings.limits
        top = max(1, options.concurrency)
        self._adaptive = AdaptiveLimit(
            initial=top, minimum=min(limits.min_concurrency, top), maximum=top
        )
        self._gate = SlotGate(lambda: self._adaptive.value)
        self.summary.adaptive_floor = top
        self._rate = RateMeter(limits.requests_per_s, limits.burst, clock=clock)
        self._pacer = AccountPacer(self._rate, self._adaptive)
        cap = options.budget_usd
        self._budget = Budget(cap, spent_usd=state.spent_usd)
        # Prepared tasks for the journaler. Bounded for the feeder; a resubmission
        # goes first and never waits, or the poller making it could block the very
        # completions that free room (a deadlock).
        self._backlog = Queue[Prepared](bound=max(2 * limits.submit_batch, 8))
        # Tasks whose ``submitted`` line is durable, waiting for a slot: kept topped
        # up, so the fsync before a submit is paid while no slot waits.
        self._ready = Queue[Flight](bound=max(limits.submit_batch, top // 4))
        self._settler = Settler(
            dialect or Dialect(),
            grace_s=settings.poll.not_found_grace_s,
            record=run_dir / DIALECT_NAME,
        )
        self._poller = Poller(
            settings=settings,
            clock=clock,
            rate=self._rate,
            ask=self._ask_about,
            tasks_waiting=self._tasks_waiting,
            poll_mode=self._settler.dialect.poll_mode,
        )
        self._urgent = UrgentRequests()
        self._polls_failing_since: float | None = None
        self._max_price_seen = Decimal(0)
        self._outstanding = 0
        self._feeding_done = False
        self._all_done = anyio.Event()
        self._draining = anyio.Event()
        self._work_scope: anyio.CancelScope | None = None
        self._client: RunwareClient | None = None
        self._uploader: ReferenceUploader | None = None
        self._collector: Collector | None = None

    # ------------------------------------------------------------------ control

    def request_stop(self, reason: str = "interrupted", message: str = "") -> None:
        """Stop submitting; in-flight tasks may finish (the first Ctrl-C)."""
        if self.summary.stop_reason is None:
            self.summary.stop_reason = reason
            self.summary.stop_message = message or None
            log.warning(
                "stopping (%s): no new submits; finishing in-flight tasks", reason
            )
        self._draining.set()
        self._gate.interrupt()
        self._drop_backlog()
        self._check_done()

    def stop_now(self) -> None:
        """Cancel everything at once (the second Ctrl-C); the journal stays valid."""
        if self.summary.stop_reason is None:
            self.summary.stop_reason = "interrupted"
        if self._work_scope is not None:
            self._work_scope.cancel()

    # ---------------------------------------------------------------- the run

    async def run(self) -> RunSummary:
        started = self._clock()
        self._progress.start(self.summary.images_total, self.summary.images_done)
        try:
            async with RunwareClient(self._settings, pacer=self._pacer) as client:
                self._client = client
                uploader = ReferenceUploader(
                    client, dict(self._state.uploads), self._journal_upload
                )
                self._uploader = uploader
                try:
                    await self._run_stages(uploader)
                finally:
                    self.summary.uploads = uploader.uploads
        finally:
            self.summary.wall_s = self._clock() - started
            self.summary.max_in_flight = self._gate.peak
            self.summary.latency_s = self._poller.latency.value
            self._drop_backlog()
            # Journaled, never sent: marked so, a rerun sends them without first
            # asking the API about them (which takes not_found_grace_s).
            # (A task waiting to be sent again under its taskUUID was sent before:
            # it stays outstanding, and a rerun asks about it again.)
            unsent = [f for f in self._ready.drain() if not f.resend]
            self._drop(unsent)
            # Whatever is still outstanding was sent but not finished: a rerun polls it.
            self.summary.tasks_unfinished += max(0, self._outstanding)
            self._outstanding = 0
            self._progress.close()
            with anyio.CancelScope(shield=True):
                await self._append(
                    *(lost_event(f) for f in unsent),
                    RunEndedEvent(
                        ts=utc_now(),
                        reason=self.summary.stop_reason or "finished",
                        done=self.summary.tasks_done,
                        failed=self.summary.tasks_failed,
                        spent_usd=self.summary.spent_usd,
                    ),
                )
            log.info(
                "run ended: done=%d failed=%d unfinished=%d resubmitted=%d lost=%d "
                "spent=$%s requests=%d wall=%.1fs reason=%s",
                self.summary.tasks_done,
                self.summary.tasks_failed,
                self.summary.tasks_unfinished,
                self.summary.resubmitted,
                self.summary.lost,
                self.summary.spent_usd,
                self.summary.api_requests,
                self.summary.wall_s,
                self.summary.stop_reason or "finished",
            )
        return self.summary

    async def _run_stages(self, uploader: ReferenceUploader) -> None:
        assert self._client is not None
        collector = Collector(
            client=self._client,
            urgent=self._urgent,
            run_dir=self._run_dir,
            downloads=self._settings.limits.download_concurrency,
            append=self._append,
            on_stored=self._record,
            on_fetch_failed=self._fetch_failed,
            on_batch=self._report_progress,
        )
        self._collector = collector
        try:
            async with anyio.create_task_group() as outer:
                if self._options.handle_signals:
                    outer.start_soon(
                        partial(
                            watch_signals,
                            grace_s=self._settings.run.shutdown_grace_s,
                            draining=self._draining.is_set,
                            drain=lambda: self.request_stop("interrupted"),
                            stop_now=self.stop_now,
                        )
                    )
                with anyio.CancelScope() as work_scope:
                    self._work_scope = work_scope
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._feeder, uploader)
                            tg.start_soon(self._journaler)
                            for _ in range(_SUBMITTERS):
                                tg.start_soon(self._submitter)
                            tg.start_soon(self._poller.run)
                            collector.start(tg)
                            await self._all_done.wait()
                            tg.cancel_scope.cancel()
                    except* (AuthError, InsufficientCreditError) as group:
                        exc = _first_leaf(group)
                        reason = "auth" if isinstance(exc, AuthError) else "credit"
                        self.summary.stop_reason = reason
                        self.summary.stop_message = str(exc)
                        log.error("%s", exc)
                    except* StorageError as group:
                        self.summary.stop_reason = "storage"
                        self.summary.stop_message = str(_first_leaf(group))
                        log.error("%s", self.summary.stop_message)
                    except* ApiError as group:
                        # Retries ran out on a call no task can absorb (an upload):
                        # the API is unreachable or broken; stop, resumable.
                        self.summary.stop_reason = "api"
                        self.summary.stop_message = (
                            f"{_first_leaf(group)}; check the network and "
                            f"{self._settings.api.base_url}, then rerun to resume"
                        )
                        log.error("%s", self.summary.stop_message)
                outer.cancel_scope.cancel()
        finally:
            collector.close()

    # ---------------------------------------------------------------- journal

    async def _append(self, *events: Event) -> None:
        async with self._journal_lock:
            await self._journal.append(*events)

    async def _journal_upload(self, digest: str, image_uuid: str, path: Path) -> None:
        await self._append(
            UploadedEvent(
                ts=utc_now(), sha256=digest, image_uuid=image_uuid, source=str(path)
            )
        )

    # ------------------------------------------------------------------ feeder

    async def _feeder(self, uploader: ReferenceUploader) -> None:
        state, limits = self._state, self._settings.limits
        try:
            if state.pending:
                # Resume: ask about every task a previous run sent before sending more.
                for spec in selected(self._specs, self._options.shard):
                    if spec.key in state.pending and not state.is_complete(spec.key):
                        self._resume_flights(spec)
            async with anyio.create_task_group() as uploads:
                ahead = UploadsAhead(uploads, uploader)
                fresh = to_send(
                    selected(self._specs, self._options.shard),
                    state,
                    retry_failed=self._options.retry_failed,
                )
                size = 2 * max(1, self._options.concurrency) + limits.submit_batch
                for spec in window(fresh, ahead, size):
                    if self._draining.is_set():
                        break
                    request = await self._prepare(spec, uploader)
                    self._outstanding += 1
                    await self._backlog.put(Prepared(spec, request))
                uploads.cancel_scope.cancel()  # a stop: what is left is not needed
        finally:
            self._feeding_done = True
            self._check_done()

    async def _prepare(
        self, spec: TaskSpec, uploader: ReferenceUploader
    ) -> ImageInferenceRequest:
        uploaded = await uploader.resolve_all(spec.local_files)
        return spec.request(uuid.uuid4(), uploaded)

    def _resume_flights(self, spec: TaskSpec) -> None:
        now, wall = self._clock(), utc_now()
        stored = self._state.completed_images.get(spec.key, {})
        for event in self._state.pending[spec.key]:
            age_s = max(0.0, (wall - event.ts).total_seconds())
            flight = Flight(
                spec=spec,
                task_uuid=event.task_uuid,
                wire={},
                submitted_at=now,
                submitted_wall=event.ts,
                reserved_per_image=Decimal(0),
                next_poll_at=now,
                backoff_s=self._settings.poll.interval_s,
                ambiguous=True,
                teaches_latency=False,
                seen={c.image_uuid for c in stored.values()},
                taken=set(stored),
                stored=len(stored),
                last_sent_at=now - age_s,
            )
            self._outstanding += 1
            self.summary.resumed += 1
            self._gate.force_acquire()
            self._poller.track(flight)
        self._poller.wake()

    # --------------------------------------------------------------- submitter

    def _price_per_image(self, spec: TaskSpec) -> Decimal:
        return max(self._settings.price_for(spec.rendering_speed), self._max_price_seen)

    async def _journaler(self) -> None:
        """Reserve budget for the next tasks and journal them as ``submitted``.

        This runs ahead of the submitters, so the fsync that must precede a submit
        is not paid while a concurrency slot sits idle: a freed slot goes straight
        to a task whose ``submitted`` line is already durable. At most ``_ready``'s
        bound of journaled tasks wait unsent; a crash leaves them pending, and the
        rerun's questions about them find them unknown and send them again.
        """
        batch_max = self._settings.limits.submit_batch
        while True:
            await self._ready.wait_for_room()
            await self._backlog.wait_for_any()
            items = self._backlog.take(batch_max)
            if self._draining.is_set():
                self._drop(items)
                continue
            batch: list[Prepared] = []
            for item in items:
                reserve = self._price_per_image(item.spec) * item.spec.images
                if self._draining.is_set():  # the budget ran out for an earlier one
                    self._drop([item])
                elif self._budget.try_reserve(reserve):
                    batch.append(item)
                else:
                    self._drop([item])
                    self.request_stop(
                        "budget",
                        f"budget ${self._options.budget_usd} reached (spent "
                        f"${self._budget.spent_usd}); raise --budget and rerun to "
                        "continue",
                    )
            if batch and self._draining.is_set():  # a stop: none of them goes out
                for item in batch:
                    self._budget.release(
                        self._price_per_image(item.spec) * item.spec.images
                    )
                self._drop(batch)
                continue
            if not batch:
                continue
            wall = utc_now()  # one timestamp for the batch: one append, one moment
            flights = [self._new_flight(item, wall) for item in batch]
            await self._append(  # durable BEFORE any of them is sent
                *(
                    SubmittedEvent(
                        ts=wall,
                        key=item.spec.key,
                        task_uuid=flight.task_uuid,
                        images=item.spec.images,
                        estimate_usd=flight.reserved_per_image * item.spec.images,
                        replaces=item.replaces,
                    )
                    for item, flight in zip(batch, flights, strict=True)
                )
            )
            self._ready.extend(flights)

    def _new_flight(self, item: Prepared, wall: datetime) -> Flight:
        return Flight(
            spec=item.spec,
            task_uuid=str(item.request.task_uuid),
            request=item.request,
            wire=item.request.wire,
            submitted_at=self._clock(),
            submitted_wall=wall,
            reserved_per_image=self._price_per_image(item.spec),
            next_poll_at=math.inf,
            backoff_s=self._poller.gap(),
            inherited_uploads=self._inherited_uploads(item.request),
            replaces=item.replaces,
            holds_slot=False,
        )

    async def _submitter(self) -> None:
        """Send journaled tasks as concurrency slots free up, many per request."""
        batch_max = self._settings.limits.submit_batch
        while True:
            await self._ready.wait_for_any()
            if self._draining.is_set():
                await self._unsent(self._ready.drain())
                continue
            want = min(batch_max, len(self._ready))
            slots = await self._gate.acquire(want)
            self.summary.adaptive_floor = min(
                self.summary.adaptive_floor, self._adaptive.value
            )
            flights = self._ready.take(slots)
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
        for flight in flights:
            if flight.resend:
                self._leave_for_rerun(flight)
        flights = [f for f in flights if not f.resend]
        await self._append(*(lost_event(f) for f in flights))
        self._budget.release(
            sum((f.reserved_per_image * f.spec.images for f in flights), Decimal(0))
        )
        for flight in flights:
            flight.finished = True
        self._drop(flights)

    async def _submit(self, flights: list[Flight]) -> None:
        """One submit request for flights that each hold a slot."""
        assert self._client is not None
        now = self._clock()
        wall = utc_now()
        resent = sum(f.resend for f in flights)
        for flight in flights:
            flight.holds_slot = True
            flight.submitted_at = now
            flight.submitted_wall = wall
            if flight.resend:
                flight.last_sent_at = now
        self._poller.schedule_first(flights, now)
        self.summary.submitted += len(flights) - resent
        self.summary.resent += resent
        self.summary.resubmitted += sum(1 for f in flights if f.replaces)
        self.summary.submit_requests += 1
        try:
            with self._urgent.out():
                outcome = await self._client.submit_wire([f.wire for f in flights])
        except AuthError:
            # A definite refusal: nothing was accepted now, so nothing to poll later
            # (a task sent before is asked about again by a rerun).
            await self._append(*(lost_event(f) for f in flights if not f.resend))
            for flight in flights:
                if flight.resend:
                    self._leave_for_rerun(flight)
                    continue
                self._retire(flight)
                self._outstanding -= 1
                self.summary.tasks_unsubmitted += 1
            raise
        for flight in flights:
            flight.request = None  # sent: only its wire form is kept, for sidecars
        await self._handle_submit(flights, outcome)
        self._poller.wake()

    def _inherited_uploads(self, request: ImageInferenceRequest) -> tuple[str, ...]:
        if self._uploader is None:
            return ()
        used = list(request.inputs.reference_images)
        if request.provider_settings is not None:
            used += request.provider_settings.ideogram.style_reference_images or []
        return tuple(self._uploader.inherited(used))

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
        for task_uuid, error in outcome.failed.items():
            if (flight := by_uuid.get(task_uuid)) is not None:
                await self._fail(flight, error)
        if outcome.credit_refused:
            refused = [by_uuid[u] for u in outcome.credit_refused if u in by_uuid]
            # Not accepted now; one sent before may have been then: a rerun asks.
            for flight in refused:
                if flight.last_sent_at is not None:
                    self._leave_for_rerun(flight)
            refused = [f for f in refused if f.last_sent_at is None]
            # Definitely not accepted: a rerun sends them afresh.
            await self._append(*(lost_event(f) for f in refused))
            for flight in refused:
                self._retire(flight)
                self._outstanding -= 1
                self.summary.tasks_unsubmitted += 1
                self.summary.lost += 1
            self._stop_for_credit(outcome)
        await self._take_results(outcome.results, by_uuid)

    def _stop_for_credit(self, outcome: SubmitOutcome) -> None:
        """No more submits; what the API accepted is still collected (exit 3)."""
        self.request_stop(
            "credit",
            f"the account has insufficient credit ({outcome.credit_message}): "
            f"{CREDIT_HINT}",
        )

    # ------------------------------------------------------------------ settling

    async def _send_again(self, flight: Flight) -> None:
        """Queue ``flight`` to go again under its own taskUUID (``Step.RESEND``),
        first in line for a slot like any submit: the API does not hold it (or may
        not), so it holds no slot meanwhile."""
        assert self._uploader is not None
        if not flight.wire:  # taken over from an earlier run: rebuilt alike
            uploaded = await self._uploader.resolve_all(flight.spec.local_files)
            request = flight.spec.request(uuid.UUID(flight.task_uuid), uploaded)
            flight.wire = request.wire
            flight.inherited_uploads = self._inherited_uploads(request)
        log.info(
            "%s: sending %s again under its taskUUID", flight.spec.key, flight.task_uuid
        )
        flight.resend = True
        flight.teaches_latency = False
        flight.next_poll_at = math.inf  # asked about again once sent
        self._release_slot(flight)
        self._ready.put_urgent(flight)

    # ----------------------------------------------------------------- answers

    async def _ask_about(self, flights: list[Flight]) -> None:
        """One getResponse for ``flights``; each gets its next question's time."""
        assert self._client is not None
        by_uuid = {f.task_uuid: f for f in flights}
        self.summary.poll_requests += 1
        # When the question left: what its answer tells (done or not) was true by the
        # time it reached the API, half a round trip later, as for the submit.
        asked_at = self._clock()
        try:
            # Only until the answer: its results then go to the (waiting) downloads.
            with self._urgent.out():
                outcome = await self._client.poll(list(by_uuid))
        except PipelineError as exc:
            if exc.run_fatal:
                raise
            self._poll_failed(flights, exc)
            return
        self._polls_failing_since = None
        settler = self._settler
        if self._poller.judge_batch(flights, outcome):
            await settler.learn(poll_mode=self._poller.batching.mode)
        if outcome.not_found and settler.dialect.unknown_task is UnknownTask.UNKNOWN:
            await settler.learn(unknown_task=UnknownTask.NOT_FOUND)
        now = self._clock()
        self._poller.judge_first_questions(flights, outcome, asked_at)
        await self._take_results(outcome.results, by_uuid, asked_at)
        for task_uuid, error in outcome.failed.items():
            if (failed := by_uuid.get(task_uuid)) is not None and not failed.finished:
                await self._fail(failed, error)
        unproven = [u for u in outcome.processing if not by_uuid[u].acked]
        if unproven and await settler.probe_unknown_tasks(self._client.poll):
            self.summary.poll_requests += 1
        for task_uuid in outcome.processing:
            busy = by_uuid[task_uuid]
            if settler.rule.proven(
                acked=busy.acked, answered=bool(busy.seen), seen_processing=True
            ):
                busy.acked = True
                busy.seen_processing = True
                busy.last_processing_at = asked_at
        again: list[Flight] = []
        grace = self._settings.poll.not_found_grace_s
        for flight in flights:
            if flight.finished or flight.assigned >= flight.spec.images:
                continue
            if now - flight.submitted_at > self._settings.poll.deadline_s:
                self._time_out(flight, now)
                continue
            match settler.step_for(flight, outcome, now):
                case Step.RESEND:
                    await self._send_again(flight)
                case Step.EXPIRED:
                    await self._fail(flight, _EXPIRED, retryable=True)
                case Step.WAIT if flight.task_uuid not in outcome.not_found and (
                    flight.acked or flight.task_uuid in outcome.processing
                ):
                    again.append(flight)
                case Step.WAIT:  # unknown to the API for now: visible soon, or resent
                    self._poller.ask_at(
                        flight, now + max(self._poller.gap(), grace / 2)
                    )
        self._poller.ask_again(again, now)

    def _tasks_waiting(self) -> bool:
        """Whether a slot freed now would be taken: tasks not yet sent remain."""
        return not self._feeding_done or bool(len(self._backlog) or len(self._ready))

    def _poll_failed(self, flights: list[Flight], exc: PipelineError) -> None:
        """Retries ran out for one poll: ask again later, unless the API is down.

        Tasks past the deadline are left for a rerun. When every poll has failed for
        ``poll.outage_s``, the run stops (exit 3): whatever is in flight stays in the
        journal, and the rerun asks about it first.
        """
        now = self._clock()
        log.warning("poll of %d tasks failed (%s); will ask again", len(flights), exc)
        if self._polls_failing_since is None:
            self._polls_failing_since = now
        elif now - self._polls_failing_since > self._settings.poll.outage_s:
            self.summary.stop_reason = "api"
            self.summary.stop_message = (
                f"every poll failed for {now - self._polls_failing_since:.0f}s "
                f"({exc}); check the network and {self._settings.api.base_url}, "
                "then rerun to resume"
            )
            log.error("%s", self.summary.stop_message)
            self.stop_now()
            return
        for flight in flights:
            if flight.finished:
                continue
            if now - flight.submitted_at > self._settings.poll.deadline_s:
                self._time_out(flight, now)
            else:
                self._poller.ask_at(flight, now + self._settings.poll.max_interval_s)

    async def _take_results(
        self,
        results: list[ImageResult],
        by_uuid: dict[str, Flight],
        asked_at: float | None = None,
    ) -> None:
        """Free the slots of finished tasks and queue their images for download.

        ``asked_at``: when the question these results answer was sent (None: they
        came with the submit's answer).
        """
        assert self._collector is not None
        now = self._clock()
        done_by = now if asked_at is None else asked_at
        fetches: list[Fetch] = []
        for result in results:
            flight = by_uuid.get(result.task_uuid) or self._poller.get(result.task_uuid)
            if flight is None or flight.finished or result.image_uuid in flight.seen:
                continue
            if not flight.seen:
                self._poller.observe_latency(flight, done_by)
            flight.acked = True
            flight.seen.add(result.image_uuid)
            # 0-based, as the journal and paths count; after a crash the stored
            # indices may have a hole (image 2 stored, image 1 not): fill it.
            index = next(
                i for i in range(len(flight.taken) + 1) if i not in flight.taken
            )
            flight.taken.add(index)
            if flight.assigned >= flight.spec.images:
                # The API is done with it: its slot goes to the next task while
                # the images download (the fetch queue's bound holds memory).
                self._poller.forget(flight)
                self._release_slot(flight)
            fetches.append(Fetch(flight, result, index))
        # Every slot of this answer is free before the first wait on the fetch queue.
        await self._collector.fetch(fetches)

    def _time_out(self, flight: Flight, now: float) -> None:
        error = TaskTimeoutError(flight.task_uuid, now - flight.submitted_at)
        log.warning("%s (%s)", error, flight.spec.key)
        self._leave_for_rerun(flight)

    # ---------------------------------------------------------- stored images

    def _fetch_failed(self, item: FetchFailed) -> None:
        """Billed but not downloaded: left pending, so a rerun polls and fetches it."""
        flight = item.flight
        if not flight.finished:
            self._leave_for_rerun(flight)

    def _record(self, item: Stored) -> None:
        """Account for one stored image (its completion is already journaled)."""
        flight = item.flight
        result = item.result
        cost = result.cost
        if cost is None:
            self.summary.missing_cost_images += 1
            cost = flight.reserved_per_image
        else:
            self._max_price_seen = max(self._max_price_seen, cost)
        if result.cost is not None:
            self.summary.spent_usd += result.cost
            self.summary.spent_this_run_usd += result.cost
        if not flight.finished:
            self._budget.settle(flight.reserved_per_image, cost)
        flight.stored += 1
        self.summary.images_done += 1
        self.summary.images_new += 1
        if flight.stored >= flight.spec.images and not flight.finished:
            self._finish(flight)
            self._adaptive.succeeded()
            self.summary.tasks_done += 1
            self._outstanding -= 1
            self._check_done()

    # ---------------------------------------------------------------- endings

    def _retire(self, flight: Flight) -> None:
        """This taskUUID needs no more questions, no slot and no reservation."""
        self._poller.forget(flight)
        self._finish(flight)
        self._budget.release(
            flight.reserved_per_image * (flight.spec.images - flight.stored)
        )

    def _leave_for_rerun(self, flight: Flight) -> None:
        """Unfinished here (deadline, download): the journal keeps it pending, so a
        rerun asks about it again instead of paying for it again."""
        self._retire(flight)
        self.summary.tasks_unfinished += 1
        self._outstanding -= 1
        self._check_done()

    def _finish(self, flight: Flight) -> None:
        flight.finished = True
        self._release_slot(flight)

    def _release_slot(self, flight: Flight) -> None:
        if flight.holds_slot:
            flight.holds_slot = False
            self._gate.release(1)

    async def _refused_stale_upload(self, flight: Flight, error: ErrorItem) -> bool:
        """A reference uploaded by an earlier run was refused: upload it again.

        The refusal is a definite answer (nothing was billed), so the task goes
        again under a new taskUUID with freshly uploaded images.
        """
        images = ("inputs.referenceImages", "providerSettings.ideogram.styleReference")
        if self._uploader is None or not any(
            p.startswith(images) for p in error.parameters
        ):
            return False
        if not flight.inherited_uploads:
            return False
        for image_uuid in flight.inherited_uploads:
            self._uploader.forget(image_uuid)
        log.info(
            "%s: an earlier run's upload of its reference was refused; uploading "
            "it again",
            flight.spec.key,
        )
        self._retire(flight)
        await self._append(lost_event(flight))
        request = await self._prepare(flight.spec, self._uploader)
        self._backlog.put_urgent(
            Prepared(flight.spec, request, replaces=flight.task_uuid)
        )
        return True

    async def _fail(
        self, flight: Flight, error: ErrorItem, *, retryable: bool = False
    ) -> None:
        if flight.finished:
            self._poller.forget(flight)
            return
        if await self._refused_stale_upload(flight, error):
            return
        self._retire(flight)
        await self._append(
            FailedEvent(
                ts=utc_now(),
                key=flight.spec.key,
                task_uuid=flight.task_uuid,
                code=error.code,
                message=error.message,
                parameter=error.parameters,
                retryable=retryable,
            )
        )
        log.info("failed %s: %s: %s", flight.spec.key, error.code, error.message)
        self.summary.tasks_failed += 1
        self.summary.failures.append((flight.spec.key, error.code, error.message))
        self._outstanding -= 1
        self._check_done()
        self._report_progress()

    def _drop(self, items: Iterable[object]) -> None:
        """Never submitted (stop requested): a rerun submits them."""
        for _ in items:
            self._outstanding -= 1
            self.summary.tasks_unsubmitted += 1
        self._check_done()

    def _drop_backlog(self) -> None:
        self._drop(self._backlog.drain())

    def _check_done(self) -> None:
        if self._feeding_done and self._outstanding <= 0:
            self._all_done.set()

    def _report_progress(self) -> None:
        self._progress.update(
            done=self.summary.images_done,
            failed=self.summary.tasks_failed,
            in_flight=self._gate.in_flight,
            spent_usd=self.summary.spent_usd,
        )
