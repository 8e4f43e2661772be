"""The journal folded with line offsets instead of events, for big journals.

:class:`JournalOffsets` is :class:`~pipeline.journal.JournalFold` (the one set of
rules) keeping only where each needed line is; the ledger and the gallery read the
events they show back from the file, so a 100k-image run folds in a few tens of MB
(:func:`~pipeline.journal.load_state` keeps every event: several times that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple, Self

from pipeline.journal import JournalFold, read_event_at, read_journal_lines
from pipeline.journal_events import CompletedEvent, Event, FailedEvent, SubmittedEvent


class SubmittedLine(NamedTuple):
    """Where a submission's line is, with its task UUID (the rules need it)."""

    task_uuid: str
    offset: int


@dataclass
class JournalOffsets(JournalFold[int, SubmittedLine, int]):
    """The journal folded with only the byte offsets of the lines it needs.

    The same fold as :class:`ResumeState` at a fraction of the memory; events are
    read back from the file on demand, inside ``with state.reading():``.
    """

    path: Path = field(default_factory=Path)
    _offset: int = field(default=0, repr=False)
    _file: BinaryIO | None = field(default=None, repr=False)

    @classmethod
    def of_file(cls, path: Path) -> Self:
        """Fold the journal at ``path`` (missing: empty)."""
        state = cls(path=path)
        for offset, event in read_journal_lines(path):
            state._offset = offset
            state.apply(event)
        return state

    @contextlib.contextmanager
    def reading(self) -> Iterator[Self]:
        """Keep the journal open while events are read back."""
        if self._file is not None:
            yield self
            return
        with self.path.open("rb") as f:
            self._file = f
            try:
                yield self
            finally:
                self._file = None

    def _read(self, offset: int) -> Event:
        if self._file is None:
            raise RuntimeError("read events inside `with state.reading():`")
        return read_event_at(self._file, offset)

    def _keep_completed(self, event: CompletedEvent) -> int:
        return self._offset

    def _keep_submitted(self, event: SubmittedEvent) -> SubmittedLine:
        return SubmittedLine(event.task_uuid, self._offset)

    def _keep_failed(self, event: FailedEvent) -> int:
        return self._offset

    def task_of(self, submission: SubmittedLine) -> str:
        return submission.task_uuid

    def completed_event(self, kept: int) -> CompletedEvent:
        event = self._read(kept)
        assert isinstance(event, CompletedEvent)
        return event

    def submitted_event(self, kept: SubmittedLine) -> SubmittedEvent:
        event = self._read(kept.offset)
        assert isinstance(event, SubmittedEvent)
        return event

    def failed_event(self, kept: int) -> FailedEvent:
        event = self._read(kept)
        assert isinstance(event, FailedEvent)
        return event
