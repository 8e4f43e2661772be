"""Cost ledger, run status and cost reports, derived from run directories alone.

Nothing here calls the API: the journal is the source of truth and everything is
rebuilt from it. The ledger (``ledger.csv``) has one row per image, plus one per
failed or in-flight task; its ``cost_usd`` column sums, exactly as decimals, to the
journal's ``spent_usd``: every paid image has a row, including one superseded by
another task filling the same slot. Reports group those rows (by reference, variant,
matrix axis, day or run) over any number of run dirs (nightly runs, shards) and set
the actual cost beside the plan's estimate. Status reads a run dir while a run may
still be writing to it, so it only reads, and a torn last journal line is skipped.

Text cells of every CSV are made safe for spreadsheets (a quote before a leading
``= + - @``), reversibly: :func:`read_ledger` gives back the exact rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Final, Literal, TextIO

from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.journal import (
    EVENT_ADAPTER,
    JOURNAL_NAME,
    CompletedEvent,
    Event,
    FailedEvent,
    LostEvent,
    ResumeState,
    RunEndedEvent,
    RunStartedEvent,
    SubmittedEvent,
    read_journal,
)
from pipeline.rundir import LOCK_NAME, RUN_INFO_NAME, read_run_info
from pipeline.shard import Shard
from pipeline.storage import write_atomic_text_stream

log = logging.getLogger(__name__)

LEDGER_NAME: Final = "ledger.csv"

EXIT_OK: Final = 0
EXIT_INVALID: Final = 2

Status = Literal["done", "superseded", "failed", "pending"]
_STATUSES: Final[tuple[Status, ...]] = ("done", "superseded", "failed", "pending")
_STATUS_ORDER: Final[dict[str, int]] = {s: i for i, s in enumerate(_STATUSES)}

_HEAD: Final = ("key", "reference", "variant")
_TAIL: Final = (
    "index",
    "task_uuid",
    "image_uuid",
    "seed",
    "cost_usd",
    "status",
    "path",
    "submitted_at",
    "completed_at",
    "latency_s",
    "error_code",
    "error_message",
)
_FIXED: Final = frozenset(_HEAD) | frozenset(_TAIL)

TOTAL_LABEL: Final = "(total)"
"""The grand total's group label; parentheses cannot occur in ids."""
NONE_LABEL: Final = "(none)"
"""The group of rows that lack the grouped-by value (no such axis, no time)."""


