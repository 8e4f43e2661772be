"""How remix reads the API's answers: which codes mean what, and what each task's
answer says (runware-protocol.md §2, §3, §7 and §10).

Runware documents only part of its answers and its clients disagree, so every code
family remix acts on is an explicit set here, in one place, and each answer shape the
dialects use is read the same way wherever it comes from:

- a failed generation, as an ``errors`` item or as a ``data`` item with
  ``status: "error"`` and a nested ``error``;
- an unknown taskUUID, as a code of the not-found family, as no item at all, or as a
  "processing" item (which only the settling rule in ``settle`` can see through);
- a reused taskUUID (``conflictTaskUUID`` / ``duplicateTaskUUID``): accepted earlier;
- credit refusals beside acks in one submit answer: the acks count.

This module is pure: envelopes in, outcomes out. HTTP and retries are the client's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from pipeline.wire import (
    Envelope,
    ErrorItem,
    FailedItem,
    ImageResult,
    Processing,
    UploadResult,
)

__all__ = [
    "AUTH_CODES",
    "CREDIT_CODES",
    "NOT_FOUND_CODES",
    "REUSED_UUID_CODES",
    "PollOutcome",
    "SubmitOutcome",
    "describe",
    "is_credit_refusal",
    "read_poll",
    "read_submit",
]

AUTH_CODES: Final = frozenset({"invalidApiKey", "missingApiKey", "unauthorized"})
"""The key is missing or refused: run-fatal under any HTTP status."""

CREDIT_CODES: Final = frozenset(
    {
        "insufficientCredits",
        "insufficientBalance",
        "insufficientFunds",
        "notEnoughCredits",
        "paymentRequired",
        "quotaExceeded",
    }
)
"""The account cannot pay. Undocumented: the SDK matches any code containing
"Credits", "Balance" or "Quota"; remix names the plausible spellings instead, so a
task-level code that merely contains one of those words is not taken for an empty
account. HTTP 402 is a credit refusal whatever its code."""

REUSED_UUID_CODES: Final = frozenset({"conflictTaskUUID", "duplicateTaskUUID"})
"""The server already accepted this taskUUID (docs and legacy SDK: conflict; other
servers: duplicate). It bills nothing for the refusal: the task is accepted."""

NOT_FOUND_CODES: Final = frozenset(
    {"taskFailedOrNotFound", "taskNotFound", "taskExpired"}
)
"""getResponse does not know this taskUUID (not yet, never, or no longer): the SDKs
map taskFailedOrNotFound; the TypeScript SDK's tests also use the other two."""


def is_credit_refusal(error: ErrorItem) -> bool:
    return error.code in CREDIT_CODES


def describe(errors: Iterable[ErrorItem]) -> str:
    """``code: message; ...`` for a log line or an error message."""
    parts = [f"{e.code}: {e.message}".rstrip(": ") for e in errors]
    return "; ".join(parts) if parts else "no error details"


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """What one submit request told us, by taskUUID (as str).

    Every task sent is in exactly one of ``accepted``, ``already_accepted``,
    ``failed``, ``credit_refused`` and ``ambiguous``; a task may also have
    ``results`` (a sync answer).
    """

    accepted: list[str] = field(default_factory=list)
    """Acknowledged (or answered with data) now: poll these."""
    results: list[ImageResult] = field(default_factory=list)
    """Finished images that came back in the submit answer itself."""
    failed: dict[str, ErrorItem] = field(default_factory=dict)
    """Definite per-task refusals or failures: the server named the task."""
    already_accepted: list[str] = field(default_factory=list)
    """Refused as a reused taskUUID: an earlier send was accepted; poll these."""
    credit_refused: dict[str, ErrorItem] = field(default_factory=dict)
    """Refused because the account cannot pay: not accepted, not billed."""
    ambiguous: list[str] = field(default_factory=list)
    """Fate unknown (maybe billed): settle by polling, then by the same taskUUID."""

    @property
    def credit_message(self) -> str | None:
        """Why tasks were refused for credit, if any were."""
        if not self.credit_refused:
            return None
        return describe(list(self.credit_refused.values())[:1])


