"""The append-only JSONL event journal: the source of truth for resume and the ledger.

One event a line, each a pydantic model tagged by ``event``. A single writer appends
and fsyncs once per :meth:`JournalWriter.append` call, so callers batch the events
that belong together. The reader is tolerant: a torn or garbled line (a crash
mid-write, a disk hiccup) is skipped with a warning, never fatal, and event types
or fields from a newer remix are ignored. :func:`load_state` folds the events into
a :class:`ResumeState` that tells a resumed run what is done, what is still in
flight at the API and what it already paid for.

This is our own file format, not the wire: keys are snake_case, money is an exact
decimal string, timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Final, Literal, Self

import anyio
import anyio.to_thread
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from pipeline.errors import StorageError

log = logging.getLogger(__name__)

JOURNAL_NAME: Final = "journal.jsonl"
"""The journal's file name inside a run directory."""


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
    | AcceptedEvent
    | CompletedEvent
    | FailedEvent
    | LostEvent
    | RunStartedEvent
    | RunEndedEvent,
    Field(discriminator="event"),
]
"""Any journal event, discriminated on ``event``."""

EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)

_UNKNOWN_TAG: Final = frozenset({"union_tag_invalid"})


def encode_events(events: Iterable[Event]) -> bytes:
    """The JSONL bytes for ``events``, one line each, newline-terminated."""
    return b"".join(e.model_dump_json().encode() + b"\n" for e in events)


# ---------------------------------------------------------------------------
# Writing


def _storage_error(path: Path, exc: OSError, action: str) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        hint = "disk full? free some space and rerun the same command to resume"
    else:
        hint = "check the run directory is writable; the run is resumable"
    return StorageError(f"cannot {action} journal {path}: {reason} ({hint})")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_for_append(path: Path) -> int:
    """Open (creating) the journal, take the writer lock, terminate a torn line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _lock(fd, path)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            log.warning(
                "journal %s ends with a torn line (a crash mid-write); "
                "terminating it so new events start on a fresh line",
                path,
            )
            _write_all(fd, b"\n")
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock(fd: int, path: Path) -> None:
    """Hold an exclusive advisory lock: two processes must not share one journal."""
    if sys.platform == "win32":  # pragma: no cover - no flock there
        return
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StorageError(
            f"journal {path} is locked by another remix process; "
            "wait for it to finish or use another --run-dir"
        ) from None
    except OSError as exc:  # e.g. ENOLCK on some network filesystems
        log.debug("cannot lock journal %s (%s); continuing unlocked", path, exc)


def _append_sync(fd: int, data: bytes) -> None:
    _write_all(fd, data)
    os.fsync(fd)


class JournalWriter:
    """The single writer of one journal file.

    Use ``async with JournalWriter.open(path) as journal:``; every
    :meth:`append` is durable (fsynced) when it returns.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._lock = anyio.Lock()
        self.events_written = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Self]:
        """Open ``path`` for appending (creating it) and close it on exit.

        Raises:
            StorageError: the file cannot be opened, or another process holds it.
        """
        try:
            fd = await anyio.to_thread.run_sync(_open_for_append, path)
        except OSError as exc:
            raise _storage_error(path, exc, "open") from exc
        try:
            yield cls(path, fd)
        finally:
            os.close(fd)  # cheap and non-blocking; also releases the flock

    async def append(self, *events: Event) -> None:
        """Write ``events`` as lines, then flush and fsync once.

        Raises:
            StorageError: the write failed (disk full, I/O error).
        """
        if not events:
            return
        data = encode_events(events)
        async with self._lock:
            try:
                await anyio.to_thread.run_sync(_append_sync, self._fd, data)
            except OSError as exc:
                raise _storage_error(self.path, exc, "append to") from exc
            self.events_written += len(events)


# ---------------------------------------------------------------------------
# Reading


def _parse(line: bytes, lineno: int, is_last: bool, path: Path) -> Event | None:
    try:
        return EVENT_ADAPTER.validate_json(line)
    except ValidationError as exc:
        types = {e["type"] for e in exc.errors(include_url=False)}
        if types <= _UNKNOWN_TAG:
            log.debug("%s:%d: unknown event type (newer remix?); skipped", path, lineno)
        elif is_last:
            log.warning(
                "%s:%d: torn or garbled last line skipped (a crash mid-write?)",
                path,
                lineno,
            )
        else:
            log.warning(
                "%s:%d: garbled line skipped: %s",
                path,
                lineno,
                exc.errors(include_url=False)[0]["msg"],
            )
        return None


