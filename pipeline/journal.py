"""The append-only JSONL event journal: the source of truth for resume and the ledger.

One event a line (the models are in ``pipeline.journal_events``). A single writer
appends and fsyncs once per :meth:`JournalWriter.append` call, so callers batch the
events that belong together. The reader is tolerant: a torn or garbled line (a crash
mid-write, a disk hiccup) is skipped with a warning, never fatal, and event types or
fields from a newer remix are ignored. :func:`load_state` folds the events into a
:class:`ResumeState` that tells a resumed run what is done, what is still in flight at
the API and what it already paid for. :class:`JournalFold` holds what each event
means, once: resume, the ledger, status, reports and the gallery all fold the journal
with it (``pipeline.journal_offsets`` keeps line offsets, not events).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import (
    BinaryIO,
    Final,
    Generic,
    Self,
    TypeVar,
)

import anyio
import anyio.to_thread
from pydantic import (
    ValidationError,
)

from pipeline.errors import StorageError
from pipeline.journal_events import (
    EVENT_ADAPTER,
    AcceptedEvent,
    CompletedEvent,
    Event,
    FailedEvent,
    LostEvent,
    RerunEvent,
    RunEndedEvent,
    RunStartedEvent,
    SentEvent,
    SubmittedEvent,
    UploadedEvent,
    encode_events,
)

log = logging.getLogger(__name__)

JOURNAL_NAME: Final = "journal.jsonl"
"""The journal's file name inside a run directory."""


_UNKNOWN_TAG: Final = frozenset({"union_tag_invalid"})


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


