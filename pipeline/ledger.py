"""The cost ledger (``ledger.csv``): one row per image, plus one per failed or
in-flight task, rebuilt from the journal alone.

Its ``cost_usd`` column sums, exactly as decimals, to the journal's ``spent_usd``:
every paid image has a row, including one superseded by another task filling the
same slot (or by a ``--rerun-changed``). The last column, ``api``, names the API the
run dir belongs to (run.json): ``sandbox`` dollars are the local sandbox's, not billed.
Text cells are made safe for spreadsheets (a quote before a leading
``= + - @``), reversibly: :func:`read_ledger` gives back the exact rows.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal

from pipeline.errors import ConfigError
from pipeline.journal import JOURNAL_NAME, C, F, JournalFold, S
from pipeline.journal_events import CompletedEvent
from pipeline.journal_offsets import JournalOffsets
from pipeline.rundir import SANDBOX_API, read_run_info, recorded_api
from pipeline.storage import write_atomic_text_stream

log = logging.getLogger(__name__)

LEDGER_NAME: Final = "ledger.csv"

Status = Literal["done", "superseded", "failed", "pending"]
_STATUSES: Final[tuple[Status, ...]] = ("done", "superseded", "failed", "pending")

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
API_COLUMN: Final = "api"
"""After every other column: ``sandbox``, the API's host, or empty when unknown."""
_FIXED: Final = frozenset(_HEAD) | frozenset(_TAIL) | {API_COLUMN}


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
PLAIN_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
"""A plain number such as ``-1`` or ``2.5e3`` (no formula, sorted as a number)."""


def csv_safe(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would run it as a formula.

    Prompts and error messages are user or server input; a cell starting with
    ``= + - @`` (or a tab or CR) is a formula to Excel and LibreOffice. Plain numbers
    such as ``-1`` stay as they are. Reversible with :func:`csv_unsafe`: text that
    already starts with quotes before such a character gets one more.
    """
    if text.lstrip("'")[:1] in _FORMULA_START and not PLAIN_NUMBER.fullmatch(text):
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
    event: CompletedEvent,
    status: Status,
    submitted_at: datetime | None,
    path: str | None = None,
) -> LedgerRow:
    """One image's ledger row; ``submitted_at`` fills in for older journals, ``path``
    for an image a rerun moved aside."""
    return LedgerRow(
        key=event.key,
        status=status,
        index=event.index,
        task_uuid=event.task_uuid,
        image_uuid=event.image_uuid,
        seed=event.seed,
        cost_usd=event.cost_usd,
        path=path or event.path,
        submitted_at=event.submitted_at or submitted_at,
        completed_at=event.ts,
    )


def _submit_time(state: JournalFold[C, S, F], task_uuid: str | None) -> datetime | None:
    kept = state.submitted.get(task_uuid or "")
    return None if kept is None else state.submitted_event(kept).ts


def row_keys(state: JournalFold[C, S, F]) -> list[str]:
    """Sorted keys that have ledger rows: an image, a failure, a task in flight."""
    return sorted(
        state.completed_images.keys() | state.failed.keys() | state.pending.keys()
    )


def iter_ledger_rows(state: JournalFold[C, S, F]) -> Iterator[LedgerRow]:
    """Ledger rows of a folded journal, one at a time, sorted by key, status, then
    image index (a :class:`JournalOffsets` must be inside its ``reading()``)."""
    superseded: dict[str, list[tuple[int, C]]] = {}
    for key, index, kept in state.superseded:
        superseded.setdefault(key, []).append((index, kept))
    for key in row_keys(state):
        images = state.completed_images.get(key, {})
        for index in sorted(images):
            event = state.completed_event(images[index])
            yield _image_row(event, "done", _submit_time(state, event.task_uuid))
        # sorted() is stable: equal indices keep their journal order
        for _, kept in sorted(superseded.get(key, ()), key=lambda p: p[0]):
            event = state.completed_event(kept)
            moved = state.moved_paths.get((event.task_uuid, event.index))
            submitted_at = _submit_time(state, event.task_uuid)
            yield _image_row(event, "superseded", submitted_at, moved)
        if (failed := state.failed.get(key)) is not None:
            failure = state.failed_event(failed)
            yield LedgerRow(
                key=key,
                status="failed",
                task_uuid=failure.task_uuid,
                submitted_at=_submit_time(state, failure.task_uuid),
                completed_at=failure.ts,
                error_code=failure.code,
                error_message=failure.message,
            )
        for sub in state.pending.get(key, ()):
            yield LedgerRow(
                key=key,
                status="pending",
                task_uuid=state.task_of(sub),
                submitted_at=state.submitted_event(sub).ts,
            )


def build_ledger_rows(state: JournalFold[C, S, F]) -> list[LedgerRow]:
    """All of :func:`iter_ledger_rows` at once."""
    return list(iter_ledger_rows(state))


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
    return [*_HEAD, *axes, *_TAIL, API_COLUMN]


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


def _csv_record(
    row: LedgerRow, columns: Sequence[str], api: str | None = None
) -> list[str]:
    reference, variant, axes = parse_key(row.key)
    values: dict[str, object] = {
        API_COLUMN: api,
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


def ledger_csv(rows: Sequence[LedgerRow], api: str | None = None) -> str:
    """The ledger as CSV text (RFC 4180: CRLF rows, quoting; exact decimal costs),
    every row's ``api`` cell ``api``."""
    columns = ledger_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows(_csv_record(row, columns, api) for row in rows)
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

    Streams: the journal is folded keeping line offsets (:class:`JournalOffsets`)
    and each row is written as it is read back, so memory stays at a few hundred
    bytes per key however many images the run has.

    Raises:
        StorageError: the ledger could not be written.
    """
    state = JournalOffsets.of_file(run_dir / JOURNAL_NAME)
    try:
        api = recorded_api(read_run_info(run_dir))
    except ConfigError as exc:  # the ledger is the journal's: run.json is a label
        log.warning("%s", exc)
        api = None
    target = run_dir / LEDGER_NAME
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        columns = _columns_of_keys(row_keys(state))
        writer.writerow(columns)
        with state.reading():
            for row in iter_ledger_rows(state):
                writer.writerow(_csv_record(row, columns, api))
                count += 1
                if buf.tell() > 1 << 16:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
        yield buf.getvalue()

    write_atomic_text_stream(target, lines())
    log.info(
        "ledger %s: %d row(s), spent $%s%s",
        target,
        count,
        state.spent_usd,
        " (sandbox dollars, not billed)" if api == SANDBOX_API else "",
    )
    return target