def read_journal(path: Path) -> Iterator[Event]:
    """Yield the events of ``path`` in order, skipping lines that do not parse.

    A missing file yields nothing. Bad lines are logged (with their line number)
    and skipped, so a crash mid-write never blocks a resume.
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        held: tuple[int, bytes] | None = None
        for lineno, line in enumerate(f, 1):
            if held is not None:
                event = _parse(held[1], held[0], False, path)
                if event is not None:
                    yield event
            held = (lineno, line) if line.strip() else None
        if held is not None:
            event = _parse(held[1], held[0], True, path)
            if event is not None:
                yield event


# ---------------------------------------------------------------------------
# Resume state


@dataclass
class ResumeState:
    """What the journal says about a run, folded event by event with :meth:`apply`.

    ``pending`` holds the submissions a resume must poll before anything else:
    tasks of keys that are not complete, not failed, whose UUID is neither lost
    nor failed nor replaced. ``spent_usd`` counts each paid image once, by
    (task UUID, index), so a duplicated journal line never bills twice.
    """

    completed_images: dict[str, dict[int, CompletedEvent]] = field(default_factory=dict)
    """key -> image index -> the first completion of that image."""
    superseded_images: list[CompletedEvent] = field(default_factory=list)
    """Paid images of a key whose index was already filled by another task UUID."""
    pending: dict[str, list[SubmittedEvent]] = field(default_factory=dict)
    failed: dict[str, FailedEvent] = field(default_factory=dict)
    """The last failure per key; cleared by a later submission or completion."""
    lost: set[str] = field(default_factory=set)
    uploads: dict[str, str] = field(default_factory=dict)
    """Reference content sha256 -> uploaded image UUID."""
    submitted_uuids: set[str] = field(default_factory=set)
    """Every task UUID ever sent: never send one again."""
    accepted_uuids: set[str] = field(default_factory=set)
    spent_usd: Decimal = Decimal(0)
    images_expected: dict[str, int] = field(default_factory=dict)
    events_count: int = 0
    run_started: RunStartedEvent | None = None
    """The first run_started event (the original run's identity)."""
    run_ended: RunEndedEvent | None = None
    """The last run_ended event."""
    submitted: dict[str, SubmittedEvent] = field(default_factory=dict, repr=False)
    """task UUID -> its submission (for submitted_at and estimates)."""
    _paid: set[tuple[str, int]] = field(default_factory=set, repr=False)
    _finished: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> Self:
        """Fold ``events`` (in journal order) into a new state."""
        state = cls()
        for event in events:
            state.apply(event)
        return state

    def is_complete(self, key: str) -> bool:
        """True when every expected image of ``key`` is stored.

        A key with completions but no journaled submission counts as complete:
        better to skip it than to pay twice.
        """
        got = len(self.completed_images.get(key, ()))
        expected = self.images_expected.get(key)
        return got > 0 and (expected is None or got >= expected)

    @property
    def done_keys(self) -> set[str]:
        """Keys whose images are all stored."""
        return {k for k in self.completed_images if self.is_complete(k)}

    @property
    def images_done(self) -> int:
        """Stored images (each key/index once)."""
        return sum(len(v) for v in self.completed_images.values())

    def pending_uuids(self) -> list[str]:
        """Task UUIDs to poll first on resume, in journal order."""
        return [s.task_uuid for subs in self.pending.values() for s in subs]

    def apply(self, event: Event) -> None:
        """Fold one event into the state."""
        self.events_count += 1
        match event:
            case UploadedEvent():
                self.uploads[event.sha256] = event.image_uuid
            case SubmittedEvent():
                self._on_submitted(event)
            case AcceptedEvent():
                self.accepted_uuids.add(event.task_uuid)
            case CompletedEvent():
                self._on_completed(event)
            case FailedEvent():
                self.failed[event.key] = event
                if event.task_uuid is not None:
                    self._finished.add(event.task_uuid)
                self.pending.pop(event.key, None)
            case LostEvent():
                self.lost.add(event.task_uuid)
                self._finished.add(event.task_uuid)
                self._drop_pending(event.key, event.task_uuid)
            case RunStartedEvent():
                if self.run_started is None:
                    self.run_started = event
            case RunEndedEvent():
                self.run_ended = event

    def _on_submitted(self, event: SubmittedEvent) -> None:
        key = event.key
        self.submitted_uuids.add(event.task_uuid)
        self.submitted[event.task_uuid] = event
        self.images_expected[key] = event.images
        self.failed.pop(key, None)
        if event.replaces is not None:
            self._finished.add(event.replaces)
            self._drop_pending(key, event.replaces)
        if not self.is_complete(key) and event.task_uuid not in self._finished:
            self.pending.setdefault(key, []).append(event)

    def _on_completed(self, event: CompletedEvent) -> None:
        paid = (event.task_uuid, event.index)
        if paid in self._paid:
            return  # the same image journaled twice: count it once
        self._paid.add(paid)
        if event.cost_usd is not None:
            self.spent_usd += event.cost_usd
        images = self.completed_images.setdefault(event.key, {})
        if event.index in images:
            self.superseded_images.append(event)
        else:
            images[event.index] = event
        self.failed.pop(event.key, None)
        if self.is_complete(event.key):
            self.pending.pop(event.key, None)

    def _drop_pending(self, key: str, task_uuid: str) -> None:
        subs = self.pending.get(key)
        if subs is None:
            return
        kept = [s for s in subs if s.task_uuid != task_uuid]
        if kept:
            self.pending[key] = kept
        else:
            del self.pending[key]


def load_state(path: Path) -> ResumeState:
    """Read the journal at ``path`` (missing: empty) into a :class:`ResumeState`."""
    return ResumeState.from_events(read_journal(path))
