"""The journal's events: one pydantic model per line kind, tagged by ``event``.

Our own file format, not the wire: keys are snake_case, money is an exact decimal
string, timestamps are timezone-aware UTC. Unknown fields (a newer remix) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the journal's only clock)."""
    return datetime.now(UTC)


class _EventBase(BaseModel):
    """Common config: frozen, and tolerant of fields written by a newer remix."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event: str
    ts: AwareDatetime = Field(default_factory=utc_now)
    """When the event was journaled (UTC)."""

    @field_validator("ts")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class UploadedEvent(_EventBase):
    """A local reference was uploaded once for its content hash."""

    event: Literal["uploaded"] = "uploaded"
    sha256: str
    image_uuid: str
    source: str
    """Where the bytes came from (the manifest's path), for humans."""


class SubmittedEvent(_EventBase):
    """A task is about to leave: written and fsynced BEFORE the request is sent."""

    event: Literal["submitted"] = "submitted"
    key: str
    task_uuid: str
    images: int = Field(ge=1)
    estimate_usd: Decimal = Field(allow_inf_nan=False)
    replaces: str | None = None
    """The task UUID this resubmission replaces (lost or failed before)."""


class SentEvent(_EventBase):
    """These tasks' submit requests left: one line per burst of requests, written
    beside them, never ahead. ``submitted`` is journaled ahead of sending; this tells
    a task at the API from one queued behind the concurrency limit (``remix
    status``). Resume does not read it: it asks about every pending task anyway."""

    event: Literal["sent"] = "sent"
    task_uuids: list[str]


class AcceptedEvent(_EventBase):
    """The API acknowledged a submitted task."""

    event: Literal["accepted"] = "accepted"
    key: str
    task_uuid: str


class CompletedEvent(_EventBase):
    """One image is durably stored (written after the file is in place)."""

    event: Literal["completed"] = "completed"
    key: str
    task_uuid: str
    image_uuid: str
    index: int = Field(ge=0)
    """0-based position of this image among the task's results."""
    seed: int | None = None
    cost_usd: Decimal | None = Field(default=None, allow_inf_nan=False)
    path: str
    """POSIX path relative to the run directory."""
    sha256: str
    bytes: int = Field(ge=0)
    submitted_at: AwareDatetime | None = None


class FailedEvent(_EventBase):
    """A task failed for this run; ``retryable`` says whether a rerun may help."""

    event: Literal["failed"] = "failed"
    key: str
    task_uuid: str | None = None
    code: str
    message: str
    parameter: list[str] = Field(default_factory=list)
    retryable: bool


class LostEvent(_EventBase):
    """The server does not know this task UUID: never polled again."""

    event: Literal["lost"] = "lost"
    key: str
    task_uuid: str


class RunStartedEvent(_EventBase):
    """A run (or a resume of it) started."""

    event: Literal["run_started"] = "run_started"
    run_id: str
    manifest_sha256: str
    tasks: int = Field(ge=0)
    images: int = Field(ge=0)
    estimate_usd: Decimal = Field(allow_inf_nan=False)
    shard: str | None = None
    journals_sent: bool = False
    """This run journals ``sent`` lines. False in journals of an older remix: its
    submitted tasks all count as sent."""


class RerunEvent(_EventBase):
    """A task's parameters changed and ``--rerun-changed`` runs it again: the images it
    has are superseded (moved aside, never overwritten) and it counts as not sent."""

    event: Literal["rerun"] = "rerun"
    key: str
    fingerprint: str
    """The task's new fingerprint (``pipeline.task_prints``)."""
    moved: list[tuple[str, int, str]] = Field(default_factory=list)
    """``(task UUID, image index, new path)`` of each image moved aside."""


class RunEndedEvent(_EventBase):
    """A run ended (finished, or stopped resumable)."""

    event: Literal["run_ended"] = "run_ended"
    reason: str
    done: int = Field(ge=0)
    failed: int = Field(ge=0)
    spent_usd: Decimal = Field(allow_inf_nan=False)


Event = Annotated[
    UploadedEvent
    | SubmittedEvent
    | SentEvent
    | AcceptedEvent
    | CompletedEvent
    | FailedEvent
    | LostEvent
    | RunStartedEvent
    | RunEndedEvent
    | RerunEvent,
    Field(discriminator="event"),
]
"""Any journal event, discriminated on ``event``."""

EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)


def encode_events(events: Iterable[Event]) -> bytes:
    """The JSONL bytes for ``events``, one line each, newline-terminated."""
    return b"".join(e.model_dump_json().encode() + b"\n" for e in events)