def parse_key(key: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """Split a task key ``ref/variant[/a=1,b=2]`` into reference, variant and axes."""
    reference, _, rest = key.partition("/")
    variant, _, axes_text = rest.partition("/")
    axes: list[tuple[str, str]] = []
    if axes_text:
        for item in axes_text.split(","):
            name, _, value = item.partition("=")
            axes.append((name, value))
    return reference, variant, tuple(axes)


# ---------------------------------------------------------------------------
# Spreadsheet-safe text

_FORMULA_START: Final = frozenset("=+-@\t\r")
_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_safe(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would run it as a formula.

    Prompts and error messages are user or server input; a cell starting with
    ``= + - @`` (or a tab or CR) is a formula to Excel and LibreOffice. Plain numbers
    such as ``-1`` stay as they are. Reversible with :func:`csv_unsafe`: text that
    already starts with quotes before such a character gets one more.
    """
    if text.lstrip("'")[:1] in _FORMULA_START and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_unsafe(text: str) -> str:
    """Undo :func:`csv_safe`."""
    if text.startswith("'") and text.lstrip("'")[:1] in _FORMULA_START:
        return text[1:]
    return text


# ---------------------------------------------------------------------------
# Ledger rows


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger line: an image, or a task that has no image (failed, pending)."""

    key: str
    status: Status
    index: int | None = None
    """0-based image index within its task; None for rows without an image."""
    task_uuid: str | None = None
    image_uuid: str | None = None
    seed: int | None = None
    cost_usd: Decimal | None = None
    path: str | None = None
    submitted_at: datetime | None = None
    completed_at: datetime | None = None
    """When the image was stored, or when the task failed."""
    error_code: str | None = None
    error_message: str | None = None

    @property
    def latency_s(self) -> float | None:
        """Seconds from submission to the image being stored, when both are known."""
        if self.submitted_at is None or self.completed_at is None:
            return None
        return (self.completed_at - self.submitted_at).total_seconds()


def _image_row(
    event: CompletedEvent, status: Status, submitted_at: datetime | None
) -> LedgerRow:
    """One image's ledger row; ``submitted_at`` fills in for older journals."""
    return LedgerRow(
        key=event.key,
        status=status,
        index=event.index,
        task_uuid=event.task_uuid,
        image_uuid=event.image_uuid,
        seed=event.seed,
        cost_usd=event.cost_usd,
        path=event.path,
        submitted_at=event.submitted_at or submitted_at,
        completed_at=event.ts,
    )


def _state_row(state: ResumeState, event: CompletedEvent, status: Status) -> LedgerRow:
    sub = state.submitted.get(event.task_uuid)
    return _image_row(event, status, sub.ts if sub else None)


def build_ledger_rows(state: ResumeState) -> list[LedgerRow]:
    """Ledger rows for a folded journal, sorted by key, status, then image index."""
    rows: list[LedgerRow] = []
    for images in state.completed_images.values():
        rows.extend(_state_row(state, e, "done") for e in images.values())
    rows.extend(_state_row(state, e, "superseded") for e in state.superseded_images)
    for key, failure in state.failed.items():
        sub = state.submitted.get(failure.task_uuid or "")
        rows.append(
            LedgerRow(
                key=key,
                status="failed",
                task_uuid=failure.task_uuid,
                submitted_at=None if sub is None else sub.ts,
                completed_at=failure.ts,
                error_code=failure.code,
                error_message=failure.message,
            )
        )
    for key, subs in state.pending.items():
        rows.extend(
            LedgerRow(
                key=key, status="pending", task_uuid=s.task_uuid, submitted_at=s.ts
            )
            for s in subs
        )
    rows.sort(key=lambda r: (r.key, _STATUS_ORDER[r.status], r.index or 0))
    return rows


def _axis_column(name: str) -> str:
    return f"axis:{name}" if name in _FIXED else name


def ledger_columns(rows: Iterable[LedgerRow]) -> list[str]:
    """The CSV header: fixed columns plus one per matrix axis, in first-seen order.

    An axis whose name clashes with a fixed column is spelled ``axis:<name>``.
    """
    return _columns_of_keys(row.key for row in rows)


def _columns_of_keys(keys: Iterable[str]) -> list[str]:
    axes: dict[str, None] = {}
    seen: set[str] = set()
    for key in keys:
        axes_text = key.split("/", 2)[2:]
        if not axes_text or axes_text[0] in seen:
            continue  # many rows share one axes part: parse each once
        seen.add(axes_text[0])
        for name, _ in parse_key(key)[2]:
            axes.setdefault(_axis_column(name))
    return [*_HEAD, *axes, *_TAIL]


def _cell(value: object) -> str:
    match value:
        case None:
            return ""
        case str():
            return csv_safe(value)
        case datetime():
            return value.isoformat()
        case float():
            return f"{value:.3f}"
        case _:
            return str(value)


def _csv_record(row: LedgerRow, columns: Sequence[str]) -> list[str]:
    reference, variant, axes = parse_key(row.key)
    values: dict[str, object] = {
        "key": row.key,
        "reference": reference,
        "variant": variant,
        "index": row.index,
        "task_uuid": row.task_uuid,
        "image_uuid": row.image_uuid,
        "seed": row.seed,
        "cost_usd": row.cost_usd,
        "status": row.status,
        "path": row.path,
        "submitted_at": row.submitted_at,
        "completed_at": row.completed_at,
        "latency_s": row.latency_s,
        "error_code": row.error_code,
        "error_message": row.error_message,
    }
    for name, value in axes:
        values[_axis_column(name)] = value
    return [_cell(values.get(c)) for c in columns]


def ledger_csv(rows: Sequence[LedgerRow]) -> str:
    """The ledger as CSV text (RFC 4180: CRLF rows, quoting; exact decimal costs)."""
    columns = ledger_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows(_csv_record(row, columns) for row in rows)
    return buf.getvalue()


def _opt(text: str) -> str | None:
    return csv_unsafe(text) if text else None


def _opt_int(text: str) -> int | None:
    return int(text) if text else None


def _opt_time(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _status(text: str) -> Status:
    for status in _STATUSES:
        if text == status:
            return status
    raise ValueError(f"unknown ledger status {text!r}")


def _parse_record(rec: dict[str, str]) -> LedgerRow:
    return LedgerRow(
        key=csv_unsafe(rec["key"]),
        status=_status(rec["status"]),
        index=_opt_int(rec["index"]),
        task_uuid=_opt(rec["task_uuid"]),
        image_uuid=_opt(rec["image_uuid"]),
        seed=_opt_int(rec["seed"]),
        cost_usd=Decimal(rec["cost_usd"]) if rec["cost_usd"] else None,
        path=_opt(rec["path"]),
        submitted_at=_opt_time(rec["submitted_at"]),
        completed_at=_opt_time(rec["completed_at"]),
        error_code=_opt(rec["error_code"]),
        error_message=_opt(rec["error_message"]),
    )


def parse_ledger(text: str) -> list[LedgerRow]:
    """Rows from ledger CSV text (the inverse of :func:`ledger_csv`).

    Empty cells read as None, so an empty error message comes back as None.

    Raises:
        ValueError: a cell does not parse (not a ledger written by remix).
    """
    return [_parse_record(rec) for rec in csv.DictReader(io.StringIO(text, newline=""))]


def read_ledger(path: Path) -> list[LedgerRow]:
    """The rows of a ``ledger.csv`` written by :func:`write_ledger`."""
    with path.open(encoding="utf-8", newline="") as f:  # keep \r inside cells
        return parse_ledger(f.read())


def write_ledger(run_dir: Path) -> Path:
    """Rebuild ``RUN_DIR/ledger.csv`` from the journal, atomically; return its path.

    Streams: the journal is indexed once (:func:`scan_journal`) and each row is
    written as it is read back, so memory stays at a few hundred bytes per key
    however many images the run has.

    Raises:
        StorageError: the ledger could not be written.
    """
    index = scan_journal(run_dir / JOURNAL_NAME)
    target = run_dir / LEDGER_NAME
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        columns = _columns_of_keys(index.row_keys())
        writer.writerow(columns)
        for row in iter_ledger_rows(index):
            writer.writerow(_csv_record(row, columns))
            count += 1
            if buf.tell() > 1 << 16:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    write_atomic_text_stream(target, lines())
    log.info("ledger %s: %d row(s), spent $%s", target, count, index.spent_usd)
    return target


# ---------------------------------------------------------------------------
# A big journal in compact form


@dataclass(slots=True)
class KeyFacts:
    """What the journal says about one task key, as byte offsets of its lines.

    The same fold as :class:`ResumeState`, minus the events themselves: a 100k-image
    journal indexes in a few tens of MB, and lines are read back when needed.
    """

    expected: int | None = None
    """Images the latest submission asked for."""
    images: tuple[int, ...] = ()
    """Flat ``(image index, offset)`` pairs: each index's first completion."""
    failure: int | None = None
    """Offset of the last failure (cleared by a later submission or completion)."""
    pending: tuple[tuple[str, int], ...] = ()
    """``(task UUID, offset)`` of the submissions still in flight, in journal order."""

    @property
    def image_count(self) -> int:
        """Stored images (each index once)."""
        return len(self.images) // 2

    @property
    def complete(self) -> bool:
        """Every expected image is stored (as :meth:`ResumeState.is_complete`)."""
        got = self.image_count
        return got > 0 and (self.expected is None or got >= self.expected)

    def offset_of(self, index: int) -> int | None:
        """The offset of image ``index``'s first completion, if any."""
        images = self.images
        for i in range(0, len(images), 2):
            if images[i] == index:
                return images[i + 1]
        return None

    def image_offsets(self) -> list[tuple[int, int]]:
        """``(image index, offset)`` pairs sorted by image index."""
        images = self.images
        return sorted(zip(images[::2], images[1::2], strict=True))

    @property
    def has_rows(self) -> bool:
        """True when the key has a ledger row: an image, a failure, a task in flight."""
        return bool(self.images) or self.failure is not None or bool(self.pending)


@dataclass
class JournalIndex:
    """A journal folded into :class:`KeyFacts` per key; events are read on demand."""

    path: Path
    keys: dict[str, KeyFacts] = field(default_factory=dict)
    superseded: list[tuple[str, int, str, int]] = field(default_factory=list)
    """``(key, image index, task UUID, offset)`` of paid images of a filled slot."""
    spent_usd: Decimal = Decimal(0)
    last_started: RunStartedEvent | None = None
    last_ended: RunEndedEvent | None = None
    _need_submit_times: set[str] = field(default_factory=set, repr=False)

    @property
    def images_done(self) -> int:
        """Stored images (each key/index once)."""
        return sum(f.image_count for f in self.keys.values())

    def row_keys(self) -> list[str]:
        """Sorted keys that have ledger rows."""
        return sorted(k for k, f in self.keys.items() if f.has_rows)

    def open(self) -> BinaryIO:
        """The journal opened for :meth:`read_at`."""
        return self.path.open("rb")

    def read_at(self, f: BinaryIO, offset: int) -> Event:
        """The event on the line at ``offset`` (it parsed when indexed)."""
        f.seek(offset)
        return EVENT_ADAPTER.validate_json(f.readline())

    def submit_times(self, f: BinaryIO) -> dict[str, datetime]:
        """Task UUID -> its last submission time, for the rows that need one.

        Completions journaled without ``submitted_at`` and failures take it from
        the submission; those are few, so this reads only their submissions.
        """
        want = set(self._need_submit_times)
        for facts in self.keys.values():
            if facts.failure is not None:
                failure = self.read_at(f, facts.failure)
                if isinstance(failure, FailedEvent) and failure.task_uuid:
                    want.add(failure.task_uuid)
        found: dict[str, datetime] = {}
        if not want:
            return found
        f.seek(0)
        for line in f:
            if b'"submitted"' not in line:
                continue
            try:
                event = EVENT_ADAPTER.validate_json(line)
            except ValidationError:
                continue
            if isinstance(event, SubmittedEvent) and event.task_uuid in want:
                found[event.task_uuid] = event.ts
        return found


def _indexed_events(path: Path) -> Iterator[tuple[int, Event]]:
    """``(offset, event)`` for each line of ``path`` that parses (like read_journal)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        end = 0
        for lineno, line in enumerate(f, 1):
            start, end = end, end + len(line)
            if not line.strip():
                continue
            try:
                yield start, EVENT_ADAPTER.validate_json(line)
            except ValidationError as exc:
                types = {e["type"] for e in exc.errors(include_url=False)}
                if types <= {"union_tag_invalid"}:
                    log.debug("%s:%d: unknown event type; skipped", path, lineno)
                else:
                    log.warning("%s:%d: torn or garbled line skipped", path, lineno)


def scan_journal(path: Path) -> JournalIndex:
    """Fold the journal at ``path`` (missing: empty) into a :class:`JournalIndex`.

    Gives the same images, failures and in-flight tasks as :func:`load_state`,
    assuming (as remix writes it) that a task UUID belongs to one key.
    """
    index = JournalIndex(path)
    keys = index.keys
    finished: set[str] = set()
    superseded_paid: set[tuple[str, int]] = set()
    reader: BinaryIO | None = None

    def facts_of(key: str) -> KeyFacts:
        found = keys.get(key)
        if found is None:
            found = keys[key] = KeyFacts()
        return found

    def drop_pending(facts: KeyFacts, task_uuid: str) -> None:
        if facts.pending:
            facts.pending = tuple(p for p in facts.pending if p[0] != task_uuid)

    try:
        for offset, event in _indexed_events(path):
            match event:
                case SubmittedEvent():
                    facts = facts_of(event.key)
                    facts.expected = event.images
                    facts.failure = None
                    if event.replaces is not None:
                        finished.add(event.replaces)
                        drop_pending(facts, event.replaces)
                    if not facts.complete and event.task_uuid not in finished:
                        facts.pending += ((event.task_uuid, offset),)
                case CompletedEvent():
                    facts = facts_of(event.key)
                    first = facts.offset_of(event.index)
                    if first is not None:
                        if reader is None:
                            reader = index.open()
                        earlier = index.read_at(reader, first)
                        assert isinstance(earlier, CompletedEvent)
                        paid = (event.task_uuid, event.index)
                        if earlier.task_uuid == event.task_uuid or (
                            paid in superseded_paid
                        ):
                            continue  # the same image journaled twice: count it once
                        superseded_paid.add(paid)
                        index.superseded.append(
                            (event.key, event.index, event.task_uuid, offset)
                        )
                    else:
                        facts.images += (event.index, offset)
                    if event.cost_usd is not None:
                        index.spent_usd += event.cost_usd
                    if event.submitted_at is None:
                        index._need_submit_times.add(event.task_uuid)
                    facts.failure = None
                    if facts.complete:
                        facts.pending = ()
                case FailedEvent():
                    facts = facts_of(event.key)
                    facts.failure = offset
                    if event.task_uuid is not None:
                        finished.add(event.task_uuid)
                    facts.pending = ()
                case LostEvent():
                    finished.add(event.task_uuid)
                    if (facts_or_none := keys.get(event.key)) is not None:
                        drop_pending(facts_or_none, event.task_uuid)
                case RunStartedEvent():
                    index.last_started, index.last_ended = event, None
                case RunEndedEvent():
                    index.last_ended = event
                case _:
                    pass
    finally:
        if reader is not None:
            reader.close()
    return index


def iter_ledger_rows(index: JournalIndex) -> Iterator[LedgerRow]:
    """The rows :func:`build_ledger_rows` gives, in its order, one at a time."""
    superseded: dict[str, list[tuple[int, int]]] = {}
    for key, image, _, offset in index.superseded:
        superseded.setdefault(key, []).append((image, offset))
    with index.open() as f:
        submit_times = index.submit_times(f)
        for key in index.row_keys():
            facts = index.keys[key]
            for _, offset in facts.image_offsets():
                event = index.read_at(f, offset)
                assert isinstance(event, CompletedEvent)
                yield _image_row(event, "done", submit_times.get(event.task_uuid))
            # sorted() is stable: equal indices keep their journal order
            for _, offset in sorted(superseded.get(key, ()), key=lambda p: p[0]):
                event = index.read_at(f, offset)
                assert isinstance(event, CompletedEvent)
                yield _image_row(event, "superseded", submit_times.get(event.task_uuid))
            if facts.failure is not None:
                failure = index.read_at(f, facts.failure)
                assert isinstance(failure, FailedEvent)
                yield LedgerRow(
                    key=key,
                    status="failed",
                    task_uuid=failure.task_uuid,
                    submitted_at=submit_times.get(failure.task_uuid or ""),
                    completed_at=failure.ts,
                    error_code=failure.code,
                    error_message=failure.message,
                )
            for task_uuid, offset in facts.pending:
                sub = index.read_at(f, offset)
                yield LedgerRow(
                    key=key, status="pending", task_uuid=task_uuid, submitted_at=sub.ts
                )


# ---------------------------------------------------------------------------
# One run dir, read once


@dataclass
class RunData:
    """Everything reports and status need from one run dir (one journal pass)."""

    run_dir: Path
    info: dict[str, object]
    """run.json (empty when missing or unreadable)."""
    state: ResumeState
    rows: list[LedgerRow]
    last_started: RunStartedEvent | None = None
    """The latest run_started: the current totals and plan estimate."""
    last_ended: RunEndedEvent | None = None
    """The run_ended that closed the latest run_started, if any."""
    last_event_at: datetime | None = None
    key_estimates: dict[str, SubmittedEvent] = field(default_factory=dict)
    """key -> its latest submission (estimate and submit time)."""

    @property
    def manifest(self) -> str | None:
        """The manifest path recorded in run.json."""
        value = self.info.get("manifest")
        return value if isinstance(value, str) else None

    @property
    def shard(self) -> str | None:
        """``I/N`` when this run dir holds one shard of a job."""
        value = self.info.get("shard")
        if isinstance(value, str):
            return value
        return None if self.last_started is None else self.last_started.shard

    @property
    def estimate_usd(self) -> Decimal | None:
        """The plan's estimate from the latest run_started."""
        return None if self.last_started is None else self.last_started.estimate_usd


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a run (its run.json or its journal)."""
    return (path / RUN_INFO_NAME).is_file() or (path / JOURNAL_NAME).is_file()


def _read_info(run_dir: Path) -> dict[str, object]:
    try:
        info = read_run_info(run_dir)
    except ConfigError as exc:
        log.warning("%s", exc)
        return {}
    return dict(info) if info else {}


def load_run(run_dir: Path) -> RunData:
    """Read ``run_dir``'s run.json and journal (a torn last line is skipped)."""
    state = ResumeState()
    last_started: RunStartedEvent | None = None
    last_ended: RunEndedEvent | None = None
    last_at: datetime | None = None
    event: Event
    for event in read_journal(run_dir / JOURNAL_NAME):
        state.apply(event)
        last_at = event.ts
        if isinstance(event, RunStartedEvent):
            last_started, last_ended = event, None
        elif isinstance(event, RunEndedEvent):
            last_ended = event
    # state.submitted is in journal order: the last submission of a key wins.
    estimates = {sub.key: sub for sub in state.submitted.values()}
    return RunData(
        run_dir=run_dir,
        info=_read_info(run_dir),
        state=state,
        rows=build_ledger_rows(state),
        last_started=last_started,
        last_ended=last_ended,
        last_event_at=last_at,
        key_estimates=estimates,
    )


# ---------------------------------------------------------------------------
# Status


def _lock_holder(path: Path) -> int | None:
    """The pid holding a lock on ``path`` per /proc/locks (Linux), else None.

    Read-only on purpose: taking the lock, even briefly, could make a starting run
    believe another run holds its directory.
    """
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if ident in fields:
            pid = fields[fields.index(ident) - 1]
            return int(pid) if pid.isdigit() else 0
    return None


@dataclass(frozen=True, slots=True)
class RunStatus:
    """Where a run dir stands, as ``remix status`` shows it."""

    run_dir: str
    manifest: str | None
    shard: str | None
    state: str
    """running, finished, finished-with-failures, stopped, interrupted, not-started."""
    detail: str
    running_pid: int | None
    finished: bool
    resumable: bool
    tasks_total: int | None
    done: int
    failed: int
    in_flight: int
    remaining: int | None
    images_done: int
    images_total: int | None
    spent_usd: Decimal
    estimate_usd: Decimal | None
    started_at: str | None
    last_activity: datetime | None
    pending_task_uuids: tuple[str, ...]
    resume_command: str | None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (decimals as exact strings, times as ISO 8601)."""
        return {
            "run_dir": self.run_dir,
            "manifest": self.manifest,
            "shard": self.shard,
            "state": self.state,
            "detail": self.detail,
            "running_pid": self.running_pid,
            "finished": self.finished,
            "resumable": self.resumable,
            "tasks_total": self.tasks_total,
            "done": self.done,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "remaining": self.remaining,
            "images_done": self.images_done,
            "images_total": self.images_total,
            "spent_usd": str(self.spent_usd),
            "estimate_usd": None
            if self.estimate_usd is None
            else str(self.estimate_usd),
            "started_at": self.started_at,
            "last_activity": None
            if self.last_activity is None
            else self.last_activity.isoformat(),
            "pending_task_uuids": list(self.pending_task_uuids),
            "resume_command": self.resume_command,
        }


def resume_command(run_dir: Path, manifest: str | None, shard: str | None) -> str:
    """The exact shell command that resumes this run dir."""
    parts = ["remix", "run", manifest or "MANIFEST", "--run-dir", str(run_dir)]
    if shard:
        parts += ["--shard", shard]
    return shlex.join(parts)


def run_status(run_dir: Path) -> RunStatus:
    """Fold ``run_dir`` into a :class:`RunStatus` (read-only; safe during a run)."""
    run = load_run(run_dir)
    state = run.state
    done = len(state.done_keys)
    failed = sum(1 for k in state.failed if not state.is_complete(k))
    in_flight = len(state.pending)
    total = None if run.last_started is None else run.last_started.tasks
    remaining = None if total is None else max(0, total - done - failed - in_flight)
    pid = _lock_holder(run_dir / LOCK_NAME) or _lock_holder(run_dir / JOURNAL_NAME)
    left = in_flight + (remaining or 0)
    finished = False
    if pid is not None:
        name, detail = "running", f"a remix process (pid {pid}) is running it"
    elif run.last_started is None:
        name, detail = "not-started", "no run has started in this directory yet"
    elif run.last_ended is None:
        name, detail = "interrupted", "the last run ended without a run_ended event"
    elif left:
        reason = run.last_ended.reason
        name, detail = "stopped", f"stopped ({reason}) with {left:,} task(s) left"
    elif failed:
        finished = True
        name = "finished-with-failures"
        detail = f"{failed:,} task(s) failed; add --retry-failed to submit them again"
    else:
        finished = True
        name, detail = "finished", "every task is done"
    resumable = pid is None and (not finished or failed > 0)
    manifest = run.manifest
    started_at = run.info.get("started_at")
    return RunStatus(
        run_dir=str(run_dir),
        manifest=manifest,
        shard=run.shard,
        state=name,
        detail=detail,
        running_pid=pid,
        finished=finished,
        resumable=resumable,
        tasks_total=total,
        done=done,
        failed=failed,
        in_flight=in_flight,
        remaining=remaining,
        images_done=state.images_done,
        images_total=None if run.last_started is None else run.last_started.images,
        spent_usd=state.spent_usd,
        estimate_usd=run.estimate_usd,
        started_at=started_at if isinstance(started_at, str) else None,
        last_activity=run.last_event_at,
        pending_task_uuids=tuple(state.pending_uuids()),
        resume_command=resume_command(run_dir, manifest, run.shard)
        + (" --retry-failed" if name == "finished-with-failures" else ""),
    )


def _ago(then: datetime, now: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def format_status(status: RunStatus, *, now: datetime | None = None) -> str:
    """``remix status`` as aligned text lines."""
    now = now or datetime.now(UTC)
    total = "?" if status.tasks_total is None else f"{status.tasks_total:,}"
    remaining = "?" if status.remaining is None else f"{status.remaining:,}"
    images_total = "?" if status.images_total is None else f"{status.images_total:,}"
    estimate = (
        ""
        if status.estimate_usd is None
        else f" (plan estimate ${status.estimate_usd})"
    )
    lines = [
        f"run dir       {status.run_dir}",
        f"manifest      {status.manifest or '(unknown: no run.json)'}"
        + (f"  shard {status.shard}" if status.shard else ""),
        f"state         {status.state}: {status.detail}",
        f"tasks         {status.done:,} done, {status.failed:,} failed, "
        f"{status.in_flight:,} in flight, {remaining} remaining of {total}",
        f"images        {status.images_done:,} of {images_total}",
        f"cost          ${status.spent_usd} so far{estimate}",
    ]
    if status.started_at:
        lines.append(f"started       {status.started_at}")
    if status.last_activity is not None:
        last = status.last_activity.isoformat(timespec="seconds")
        lines.append(f"last activity {last} ({_ago(status.last_activity, now)})")
    if status.pending_task_uuids:
        shown = ", ".join(status.pending_task_uuids[:5])
        more = len(status.pending_task_uuids) - 5
        lines.append(
            f"in flight     {shown}" + (f" (+{more:,} more)" if more > 0 else "")
        )
    if status.resumable and status.resume_command:
        lines.append(f"resume with   {status.resume_command}")
    elif status.state == "running":
        lines.append("resume        not needed: the run is in progress")
    return "\n".join(lines)


def _not_a_run_dir(path: Path, err: TextIO) -> int:
    err.write(
        f"remix: {path} is not a run directory (no {RUN_INFO_NAME} or "
        f"{JOURNAL_NAME}); pass the --run-dir of a `remix run`\n"
    )
    return EXIT_INVALID


def print_status(run_dir: Path, *, fmt: str = "table") -> int:
    """Print ``run_dir``'s status to stdout; 0, or 2 when it is not a run dir."""
    if not is_run_dir(run_dir):
        return _not_a_run_dir(run_dir, sys.stderr)
    status = run_status(run_dir)
    if fmt == "json":
        sys.stdout.write(json.dumps(status.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(format_status(status) + "\n")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Cost reports


@dataclass
class GroupTotals:
    """Totals of one report group (or of the whole report)."""

    group: str
    images: int = 0
    """Stored images (superseded duplicates are paid, so in cost, but not counted)."""
    failed: int = 0
    in_flight: int = 0
    cost_usd: Decimal = Decimal(0)
    estimate_usd: Decimal = Decimal(0)
    """Sum of the submitted tasks' estimates (each task's latest submission)."""

    @property
    def diff_usd(self) -> Decimal:
        """Actual minus estimated: positive means it cost more than planned."""
        return self.cost_usd - self.estimate_usd

    def add_row(self, row: LedgerRow) -> None:
        """Count one ledger row."""
        if row.status == "done":
            self.images += 1
        elif row.status == "failed":
            self.failed += 1
        elif row.status == "pending":
            self.in_flight += 1
        if row.cost_usd is not None:
            self.cost_usd += row.cost_usd

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict with exact decimal strings."""
        return {
            "group": self.group,
            "images": self.images,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "cost_usd": str(self.cost_usd),
            "estimate_usd": str(self.estimate_usd),
            "diff_usd": str(self.diff_usd),
        }


@dataclass
class Report:
    """A cost report over one or more run dirs."""

    by: str
    groups: list[GroupTotals]
    total: GroupTotals
    plan_estimate_usd: Decimal | None
    """The plans' estimates (run_started), each job counted once across its shards."""
    runs: list[str]
    spent_usd: Decimal
    """The journals' own spent totals, summed: equals ``total.cost_usd``."""

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict with exact decimal strings."""
        plan = self.plan_estimate_usd
        return {
            "by": self.by,
            "runs": self.runs,
            "groups": [g.to_json() for g in self.groups],
            "total": self.total.to_json(),
            "plan_estimate_usd": None if plan is None else str(plan),
            "spent_usd": str(self.spent_usd),
        }


_BY_NAMES: Final = ("reference", "variant", "day", "run")


def parse_by(by: str) -> tuple[str, str | None]:
    """``(kind, axis name)`` from ``reference|variant|day|run|axis:NAME|axis=NAME``.

    Raises:
        ValueError: an unknown grouping, with the accepted spellings.
    """
    text = by.strip()
    for sep in (":", "=", " "):
        head, found, name = text.partition(sep)
        if found and head.strip() == "axis" and name.strip():
            return "axis", name.strip()
    if text in _BY_NAMES:
        return text, None
    raise ValueError(
        f"unknown --by {by!r}: use reference, variant, day, run or axis:NAME "
        "(NAME as in the task keys, e.g. axis:remixStrength)"
    )


def _axis_names(runs: Sequence[RunData]) -> set[str]:
    names: set[str] = set()
    for run in runs:
        for key in run.key_estimates.keys() | {r.key for r in run.rows}:
            names.update(n for n, _ in parse_key(key)[2])
    return names


def _resolve_axis(name: str, runs: Sequence[RunData]) -> str:
    """Accept an axis's key name or its full dotted manifest path."""
    if "." not in name:
        return name
    names = _axis_names(runs)
    if name in names:
        return name
    last = name.rsplit(".", 1)[-1]
    return last if last in names else name


def _day(at: datetime | None) -> str:
    return NONE_LABEL if at is None else at.astimezone(UTC).date().isoformat()


def _run_labels(runs: Sequence[RunData]) -> list[str]:
    names = [r.run_dir.name or str(r.run_dir) for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.run_dir) for r in runs]


def _key_grouper(kind: str, axis: str | None) -> Callable[[str], str]:
    def group(key: str) -> str:
        reference, variant, axes = parse_key(key)
        if kind == "reference":
            return reference
        if kind == "variant":
            return variant
        return dict(axes).get(axis or "", NONE_LABEL)

    return group


def _plan_estimate(runs: Sequence[RunData]) -> Decimal | None:
    """Sum of plan estimates; shards of one job (same manifest hash, same N) once.

    The engine journals the whole job's estimate in every shard's run_started.
    """
    total: Decimal | None = None
    seen: set[tuple[str, int]] = set()
    for run in runs:
        started = run.last_started
        if started is None:
            continue
        if (shard := Shard.read(started.shard)) is not None:
            job = (started.manifest_sha256, shard.count)
            if job in seen:
                continue
            seen.add(job)
        total = started.estimate_usd + (total or Decimal(0))
    return total


def _sort_key(label: str) -> tuple[int, Decimal, str]:
    if label == NONE_LABEL:
        return 2, Decimal(0), label
    if _NUMBER.fullmatch(label):
        return 0, Decimal(label), label
    return 1, Decimal(0), label


def build_report(runs: Sequence[RunData], *, by: str) -> Report:
    """Group the ledger rows of ``runs`` (merged) and total them.

    Raises:
        ValueError: ``by`` is not a known grouping.
    """
    kind, axis = parse_by(by)
    if axis is not None:
        axis = _resolve_axis(axis, runs)
    groups: dict[str, GroupTotals] = {}
    total = GroupTotals(TOTAL_LABEL)

    def get(label: str) -> GroupTotals:
        found = groups.get(label)
        if found is None:
            found = groups[label] = GroupTotals(label)
        return found

    key_group = _key_grouper(kind, axis)
    for label, run in zip(_run_labels(runs), runs, strict=True):
        cache: dict[str, str] = {}
        for row in run.rows:
            if kind == "run":
                name = label
            elif kind == "day":
                name = _day(row.completed_at or row.submitted_at)
            else:
                name = cache.get(row.key) or cache.setdefault(
                    row.key, key_group(row.key)
                )
            get(name).add_row(row)
            total.add_row(row)
        for key, sub in run.key_estimates.items():
            if kind == "run":
                name = label
            elif kind == "day":
                name = _day(sub.ts)
            else:
                name = cache.get(key) or key_group(key)
            get(name).estimate_usd += sub.estimate_usd
            total.estimate_usd += sub.estimate_usd
    ordered = sorted(groups.values(), key=lambda g: _sort_key(g.group))
    return Report(
        by=f"axis:{axis}" if kind == "axis" else kind,
        groups=ordered,
        total=total,
        plan_estimate_usd=_plan_estimate(runs),
        runs=[str(r.run_dir) for r in runs],
        spent_usd=sum((r.state.spent_usd for r in runs), Decimal(0)),
    )


_REPORT_COLUMNS: Final = (
    "images",
    "failed",
    "in_flight",
    "cost_usd",
    "estimate_usd",
    "diff_usd",
)


def _numbers(g: GroupTotals) -> list[str]:
    return [
        str(g.images),
        str(g.failed),
        str(g.in_flight),
        str(g.cost_usd),
        str(g.estimate_usd),
        str(g.diff_usd),
    ]


def report_csv(report: Report) -> str:
    """The report as CSV: one row per group, then the total with the plan estimate."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow([report.by, *_REPORT_COLUMNS, "plan_estimate_usd"])
    for g in report.groups:
        writer.writerow([csv_safe(g.group), *_numbers(g), ""])
    plan = report.plan_estimate_usd
    writer.writerow(
        [TOTAL_LABEL, *_numbers(report.total), "" if plan is None else str(plan)]
    )
    return buf.getvalue()


def format_report(report: Report) -> str:
    """The report as an aligned text table with a total line."""
    header = [report.by, "images", "failed", "in flight", "cost $", "est. $", "diff $"]
    body = [[g.group, *_numbers(g)] for g in report.groups]
    total = [TOTAL_LABEL, *_numbers(report.total)]
    widths = [
        max(len(r[i]) for r in (header, *body, total)) for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    lines = [line(header), rule, *(line(r) for r in body), rule, line(total)]
    plan = report.plan_estimate_usd
    if plan is not None:
        runs = len(report.runs)
        lines.append(
            f"plan estimate ${plan} for {runs} run dir{'s' if runs != 1 else ''}; "
            f"spent ${report.spent_usd} (${plan - report.spent_usd} of the plan left)"
        )
    return "\n".join(lines)


def print_report(run_dirs: list[Path], *, by: str, fmt: str) -> int:
    """Print a cost report over ``run_dirs`` to stdout; 0, or 2 on bad input."""
    try:
        parse_by(by)
    except ValueError as exc:
        sys.stderr.write(f"remix: {exc}\n")
        return EXIT_INVALID
    for run_dir in run_dirs:
        if not is_run_dir(run_dir):
            return _not_a_run_dir(run_dir, sys.stderr)
    report = build_report([load_run(d) for d in run_dirs], by=by)
    if fmt == "json":
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    elif fmt == "csv":
        sys.stdout.write(report_csv(report))
    else:
        sys.stdout.write(format_report(report) + "\n")
    return EXIT_OK
