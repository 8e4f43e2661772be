"""Settling a submit whose fate is unknown, without ever paying twice
(runware-protocol.md §7 a, b and §10).

A submit may have been accepted and billed even when its answer never came (a
timeout, a dropped connection, a 5xx or a malformed body after sending, a task missing
from the answer), and a task journaled as sent by a run that was killed is in the same
state. The taskUUID is the task's idempotency key: the API refuses a taskUUID it has
accepted (``conflictTaskUUID`` / ``duplicateTaskUUID``) and bills nothing for the
refusal. So:

1. First ask getResponse (free). A result or a failure settles it; so does
   "processing", but only from an API known to answer unknown tasks otherwise.
2. What is still unsettled after a grace period (a just-accepted task may not be
   visible yet) is **sent again under the same taskUUID**: a reuse refusal means the
   first send was accepted (keep polling); an ack means it was not (accepted now,
   once). A new taskUUID could only ever pay twice.

Whatever getResponse says of unknown tasks (a not-found code, nothing, or
"processing"), step 2 settles it. A task the API was seen working on and then no
longer knows has expired: it fails, retryable with ``--retry-failed``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from pipeline.answers import PollOutcome
from pipeline.dialect import Dialect, UnknownTask, save_dialect, unknown_task_answer
from pipeline.errors import PipelineError
from pipeline.journal_events import utc_now
from pipeline.records import Flight

__all__ = ["Answer", "Settler", "Settling", "Step"]


class Answer(Enum):
    """What one getResponse said about one task that is not done."""

    PROCESSING = "processing"
    NOT_FOUND = "not_found"
    SILENT = "silent"
    """The task was asked about and not mentioned."""


class Step(Enum):
    """What to do next about that task."""

    WAIT = "wait"
    """Ask again later."""
    RESEND = "resend"
    """Send it again under the same taskUUID."""
    EXPIRED = "expired"
    """It was there and is gone: fail it, retryable."""


@dataclass(frozen=True, slots=True)
class Settling:
    """The settling rule with this run's grace period and knowledge of the API."""

    grace_s: float
    processing_proves: bool
    """Whether this API answers unknown tasks with something other than
    "processing" (``Dialect.processing_proves_acceptance``)."""

    def proven(self, *, acked: bool, answered: bool, seen_processing: bool) -> bool:
        """Whether the API certainly holds the task: it acknowledged it (or
        refused it as a reused taskUUID), answered it with a result or failure, or
        said "processing" when that can only mean a known task."""
        return acked or answered or (seen_processing and self.processing_proves)

    def step(
        self,
        answer: Answer,
        *,
        proven: bool,
        seen_working: bool,
        since_sent_s: float,
    ) -> Step:
        """The next step after ``answer``, ``since_sent_s`` after the task's last
        send. ``seen_working``: it was proven and then seen processing or done."""
        if proven:
            if answer is not Answer.NOT_FOUND:
                return Step.WAIT
            if seen_working:
                return Step.EXPIRED
        return Step.RESEND if since_sent_s >= self.grace_s else Step.WAIT


class Settler:
    """The settling rule with what this run has learnt of its API's dialect: the
    engine's one place to ask what to do about a task that is not done, and to
    tell what an answer showed. What is learnt is kept in the run dir
    (``dialect.DIALECT_NAME``), where a resume starts from it."""

    def __init__(self, dialect: Dialect, *, grace_s: float, record: Path) -> None:
        self.dialect = dialect
        self._grace_s = grace_s
        self._record = record
        self._probed = False
        self.rule = self._rule()

    def _rule(self) -> Settling:
        return Settling(
            grace_s=self._grace_s,
            processing_proves=self.dialect.processing_proves_acceptance,
        )

    async def learn(self, **found: Any) -> None:
        """Record what an answer showed (``Dialect`` fields)."""
        self.dialect = self.dialect.model_copy(
            update={**found, "source": "run", "checked_at": utc_now()}
        )
        self.rule = self._rule()
        await anyio.to_thread.run_sync(save_dialect, self._record, self.dialect)

    async def probe_unknown_tasks(
        self, poll: Callable[[list[str]], Awaitable[PollOutcome]]
    ) -> bool:
        """Once, and only while it is not known: ask about a taskUUID nobody sent
        (free) whether "processing" proves an ambiguous submit was accepted.
        Returns whether a question was sent.

        Raises:
            PipelineError: a run-fatal answer (others: settling works without it).
        """
        if self._probed or self.dialect.unknown_task is not UnknownTask.UNKNOWN:
            return False
        self._probed = True
        try:
            outcome = await poll([str(uuid.uuid4())])
        except PipelineError as exc:
            if exc.run_fatal:
                raise
            return True
        if (found := unknown_task_answer(outcome)) is not UnknownTask.UNKNOWN:
            await self.learn(unknown_task=found)
        return True

    def step_for(self, flight: Flight, outcome: PollOutcome, now: float) -> Step:
        """What to do about ``flight``, not done, after ``outcome``."""
        task_uuid = flight.task_uuid
        if task_uuid in outcome.not_found:
            flight.not_found += 1
            answer = Answer.NOT_FOUND
        elif task_uuid in outcome.processing:
            answer = Answer.PROCESSING
        elif task_uuid in outcome.unanswered and not outcome.batch_refused:
            answer = Answer.SILENT
        else:
            return Step.WAIT
        sent_at = flight.last_sent_at
        return self.rule.step(
            answer,
            proven=flight.acked or bool(flight.seen),
            seen_working=flight.seen_processing or bool(flight.seen),
            since_sent_s=now - (flight.submitted_at if sent_at is None else sent_at),
        )
