"""What the API's answers mean for the tasks in flight: one getResponse and its
verdicts (done, failed, processing, unknown), the results handed to the downloads,
settling a task whose submit is in doubt (asked about, then sent again under its own
taskUUID), and the tasks given up for a rerun.

Why a room of its own: ``answers`` reads what an answer says; this decides what to do
about each task, and is the one place a task leaves the API's hands.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from pipeline.accounts import Accounts
from pipeline.client import RunwareClient
from pipeline.collector import AppendEvents, Collector
from pipeline.config import Settings
from pipeline.dialect import UnknownTask
from pipeline.errors import PipelineError, TaskTimeoutError
from pipeline.feed import inherited_uploads, prepare
from pipeline.flow import Queue, UrgentRequests
from pipeline.journal_events import FailedEvent, utc_now
from pipeline.poller import Poller
from pipeline.records import Fetch, FetchFailed, Flight, Prepared, lost_event
from pipeline.references import ReferenceUploader
from pipeline.settle import Settler, Step
from pipeline.wire import ErrorItem, ImageResult

log = logging.getLogger(__name__)

_EXPIRED: Final = ErrorItem(
    code="taskFailedOrNotFound",
    message="the API no longer knows this task (expired?); "
    "rerun with --retry-failed to submit it again",
)
_REFERENCE_PARAMETERS: Final = (
    "inputs.referenceImages",
    "providerSettings.ideogram.styleReference",
)


class Replies:
    """Asks about tasks in flight (for the poller) and acts on every answer's
    verdicts, the submits' included."""

    def __init__(
        self,
        *,
        settings: Settings,
        clock: Callable[[], float],
        accounts: Accounts,
        client: RunwareClient,
        uploader: ReferenceUploader,
        collector: Collector,
        poller: Poller,
        settler: Settler,
        urgent: UrgentRequests,
        ready: Queue[Flight],
        append: AppendEvents,
        resubmit: Callable[[Prepared], Awaitable[None]],
        stop_now: Callable[[str, str], None],
    ) -> None:
        self._settings = settings
        self._poll = settings.poll
        self._clock = clock
        self._accounts = accounts
        self._client = client
        self._uploader = uploader
        self._collector = collector
        self._poller = poller
        self._settler = settler
        self._urgent = urgent
        self._ready = ready
        self._append = append
        self._resubmit = resubmit
        self._stop_now = stop_now
        self._polls_failing_since: float | None = None

    # ------------------------------------------------------------ getResponse

    async def ask_about(self, flights: list[Flight]) -> None:
        """One getResponse for ``flights``; each gets its next question's time."""
        by_uuid = {f.task_uuid: f for f in flights}
        self._accounts.poll_sent()
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
        await self.take_results(outcome.results, by_uuid, asked_at)
        for task_uuid, error in outcome.failed.items():
            if (failed := by_uuid.get(task_uuid)) is not None and not failed.finished:
                await self.fail(failed, error)
        unproven = [u for u in outcome.processing if not by_uuid[u].acked]
        if unproven and await settler.probe_unknown_tasks(self._client.poll):
            self._accounts.poll_sent()
        for task_uuid in outcome.processing:
            busy = by_uuid[task_uuid]
            if settler.rule.proven(
                acked=busy.acked, answered=bool(busy.seen), seen_processing=True
            ):
                busy.acked = True
                busy.seen_processing = True
                busy.last_processing_at = asked_at
        again: list[Flight] = []
        grace = self._poll.not_found_grace_s
        for flight in flights:
            if flight.finished or flight.assigned >= flight.spec.images:
                continue
            if now - flight.submitted_at > self._poll.deadline_s:
                self._time_out(flight, now)
                continue
            match settler.step_for(flight, outcome, now):
                case Step.RESEND:
                    await self._send_again(flight)
                case Step.EXPIRED:
                    await self.fail(flight, _EXPIRED, retryable=True)
                case Step.WAIT if flight.task_uuid not in outcome.not_found and (
                    flight.acked or flight.task_uuid in outcome.processing
                ):
                    again.append(flight)
                case Step.WAIT:  # unknown to the API for now: visible soon, or resent
                    self._poller.ask_at(
                        flight, now + max(self._poller.gap(), grace / 2)
                    )
        self._poller.ask_again(again, now)

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
        elif now - self._polls_failing_since > self._poll.outage_s:
            message = (
                f"every poll failed for {now - self._polls_failing_since:.0f}s "
                f"({exc}); check the network and {self._settings.api.base_url}, "
                "then rerun to resume"
            )
            log.error("%s", message)
            self._stop_now("api", message)
            return
        for flight in flights:
            if flight.finished:
                continue
            if now - flight.submitted_at > self._poll.deadline_s:
                self._time_out(flight, now)
            else:
                self._poller.ask_at(flight, now + self._poll.max_interval_s)

    # ------------------------------------------------------------ results

    async def take_results(
        self,
        results: list[ImageResult],
        by_uuid: dict[str, Flight],
        asked_at: float | None = None,
    ) -> None:
        """Free the slots of finished tasks and queue their images for download.

        ``asked_at``: when the question these results answer was sent (None: they
        came with the submit's answer).
        """
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
                self._accounts.free_slot(flight)
            fetches.append(Fetch(flight, result, index))
        # Every slot of this answer is free before the first wait on the fetch queue.
        await self._collector.fetch(fetches)

    def fetch_failed(self, item: FetchFailed) -> None:
        """Billed but not downloaded: left pending, so a rerun polls and fetches it."""
        if not item.flight.finished:
            self._accounts.left_for_rerun(item.flight)

    # ------------------------------------------------------------ settling

    async def _send_again(self, flight: Flight) -> None:
        """Queue ``flight`` to go again under its own taskUUID (``Step.RESEND``),
        first in line for a slot like any submit: the API does not hold it (or may
        not), so it holds no slot meanwhile."""
        if not flight.wire:  # taken over from an earlier run: rebuilt alike
            uploaded = await self._uploader.resolve_all(flight.spec.local_files)
            request = flight.spec.request(uuid.UUID(flight.task_uuid), uploaded)
            flight.wire = request.wire
            flight.inherited_uploads = inherited_uploads(self._uploader, request)
        log.info(
            "%s: sending %s again under its taskUUID", flight.spec.key, flight.task_uuid
        )
        flight.resend = True
        flight.teaches_latency = False
        flight.next_poll_at = math.inf  # asked about again once sent
        self._accounts.free_slot(flight)
        self._ready.put_urgent(flight)

    def _time_out(self, flight: Flight, now: float) -> None:
        error = TaskTimeoutError(flight.task_uuid, now - flight.submitted_at)
        log.warning("%s (%s)", error, flight.spec.key)
        self._accounts.left_for_rerun(flight)

    # ------------------------------------------------------------ failures

    async def fail(
        self, flight: Flight, error: ErrorItem, *, retryable: bool = False
    ) -> None:
        """The API failed ``flight``: journaled and counted, unless it was refused
        for a reference an earlier run uploaded (then it goes again)."""
        if flight.finished:
            self._poller.forget(flight)
            return
        if await self._refused_stale_upload(flight, error):
            return
        self._accounts.retire(flight)
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
        self._accounts.failed(flight, error)

    async def _refused_stale_upload(self, flight: Flight, error: ErrorItem) -> bool:
        """A reference uploaded by an earlier run was refused: upload it again.

        The refusal is a definite answer (nothing was billed), so the task goes
        again under a new taskUUID with freshly uploaded images.
        """
        if not any(p.startswith(_REFERENCE_PARAMETERS) for p in error.parameters):
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
        self._accounts.retire(flight)
        await self._append(lost_event(flight))
        request = await prepare(flight.spec, self._uploader)
        again = Prepared(flight.spec, request, replaces=flight.task_uuid)
        self._accounts.replaced(flight, again)
        await self._resubmit(again)
        return True
