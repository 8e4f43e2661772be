"""The records the engine's stages pass between them (a task in flight, an image on
its way to disk) and what a run takes and reports: one home for what they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pipeline.exit_codes import ExitCode
from pipeline.expand import TaskSpec
from pipeline.journal import JournalFold
from pipeline.journal_events import LostEvent, utc_now
from pipeline.shard import Shard
from pipeline.wire import ImageInferenceRequest, ImageResult


def lost_event(flight: Flight) -> LostEvent:
    """The journal line for a taskUUID that never reached the API (or was refused
    outright): a rerun submits its task afresh instead of asking about it."""
    return LostEvent(ts=utc_now(), key=flight.spec.key, task_uuid=flight.task_uuid)


FAILURES_SHOWN = 5
"""Failed tasks whose reasons the summary names (the ledger lists them all)."""


@dataclass(frozen=True)
class RunDirCounts:
    """Where the run dir's tasks (the job's, or the shard's) stand, folded from the
    journal: what ``remix status`` counts, and what the exit code follows."""

    total: int
    done: int
    failed: int
    """Failed for good (``--retry-failed`` sends them again)."""
    in_flight: int
    """Sent and not collected: a rerun asks about them."""
    not_sent: int
    failures: tuple[tuple[str, str, str], ...] = ()
    """``(key, code, message)`` of the first few failed tasks."""

    @property
    def left(self) -> int:
        """Neither done nor failed: a rerun sends or collects them."""
        return self.in_flight + self.not_sent

    @classmethod
    def of(cls, state: JournalFold[Any, Any, Any], total: int) -> RunDirCounts:
        """The counts as ``status.run_status`` makes them, for ``total`` tasks."""
        done = len(state.done_keys)
        failed_keys = [k for k in state.failed if not state.is_complete(k)]
        in_flight = len(state.pending)
        failures = tuple(
            (key, event.code, event.message)
            for key in failed_keys[:FAILURES_SHOWN]
            for event in [state.failed_event(state.failed[key])]
        )
        return cls(
            total=total,
            done=done,
            failed=len(failed_keys),
            in_flight=in_flight,
            not_sent=max(0, total - done - len(failed_keys) - in_flight),
            failures=failures,
        )


@dataclass
class RunSummary:
    """Public counters of one run (also what tests assert on)."""

    tasks_total: int = 0
    images_total: int = 0
    tasks_done: int = 0
    """Tasks done by this run (the run dir's count is ``after.done``)."""
    tasks_done_before: int = 0
    """Tasks an earlier run had done."""
    images_done: int = 0
    images_new: int = 0
    tasks_failed: int = 0
    tasks_skipped_failed: int = 0
    tasks_unfinished: int = 0
    tasks_unsubmitted: int = 0
    submitted: int = 0
    resubmitted: int = 0
    resent: int = 0
    """Tasks sent again under the same taskUUID to settle an ambiguous submit."""
    resumed: int = 0
    lost: int = 0
    submit_requests: int = 0
    poll_requests: int = 0
    uploads: int = 0
    max_in_flight: int = 0
    adaptive_floor: int = 0
    """The lowest the concurrency limit went after 429/503/504 answers (AIMD)."""
    latency_s: float | None = None
    """The API's latency per task as learnt in this run (None: no task finished)."""
    spent_usd: Decimal = Decimal(0)
    spent_this_run_usd: Decimal = Decimal(0)
    missing_cost_images: int = 0
    stop_reason: str | None = None
    stop_message: str | None = None
    wall_s: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    outputs_error: str | None = None
    """Why ledger.csv or gallery.html could not be written after the run, if so."""
    budget_next_usd: Decimal | None = None
    """The price of the first task the budget did not cover, if one did not fit."""
    after: RunDirCounts | None = None
    """The run dir's tasks after the run (the runner folds the journal)."""

    @property
    def api_requests(self) -> int:
        """Submits + polls + uploads (downloads excluded)."""
        return self.submit_requests + self.poll_requests + self.uploads

    @property
    def exit_code(self) -> ExitCode:
        """STOPPED while anything is left to do (resumable), FAILED when tasks failed
        for good, else OK; a ledger or gallery that could not be written is STOPPED
        too (a rerun writes them).

        It follows the run dir (``after``), not what this run did: a rerun with
        nothing to do exits as the dir stands.
        """
        if self.outputs_error is not None:
            return ExitCode.STOPPED
        if self.after is not None:
            if self.after.left:
                return ExitCode.STOPPED
            return ExitCode.FAILED if self.after.failed else ExitCode.OK
        if (
            self.stop_reason is not None
            or self.tasks_unfinished
            or self.tasks_unsubmitted
            or self.outputs_error is not None
        ):
            return ExitCode.STOPPED
        if self.tasks_failed or self.tasks_skipped_failed:
            return ExitCode.FAILED
        return ExitCode.OK


@dataclass(frozen=True)
class EngineOptions:
    concurrency: int
    budget_usd: Decimal | None = None
    retry_failed: bool = False
    shard: Shard | None = None
    handle_signals: bool = False
    """Install SIGINT/SIGTERM handlers (the CLI does; tests stop it directly)."""


@dataclass(eq=False)
class Prepared:
    spec: TaskSpec
    request: ImageInferenceRequest
    replaces: str | None = None

    @property
    def task_uuid(self) -> str:
        return str(self.request.task_uuid)


@dataclass(eq=False)
class Flight:
    """One taskUUID the API may be working on."""

    spec: TaskSpec
    task_uuid: str
    wire: dict[str, Any]
    submitted_at: float
    """When it was sent (clock); when a resumed run took it over, for old ones."""
    submitted_wall: datetime | None
    reserved_per_image: Decimal
    next_poll_at: float
    backoff_s: float
    acked: bool = False
    ambiguous: bool = False
    seen_processing: bool = False
    asks: int = 0
    """getResponse questions about it so far (answered or not)."""
    teaches_latency: bool = True
    """Its ``submitted_at`` is when it was really sent (not a resume of an earlier
    run), so when it is found done says something about the latency. Ambiguous
    submits count: an API that acks with an empty ``data`` makes every submit one."""
    not_found: int = 0
    last_sent_at: float | None = None
    """When it was last sent again under its taskUUID (settling), clock time."""
    resend: bool = False
    """Waiting to go again under its taskUUID (it was sent before)."""
    last_processing_at: float | None = None
    seen: set[str] = field(default_factory=set)
    taken: set[int] = field(default_factory=set)
    """Image indices stored or being fetched: a new result takes the lowest free."""
    stored: int = 0
    holds_slot: bool = True
    inherited_uploads: tuple[str, ...] = ()
    """Image UUIDs in the request that an earlier run uploaded (they may expire)."""
    finished: bool = False
    request: ImageInferenceRequest | None = None
    """Until it is sent; afterwards ``wire`` is all that is kept."""
    replaces: str | None = None

    @property
    def assigned(self) -> int:
        """Images stored or on their way to disk."""
        return len(self.taken)


@dataclass(eq=False)
class Fetch:
    flight: Flight
    result: ImageResult
    index: int


@dataclass(eq=False)
class Stored:
    flight: Flight
    result: ImageResult
    index: int
    relpath: str
    sha256: str
    size: int


@dataclass(eq=False)
class Downloaded:
    job: Fetch
    data: bytes


@dataclass(eq=False)
class FetchFailed:
    flight: Flight
    result: ImageResult
    error: str
