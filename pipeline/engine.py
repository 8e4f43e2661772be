"""The worker pool: feed, submit (batched), one poller, fetch, store; one task group.

Why this shape:
- *Concurrency means tasks in flight at the API.* A slot is taken when a task is
  sent and given back as soon as the API has answered with all its images (or it
  failed); downloading and writing them overlap the next tasks, and bounded queues
  keep memory in check. ``submitted`` lines are journaled ahead, so no slot waits
  for an fsync.
- *Few requests per image.* Submits carry many tasks; one poller asks about every
  due taskUUID in batched getResponse requests. Each task is polled first when it is
  expected to be done (from the latency observed so far), then less and less often.
- *Never pay twice.* A ``submitted`` event is fsync'd before the request leaves. A
  submit whose outcome is unknown is settled by ``settle``'s rule: polled first, then
  sent again under the SAME taskUUID, which the API refuses if it has it.
- *Survive every dialect.* What an answer means is ``answers``'; whether getResponse
  may be batched, and what "processing" proves, is learnt (``dialect``) and kept in
  the run dir.
- *Credit running out stops submitting, not collecting.* Refused tasks wait for the
  next run; everything the API accepted is still polled, stored and billed.
- *The budget is a hard cap.* Each task's estimated cost is reserved before its submit.
- *One writer per resource.* Only ``accounts`` changes the summary, the budget and
  the progress; the journal is appended under one lock so the
  ``submitted``-before-send order holds.

Here: the stages' wiring, the feeder, and the run's start, stop and end. Beside it:
the submit path (sending), what each answer means (replies), the run's counts and
endings (accounts), what to send (feed), when to ask (poller), fetch and store
(collector), the records they pass (records) and the primitives they pass them
through (flow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from pipeline.accounts import Accounts
from pipeline.client import RunwareClient
from pipeline.collector import Collector
from pipeline.config import Settings
from pipeline.dialect import DIALECT_NAME, Dialect
from pipeline.errors import ApiError, AuthError, InsufficientCreditError, StorageError
from pipeline.expand import TaskSpec
from pipeline.feed import UploadsAhead, prepare, selected, to_send, window
from pipeline.flow import Queue, SlotGate, UrgentRequests, watch_signals
from pipeline.journal import JournalWriter, ResumeState
from pipeline.journal_events import Event, RunEndedEvent, UploadedEvent, utc_now
from pipeline.limits import AccountPacer, AdaptiveLimit, Budget, RateMeter
from pipeline.poller import Poller
from pipeline.progress import NullProgress, Progress
from pipeline.records import (
    EngineOptions,
    Flight,
    Prepared,
    RunSummary,
    Stored,
    lost_event,
)
from pipeline.references import ReferenceUploader
from pipeline.replies import Replies
from pipeline.sending import Sending
from pipeline.settle import Settler

log = logging.getLogger(__name__)


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
        self._clock = clock
        limits = settings.limits
        top = max(1, options.concurrency)
        self._adaptive = AdaptiveLimit(
            initial=top, minimum=min(limits.min_concurrency, top), maximum=top
        )
        self._gate = SlotGate(lambda: self._adaptive.value)
        self._rate = RateMeter(limits.requests_per_s, limits.burst, clock=clock)
        self._pacer = AccountPacer(self._rate, self._adaptive)
        # Prepared tasks for the journaler, from the feeder alone (which closes it).
        self._backlog = Queue[Prepared](bound=max(2 * limits.submit_batch, 8))
        # Tasks whose ``submitted`` line is durable, waiting for a slot: kept topped
        # up, so the fsync before a submit is paid while no slot waits. Resends and
        # resubmissions go first and never wait.
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
        self._accounts = Accounts(
            summary,
            budget=Budget(options.budget_usd, spent_usd=state.spent_usd),
            progress=progress or NullProgress(),
            gate=self._gate,
            forget=self._poller.forget,
            list_price=lambda spec: settings.price_for(spec.rendering_speed),
            concurrency=top,
        )
        self._urgent = UrgentRequests()
        self._draining = anyio.Event()
        self._work_scope: anyio.CancelScope | None = None
        self._uploader: ReferenceUploader | None = None
        self._sending: Sending | None = None
        self._replies: Replies | None = None

    # ------------------------------------------------------------------ control

    def request_stop(self, reason: str = "interrupted", message: str = "") -> None:
        """Stop submitting; in-flight tasks may finish (the first Ctrl-C)."""
        if self._accounts.stop(reason, message or None, first=True):
            log.warning(
                "stopping (%s): no new submits; finishing in-flight tasks", reason
            )
        self._draining.set()
        self._gate.interrupt()
        self._accounts.unsent(self._backlog.drain())

    def stop_now(self) -> None:
        """Cancel everything at once (the second Ctrl-C); the journal stays valid."""
        self._accounts.stop("interrupted", first=True)
        if self._work_scope is not None:
            self._work_scope.cancel()

    def _stop_now_for(self, reason: str, message: str) -> None:
        self._accounts.stop(reason, message, first=False)
        self.stop_now()

    # ---------------------------------------------------------------- the run

    async def run(self) -> RunSummary:
        started = self._clock()
        accounts = self._accounts
        accounts.start()
        try:
            async with RunwareClient(self._settings, pacer=self._pacer) as client:
                self._uploader = ReferenceUploader(
                    client, dict(self._state.uploads), self._journal_upload
                )
                await self._run_stages(client, self._uploader)
        finally:
            self._accounts.unsent(self._backlog.drain())
            # Journaled, never sent: marked so, a rerun sends them without first
            # asking the API about them (which takes not_found_grace_s).
            # (A task waiting to be sent again under its taskUUID was sent before:
            # it stays open, and a rerun asks about it again.)
            unsent = [f for f in self._ready.drain() if not f.resend]
            accounts.unsent(unsent)
            accounts.run_over(
                wall_s=self._clock() - started,
                latency_s=self._poller.latency.value,
                uploads=0 if self._uploader is None else self._uploader.uploads,
            )
            summary = self.summary
            with anyio.CancelScope(shield=True):
                await self._append(
                    *(lost_event(f) for f in unsent),
                    RunEndedEvent(
                        ts=utc_now(),
                        reason=summary.stop_reason or "finished",
                        done=summary.tasks_done,
                        failed=summary.tasks_failed,
                        spent_usd=summary.spent_usd,
                    ),
                )
            log.info(
                "run ended: done=%d failed=%d unfinished=%d resubmitted=%d lost=%d "
                "spent=$%s requests=%d wall=%.1fs reason=%s",
                summary.tasks_done,
                summary.tasks_failed,
                summary.tasks_unfinished,
                summary.resubmitted,
                summary.lost,
                summary.spent_usd,
                summary.api_requests,
                summary.wall_s,
                summary.stop_reason or "finished",
            )
        return self.summary

    def _build_rooms(
        self, client: RunwareClient, uploader: ReferenceUploader
    ) -> Collector:
        collector = Collector(
            client=client,
            urgent=self._urgent,
            run_dir=self._run_dir,
            downloads=self._settings.limits.download_concurrency,
            append=self._append,
            on_stored=self._stored,
            on_fetch_failed=lambda item: self._room_replies().fetch_failed(item),
            on_batch=self._accounts.report_progress,
        )
        self._replies = Replies(
            settings=self._settings,
            clock=self._clock,
            accounts=self._accounts,
            client=client,
            uploader=uploader,
            collector=collector,
            poller=self._poller,
            settler=self._settler,
            urgent=self._urgent,
            ready=self._ready,
            append=self._append,
            resubmit=self._resubmit,
            stop_now=self._stop_now_for,
        )
        self._sending = Sending(
            settings=self._settings,
            clock=self._clock,
            accounts=self._accounts,
            client=client,
            uploader=uploader,
            gate=self._gate,
            adaptive=self._adaptive,
            backlog=self._backlog,
            ready=self._ready,
            poller=self._poller,
            urgent=self._urgent,
            append=self._append,
            draining=self._draining,
            request_stop=self.request_stop,
            replies=self._room_replies,
        )
        return collector

    async def _run_stages(
        self, client: RunwareClient, uploader: ReferenceUploader
    ) -> None:
        collector = self._build_rooms(client, uploader)
        assert self._sending is not None
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
                            self._sending.start(tg)
                            tg.start_soon(self._poller.run)
                            collector.start(tg)
                            await self._accounts.all_ended.wait()
                            tg.cancel_scope.cancel()
                    except* (AuthError, InsufficientCreditError) as group:
                        exc = _first_leaf(group)
                        reason = "auth" if isinstance(exc, AuthError) else "credit"
                        self._accounts.stop(reason, str(exc), first=False)
                        log.error("%s", exc)
                    except* StorageError as group:
                        self._stopped_by("storage", str(_first_leaf(group)))
                    except* ApiError as group:
                        # Retries ran out on a call no task can absorb (an upload):
                        # the API is unreachable or broken; stop, resumable.
                        self._stopped_by(
                            "api",
                            f"{_first_leaf(group)}; check the network and "
                            f"{self._settings.api.base_url}, then rerun to resume",
                        )
                outer.cancel_scope.cancel()
        finally:
            collector.close()

    def _stopped_by(self, reason: str, message: str) -> None:
        self._accounts.stop(reason, message, first=False)
        log.error("%s", message)

    # ------------------------------------------------------------ between rooms

    def _room_replies(self) -> Replies:
        assert self._replies is not None
        return self._replies

    async def _ask_about(self, flights: list[Flight]) -> None:
        await self._room_replies().ask_about(flights)

    async def _resubmit(self, item: Prepared) -> None:
        assert self._sending is not None
        await self._sending.admit_again(item)

    def _stored(self, item: Stored) -> None:
        """One image stored (its completion is already journaled)."""
        if self._accounts.stored(item):
            self._adaptive.succeeded()

    def _tasks_waiting(self) -> bool:
        """Whether a slot freed now would be taken: tasks not yet sent remain."""
        return self._accounts.feeding or bool(len(self._backlog) or len(self._ready))

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
        """Resumed tasks first, then each task to send, into the backlog; closes
        the backlog when done (or stopped)."""
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
                    if self._draining.is_set() or not self._accounts.admitting:
                        break
                    item = Prepared(spec, await prepare(spec, uploader))
                    self._accounts.entered(item.task_uuid)
                    await self._backlog.put(item)
                uploads.cancel_scope.cancel()  # a stop: what is left is not needed
        finally:
            self._backlog.close()
            self._accounts.feeding_over()

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
            self._accounts.resumed(flight)
            self._gate.force_acquire()
            self._poller.track(flight)
        self._poller.wake()
