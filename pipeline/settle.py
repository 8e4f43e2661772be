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

from dataclasses import dataclass
from enum import Enum

__all__ = ["Answer", "Settling", "Step"]


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