@dataclass(frozen=True, slots=True)
class PollOutcome:
    """What one getResponse request told us, matched by taskUUID."""

    results: list[ImageResult] = field(default_factory=list)
    """Finished images; replies are cumulative, so de-duplicate by imageUUID."""
    processing: set[str] = field(default_factory=set)
    """Said to be processing (any non-final status)."""
    failed: dict[str, ErrorItem] = field(default_factory=dict)
    not_found: set[str] = field(default_factory=set)
    """Answered with a code of the not-found family."""
    unanswered: set[str] = field(default_factory=set)
    """Asked about but absent from the answer."""
    batch_refused: bool = False
    """A request-level 4xx for a getResponse of several tasks: nothing was said
    about any of them; ask again one per request."""

    @property
    def answered(self) -> set[str]:
        """The taskUUIDs the answer said anything about."""
        done = {r.task_uuid for r in self.results}
        return done | self.processing | self.failed.keys() | self.not_found


def read_submit(
    envelope: Envelope, uuids: Sequence[str], *, request_level: bool, status: int
) -> SubmitOutcome:
    """Each sent task's fate from a submit answer (2xx, or a 4xx naming tasks).

    ``request_level``: a 4xx whose errors name none of the tasks. It refuses them all
    (definitely, so nothing was accepted), except that a 402 means "no credit" and a
    4xx that also acks tasks still accepted those.
    """
    wanted = set(uuids)
    accepted: set[str] = set()
    results: list[ImageResult] = []
    failed: dict[str, ErrorItem] = {}
    for item in envelope.data:
        if item.task_uuid not in wanted:
            continue
        match item:
            case FailedItem():
                failed[item.task_uuid] = item.as_error()
            case ImageResult():
                accepted.add(item.task_uuid)
                results.append(item)
            case Processing() | UploadResult():
                accepted.add(item.task_uuid)
    reused: set[str] = set()
    credit: dict[str, ErrorItem] = {}
    for err in envelope.errors:
        if err.task_uuid not in wanted:
            continue
        if err.code in REUSED_UUID_CODES:
            reused.add(err.task_uuid)
        elif is_credit_refusal(err):
            credit[err.task_uuid] = err
        else:
            failed[err.task_uuid] = err
    if request_level:
        err = envelope.errors[0] if envelope.errors else ErrorItem(code="unknown")
        for task_uuid in uuids:
            if task_uuid in accepted | reused | failed.keys() | credit.keys():
                continue
            if status == 402 or is_credit_refusal(err):
                credit.setdefault(task_uuid, err)
            else:
                failed.setdefault(task_uuid, err)
    accepted -= failed.keys() | reused | credit.keys()
    settled = accepted | reused | failed.keys() | credit.keys()
    return SubmitOutcome(
        accepted=[u for u in uuids if u in accepted],
        results=[r for r in results if r.task_uuid in accepted],
        failed={u: e for u, e in failed.items() if u not in reused},
        already_accepted=[u for u in uuids if u in reused],
        credit_refused={u: e for u, e in credit.items() if u not in reused},
        ambiguous=list(dict.fromkeys(u for u in uuids if u not in settled)),
    )


def read_poll(envelope: Envelope, uuids: Sequence[str]) -> PollOutcome:
    """Each asked task's state from a 2xx getResponse answer (or a 4xx about one)."""
    wanted = set(uuids)
    results: list[ImageResult] = []
    processing: set[str] = set()
    failed: dict[str, ErrorItem] = {}
    not_found_items: set[str] = set()
    for item in envelope.data:
        if item.task_uuid not in wanted:
            continue
        match item:
            case ImageResult():
                results.append(item)
            case FailedItem() if item.error.code in NOT_FOUND_CODES:
                not_found_items.add(item.task_uuid)
            case FailedItem():
                failed[item.task_uuid] = item.as_error()
            case Processing():
                processing.add(item.task_uuid)
            case UploadResult():
                pass  # not an answer to getResponse; ignore it
    not_found = not_found_items
    for err in envelope.errors:
        if err.task_uuid not in wanted:
            continue
        if err.code in NOT_FOUND_CODES:
            not_found.add(err.task_uuid)
        else:
            failed[err.task_uuid] = err
    not_found -= failed.keys()
    processing -= failed.keys() | not_found
    unanswered = wanted - processing - failed.keys() - not_found
    if unanswered and results:
        unanswered -= {r.task_uuid for r in results}
    return PollOutcome(results, processing, failed, not_found, unanswered)


def read_single_refusal(envelope: Envelope, task_uuid: str) -> PollOutcome:
    """A definite 4xx to a getResponse about one task: that answer is about it."""
    err = envelope.errors[0] if envelope.errors else ErrorItem(code="unknown")
    if err.code in NOT_FOUND_CODES:
        return PollOutcome(not_found={task_uuid})
    return PollOutcome(failed={task_uuid: err})