def read_journal_lines(path: Path) -> Iterator[tuple[int, Event]]:
    """Yield ``(byte offset of its line, event)`` for ``path``, in order.

    A missing file yields nothing. Bad lines are logged (with their line number)
    and skipped, so a crash mid-write never blocks a resume.
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        held: tuple[int, int, bytes] | None = None
        end = 0
        for lineno, line in enumerate(f, 1):
            start, end = end, end + len(line)
            if held is not None:
                event = _parse(held[2], held[0], False, path)
                if event is not None:
                    yield held[1], event
            held = (lineno, start, line) if line.strip() else None
        if held is not None:
            event = _parse(held[2], held[0], True, path)
            if event is not None:
                yield held[1], event


def read_journal(path: Path) -> Iterator[Event]:
    """Yield the events of ``path`` in order, skipping lines that do not parse.

    A missing file yields nothing. Bad lines are logged (with their line number)
    and skipped, so a crash mid-write never blocks a resume.
    """
    for _, event in read_journal_lines(path):
        yield event


def read_event_at(f: BinaryIO, offset: int) -> Event:
    """The event on the line at ``offset`` of an open journal (one that parsed)."""
    f.seek(offset)
    return EVENT_ADAPTER.validate_json(f.readline())


# ---------------------------------------------------------------------------
# The fold: what the events mean, written once

C = TypeVar("C")
"""What a fold keeps of a completion (the event, or where its line is)."""
S = TypeVar("S")
"""What a fold keeps of a submission."""
F = TypeVar("F")
"""What a fold keeps of a failure."""


@dataclass
class JournalFold(ABC, Generic[C, S, F]):
    """The one place that says what journal events mean, folded with :meth:`apply`.

    ``pending`` holds the submissions a resume must poll before anything else:
    tasks of keys that are not complete, not failed, whose UUID is neither lost
    nor failed nor replaced. ``spent_usd`` counts each paid image once, by
    (task UUID, index), so a duplicated journal line never bills twice; a paid
    image whose index another task UUID already filled is superseded.

    What is kept of each event is up to the subclass: :class:`ResumeState` keeps
    the events themselves, ``journal_offsets.JournalOffsets`` only where their lines
    are, so a
    100k-image journal folds in a few tens of MB. The ``*_event`` methods give the
    event back either way.
    """

    completed_images: dict[str, dict[int, C]] = field(default_factory=dict)
    """key -> image index -> the first completion of that image."""
    superseded: list[tuple[str, int, C]] = field(default_factory=list)
    """``(key, image index, completion)`` of paid images of an already filled index."""
    pending: dict[str, list[S]] = field(default_factory=dict)
    failed: dict[str, F] = field(default_factory=dict)
    """The last failure per key; cleared by a later submission or completion."""
    submitted: dict[str, S] = field(default_factory=dict, repr=False)
    """Task UUID -> its (last) submission; every task UUID ever sent."""
    images_expected: dict[str, int] = field(default_factory=dict)
    """key -> images its latest submission asked for."""
    keys: dict[str, None] = field(default_factory=dict, repr=False)
    """Every key submitted, completed or failed, in first-seen order."""
    lost: set[str] = field(default_factory=set)
    uploads: dict[str, str] = field(default_factory=dict)
    """Reference content sha256 -> uploaded image UUID."""
    accepted_uuids: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    """Task UUIDs journaled ahead by a run that journals ``sent`` lines, in no
    ``sent`` line yet (nor lost): not sent, as far as the journal knows."""
    spent_usd: Decimal = Decimal(0)
    events_count: int = 0
    run_started: RunStartedEvent | None = None
    """The first run_started event (the original run's identity)."""
    run_ended: RunEndedEvent | None = None
    """The last run_ended event."""
    last_started: RunStartedEvent | None = None
    """The latest run_started: the current totals and plan estimate."""
    last_ended: RunEndedEvent | None = None
    """The run_ended that closed the latest run_started, if any."""
    last_event_at: datetime | None = None
    moved_paths: dict[tuple[str, int], str] = field(default_factory=dict, repr=False)
    """(task UUID, image index) -> where a rerun moved that image."""
    _paid: set[tuple[str, int]] = field(default_factory=set, repr=False)
    _finished: set[str] = field(default_factory=set, repr=False)
    _journals_sent: bool = field(default=False, repr=False)

    # What is kept of an event, and the event back from what was kept.

    @abstractmethod
    def _keep_completed(self, event: CompletedEvent) -> C: ...

    @abstractmethod
    def _keep_submitted(self, event: SubmittedEvent) -> S: ...

    @abstractmethod
    def _keep_failed(self, event: FailedEvent) -> F: ...

    @abstractmethod
    def task_of(self, submission: S) -> str:
        """The task UUID of a kept submission."""

    @abstractmethod
    def completed_event(self, kept: C) -> CompletedEvent:
        """The completion event ``kept`` stands for."""

    @abstractmethod
    def submitted_event(self, kept: S) -> SubmittedEvent:
        """The submission event ``kept`` stands for."""

    @abstractmethod
    def failed_event(self, kept: F) -> FailedEvent:
        """The failure event ``kept`` stands for."""

    # Questions

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

    @property
    def submitted_uuids(self) -> set[str]:
        """Every task UUID ever sent: never send one again."""
        return set(self.submitted)

    def pending_uuids(self) -> list[str]:
        """Task UUIDs to poll first on resume, in journal order."""
        return [self.task_of(s) for subs in self.pending.values() for s in subs]

    def sent_and_queued(self) -> tuple[list[str], list[str]]:
        """The pending task UUIDs split: sent (at the API), and journaled ahead but
        not sent (queued), in journal order."""
        pending = self.pending_uuids()
        return (
            [u for u in pending if u not in self.queued],
            [u for u in pending if u in self.queued],
        )

    # The rules

    def apply(self, event: Event) -> None:
        """Fold one event into the state."""
        self.events_count += 1
        self.last_event_at = event.ts
        match event:
            case UploadedEvent():
                self.uploads[event.sha256] = event.image_uuid
            case SubmittedEvent():
                self._on_submitted(event)
                if self._journals_sent:
                    self.queued.add(event.task_uuid)
            case SentEvent():
                self.queued.difference_update(event.task_uuids)
            case AcceptedEvent():
                self.accepted_uuids.add(event.task_uuid)
            case CompletedEvent():
                self._on_completed(event)
            case FailedEvent():
                self.keys.setdefault(event.key)
                self.failed[event.key] = self._keep_failed(event)
                if event.task_uuid is not None:
                    self._finished.add(event.task_uuid)
                self.pending.pop(event.key, None)
            case LostEvent():
                self.queued.discard(event.task_uuid)
                self.lost.add(event.task_uuid)
                self._finished.add(event.task_uuid)
                self._drop_pending(event.key, event.task_uuid)
            case RunStartedEvent():
                if self.run_started is None:
                    self.run_started = event
                self.last_started, self.last_ended = event, None
                self._journals_sent = event.journals_sent
            case RunEndedEvent():
                self.run_ended = self.last_ended = event
            case RerunEvent():
                self._on_rerun(event)

    def _on_submitted(self, event: SubmittedEvent) -> None:
        key = event.key
        self.keys.setdefault(key)
        kept = self._keep_submitted(event)
        self.submitted[event.task_uuid] = kept
        self.images_expected[key] = event.images
        self.failed.pop(key, None)
        if event.replaces is not None:
            self._finished.add(event.replaces)
            self._drop_pending(key, event.replaces)
        if not self.is_complete(key) and event.task_uuid not in self._finished:
            self.pending.setdefault(key, []).append(kept)

    def _on_completed(self, event: CompletedEvent) -> None:
        paid = (event.task_uuid, event.index)
        if paid in self._paid:
            return  # the same image journaled twice: count it once
        self._paid.add(paid)
        self.keys.setdefault(event.key)
        if event.cost_usd is not None:
            self.spent_usd += event.cost_usd
        images = self.completed_images.setdefault(event.key, {})
        kept = self._keep_completed(event)
        if event.index in images:
            self.superseded.append((event.key, event.index, kept))
        else:
            images[event.index] = kept
        self.failed.pop(event.key, None)
        if self.is_complete(event.key):
            self.pending.pop(event.key, None)

    def _on_rerun(self, event: RerunEvent) -> None:
        """The key's images become superseded and it is open to be sent again."""
        key = event.key
        self.keys.setdefault(key)
        images = self.completed_images.pop(key, {})
        for index in sorted(images):
            kept = images[index]
            self.superseded.append((key, index, kept))
        for sub in self.pending.pop(key, ()):
            self._finished.add(self.task_of(sub))
        self.images_expected.pop(key, None)
        self.failed.pop(key, None)
        for task_uuid, index, path in event.moved:
            self.moved_paths[task_uuid, index] = path

    def _drop_pending(self, key: str, task_uuid: str) -> None:
        subs = self.pending.get(key)
        if subs is None:
            return
        kept = [s for s in subs if self.task_of(s) != task_uuid]
        if kept:
            self.pending[key] = kept
        else:
            del self.pending[key]


@dataclass
class ResumeState(JournalFold[CompletedEvent, SubmittedEvent, FailedEvent]):
    """The journal folded with its events kept: what a resumed run needs."""

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> Self:
        """Fold ``events`` (in journal order) into a new state."""
        state = cls()
        for event in events:
            state.apply(event)
        return state

    @property
    def superseded_images(self) -> list[CompletedEvent]:
        """Paid images of a key whose index was already filled by another task."""
        return [event for _, _, event in self.superseded]

    def _keep_completed(self, event: CompletedEvent) -> CompletedEvent:
        return event

    def _keep_submitted(self, event: SubmittedEvent) -> SubmittedEvent:
        return event

    def _keep_failed(self, event: FailedEvent) -> FailedEvent:
        return event

    def task_of(self, submission: SubmittedEvent) -> str:
        return submission.task_uuid

    def completed_event(self, kept: CompletedEvent) -> CompletedEvent:
        return kept

    def submitted_event(self, kept: SubmittedEvent) -> SubmittedEvent:
        return kept

    def failed_event(self, kept: FailedEvent) -> FailedEvent:
        return kept


def load_state(path: Path) -> ResumeState:
    """Read the journal at ``path`` (missing: empty) into a :class:`ResumeState`."""
    return ResumeState.from_events(read_journal(path))
