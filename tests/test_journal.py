"""The journal: round trips, tolerance of torn and garbled lines, the one fold
(resume state, and the same fold keeping line offsets)."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import StorageError
from pipeline.journal import JournalWriter, ResumeState, load_state, read_journal
from pipeline.journal_events import (
    AcceptedEvent,
    CompletedEvent,
    Event,
    FailedEvent,
    LostEvent,
    RunEndedEvent,
    RunStartedEvent,
    SubmittedEvent,
    UploadedEvent,
    encode_events,
)
from pipeline.journal_offsets import JournalOffsets

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# ---------------------------------------------------------------------------
# Strategies

_ts = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
    timezones=st.just(UTC),
)
_money = st.decimals(
    min_value=Decimal(0),
    max_value=Decimal(1000),
    places=4,
    allow_nan=False,
    allow_infinity=False,
)
_text = st.text(max_size=20)
_keys = st.sampled_from(["a/x", "a/y/s=1", "b/x", "b/y/s=2,t=q"])
_uuids = st.sampled_from([f"task-{i}" for i in range(6)])

_events: st.SearchStrategy[Event] = st.one_of(
    st.builds(UploadedEvent, ts=_ts, sha256=_text, image_uuid=_text, source=_text),
    st.builds(
        SubmittedEvent,
        ts=_ts,
        key=_keys,
        task_uuid=_uuids,
        images=st.integers(1, 3),
        estimate_usd=_money,
        replaces=st.none() | _uuids,
    ),
    st.builds(AcceptedEvent, ts=_ts, key=_keys, task_uuid=_uuids),
    st.builds(
        CompletedEvent,
        ts=_ts,
        key=_keys,
        task_uuid=_uuids,
        image_uuid=_text,
        index=st.integers(0, 2),
        seed=st.none() | st.integers(0, 2**63),
        cost_usd=st.none() | _money,
        path=_text,
        sha256=_text,
        bytes=st.integers(0, 10**9),
        submitted_at=st.none() | _ts,
    ),
    st.builds(
        FailedEvent,
        ts=_ts,
        key=_keys,
        task_uuid=st.none() | _uuids,
        code=_text,
        message=_text,
        parameter=st.lists(_text, max_size=2),
        retryable=st.booleans(),
    ),
    st.builds(LostEvent, ts=_ts, key=_keys, task_uuid=_uuids),
    st.builds(
        RunStartedEvent,
        ts=_ts,
        run_id=_text,
        manifest_sha256=_text,
        tasks=st.integers(0, 10**6),
        images=st.integers(0, 10**6),
        estimate_usd=_money,
        shard=st.none() | _text,
    ),
    st.builds(
        RunEndedEvent,
        ts=_ts,
        reason=_text,
        done=st.integers(0, 10**6),
        failed=st.integers(0, 10**6),
        spent_usd=_money,
    ),
)


def submitted(key: str, uuid: str, images: int = 1, **kw: object) -> SubmittedEvent:
    return SubmittedEvent.model_validate(
        {
            "ts": T0,
            "key": key,
            "task_uuid": uuid,
            "images": images,
            "estimate_usd": Decimal("0.08"),
        }
        | kw
    )


def completed(
    key: str, uuid: str, index: int = 0, cost: str | None = "0.08"
) -> CompletedEvent:
    return CompletedEvent(
        ts=T0,
        key=key,
        task_uuid=uuid,
        image_uuid=f"img-{uuid}-{index}",
        index=index,
        seed=42,
        cost_usd=None if cost is None else Decimal(cost),
        path=f"images/{key}-{index + 1}.jpg",
        sha256="0" * 64,
        bytes=10,
        submitted_at=T0,
    )


def failed(key: str, uuid: str | None) -> FailedEvent:
    return FailedEvent(
        ts=T0,
        key=key,
        task_uuid=uuid,
        code="invalidParameter",
        message="bad",
        retryable=False,
    )


async def write(path: Path, *batches: Sequence[Event]) -> None:
    async with JournalWriter.open(path) as journal:
        for batch in batches:
            await journal.append(*batch)


# ---------------------------------------------------------------------------
# Round trips


@settings(deadline=None, max_examples=40)
@given(events=st.lists(_events, max_size=25), cut=st.integers(0, 25))
async def test_any_events_round_trip_with_same_totals(
    events: list[Event], cut: int
) -> None:
    """Any events written (in any batching) read back equal, with the same totals."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.jsonl"
        await write(path, events[:cut], events[cut:])
        assert list(read_journal(path)) == events
        state = load_state(path)
    expected = ResumeState.from_events(events)
    assert state.events_count == len(events)
    assert state.spent_usd == expected.spent_usd
    assert state.completed_images == expected.completed_images
    assert state.pending == expected.pending
    assert state.done_keys == expected.done_keys
    paid = {
        (e.task_uuid, e.index): e.cost_usd or Decimal(0)
        for e in reversed(events)
        if isinstance(e, CompletedEvent)
    }
    assert state.spent_usd == sum(paid.values(), Decimal(0))


async def test_money_is_an_exact_decimal_string(tmp_path: Path) -> None:
    """Costs are stored as decimal strings and sum exactly (0.1 * 3 == 0.3)."""
    path = tmp_path / "journal.jsonl"
    await write(
        path,
        [submitted("k", "u", images=3)],
        [completed("k", "u", i, cost="0.1") for i in range(3)],
    )
    assert '"cost_usd":"0.1"' in path.read_text()
    state = load_state(path)
    assert state.spent_usd == Decimal("0.3")
    assert state.is_complete("k")


def test_timestamps_are_aware_utc() -> None:
    """A naive timestamp is rejected; an offset one is normalised to UTC."""
    with pytest.raises(ValidationError, match="timezone"):
        LostEvent(ts=datetime(2026, 1, 1), key="k", task_uuid="u")  # noqa: DTZ001 - the point of the test
    plus2 = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    event = LostEvent(ts=plus2, key="k", task_uuid="u")
    assert event.ts.utcoffset() == timedelta(0)
    assert event.ts == plus2
    assert LostEvent(key="k", task_uuid="u").ts.tzinfo is UTC


# ---------------------------------------------------------------------------
# Tolerant reading


def test_missing_journal_is_empty(tmp_path: Path) -> None:
    """A run dir with no journal yet reads as no events."""
    path = tmp_path / "journal.jsonl"
    assert list(read_journal(path)) == []
    assert load_state(path).events_count == 0


async def test_torn_last_line_is_skipped_and_next_append_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-write loses only the torn line; reopening starts a clean line."""
    path = tmp_path / "journal.jsonl"
    events: list[Event] = [
        submitted("k", "u1"),
        submitted("j", "u2"),
        completed("k", "u1"),
    ]
    await write(path, events)
    data = path.read_bytes()
    path.write_bytes(data[:-15])  # cut into the last line, newline included

    with caplog.at_level(logging.WARNING, logger="pipeline.journal"):
        assert list(read_journal(path)) == events[:2]
    assert "torn or garbled last line" in caplog.text
    assert ":3:" in caplog.text

    caplog.clear()
    late = completed("j", "u2")
    with caplog.at_level(logging.WARNING, logger="pipeline.journal"):
        await write(path, [late])
        assert list(read_journal(path)) == [*events[:2], late]
    assert "torn line" in caplog.text  # the writer terminated it
    assert ":3: garbled line skipped" in caplog.text
    assert load_state(path).done_keys == {"j"}


async def test_garbled_middle_line_is_skipped_with_its_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A garbage line in the middle is skipped, named by line number, not fatal."""
    path = tmp_path / "journal.jsonl"
    first, last = submitted("k", "u1"), completed("k", "u1")
    path.write_bytes(
        first.model_dump_json().encode()
        + b"\n{not json at all\n\n"
        + b'{"event": "completed", "key": "k"}\n'
        + last.model_dump_json().encode()
        + b"\n"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.journal"):
        assert list(read_journal(path)) == [first, last]
    assert ":2: garbled line skipped" in caplog.text
    assert ":4: garbled line skipped" in caplog.text
    assert load_state(path).is_complete("k")


def test_newer_events_and_fields_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown event types and extra fields from a newer remix load silently."""
    path = tmp_path / "journal.jsonl"
    event = submitted("k", "u")
    line = event.model_dump_json()[:-1] + ', "priority": 3}\n'
    path.write_text('{"event": "teleported", "ts": "2026-01-01T00:00:00Z"}\n' + line)
    with caplog.at_level(logging.WARNING, logger="pipeline.journal"):
        assert list(read_journal(path)) == [event]
    assert caplog.text == ""


# ---------------------------------------------------------------------------
# Writer


async def test_second_writer_is_refused(tmp_path: Path) -> None:
    """Two writers on one journal would interleave lines: the second is refused."""
    path = tmp_path / "journal.jsonl"
    async with JournalWriter.open(path):
        with pytest.raises(StorageError, match="locked by another remix process"):
            async with JournalWriter.open(path):
                pass
    await write(path, [submitted("k", "u")])  # released on close
    assert len(list(read_journal(path))) == 1


async def test_disk_full_is_a_clear_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while appending raises StorageError naming the file and the disk."""
    path = tmp_path / "journal.jsonl"

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with JournalWriter.open(path) as journal:
        monkeypatch.setattr(os, "fsync", no_space)
        with pytest.raises(StorageError, match=r"journal\.jsonl.*disk full\?"):
            await journal.append(submitted("k", "u"))


async def test_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    """A journal that cannot be opened raises StorageError, not OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot open journal"):
        async with JournalWriter.open(blocker / "journal.jsonl"):
            pass


async def test_empty_append_writes_nothing(tmp_path: Path) -> None:
    """append() with no events is a no-op (no empty lines, no fsync)."""
    path = tmp_path / "journal.jsonl"
    async with JournalWriter.open(path) as journal:
        await journal.append()
        assert journal.events_written == 0
    assert path.read_bytes() == b""


# ---------------------------------------------------------------------------
# Resume state


def test_all_images_completed_means_done() -> None:
    """submitted, then every image completed: the key is done, nothing pending."""
    state = ResumeState.from_events(
        [submitted("k", "u", images=2), completed("k", "u", 0), completed("k", "u", 1)]
    )
    assert state.is_complete("k")
    assert state.done_keys == {"k"}
    assert state.pending == {}
    assert state.images_done == 2


def test_submitted_only_is_pending() -> None:
    """A submitted task with no outcome is polled first on resume."""
    sub = submitted("k", "u", images=2)
    accepted = AcceptedEvent(ts=T0, key="k", task_uuid="u")
    state = ResumeState.from_events([sub, accepted, completed("k", "u", 0)])
    assert state.pending == {"k": [sub]}
    assert state.pending_uuids() == ["u"]
    assert not state.is_complete("k")
    assert state.submitted_uuids == {"u"}
    assert state.accepted_uuids == {"u"}


def test_lost_is_not_pending_and_resubmission_is() -> None:
    """A lost uuid is never polled again; its replacement is."""
    lost = LostEvent(ts=T0, key="k", task_uuid="u1")
    state = ResumeState.from_events([submitted("k", "u1"), lost])
    assert state.pending == {}
    assert state.lost == {"u1"}
    again = submitted("k", "u2", replaces="u1")
    state.apply(again)
    assert state.pending == {"k": [again]}
    assert state.submitted_uuids == {"u1", "u2"}


def test_replaced_submission_is_not_pending() -> None:
    """A resubmission that replaces a uuid drops the old one from pending."""
    again = submitted("k", "u2", replaces="u1")
    state = ResumeState.from_events([submitted("k", "u1"), again])
    assert state.pending == {"k": [again]}


def test_failed_then_resubmitted_is_pending_again() -> None:
    """A failure clears pending; a later submission clears the failure."""
    state = ResumeState.from_events([submitted("k", "u1"), failed("k", "u1")])
    assert state.pending == {}
    assert set(state.failed) == {"k"}
    again = submitted("k", "u2")
    state.apply(again)
    assert state.failed == {}
    assert state.pending == {"k": [again]}


def test_failure_before_submit_is_cleared_by_completion() -> None:
    """A failure with no task uuid is recorded, and a later completion clears it."""
    state = ResumeState.from_events([failed("k", None)])
    assert state.failed["k"].task_uuid is None
    state.apply(submitted("k", "u"))
    state.apply(failed("k", "u"))
    state.apply(completed("k", "u"))
    assert state.failed == {}
    assert state.is_complete("k")


def test_duplicate_completion_counts_once() -> None:
    """The same image journaled twice is one image and one cost."""
    state = ResumeState.from_events(
        [submitted("k", "u"), completed("k", "u"), completed("k", "u")]
    )
    assert state.spent_usd == Decimal("0.08")
    assert state.images_done == 1
    assert state.superseded_images == []


def test_same_index_from_two_tasks_keeps_first_and_counts_both_costs() -> None:
    """Two paid tasks filling one image slot: the first file wins, both are spent."""
    second = completed("k", "u2")
    state = ResumeState.from_events(
        [submitted("k", "u1"), completed("k", "u1"), second]
    )
    assert state.completed_images["k"][0].task_uuid == "u1"
    assert state.superseded_images == [second]
    assert state.spent_usd == Decimal("0.16")


def test_uploads_runs_and_unknown_costs() -> None:
    """Uploads map hash -> uuid; run events are kept; a missing cost adds nothing."""
    started = RunStartedEvent(
        ts=T0,
        run_id="r1",
        manifest_sha256="ab",
        tasks=1,
        images=1,
        estimate_usd=Decimal("0.08"),
        shard=None,
    )
    ended = RunEndedEvent(ts=T0, reason="done", done=1, failed=0, spent_usd=Decimal(0))
    later = started.model_copy(update={"run_id": "r2"})
    state = ResumeState.from_events(
        [
            started,
            UploadedEvent(ts=T0, sha256="h", image_uuid="img", source="a.jpg"),
            completed("k", "u", cost=None),
            later,
            ended,
        ]
    )
    assert state.run_started == started
    assert state.run_ended == ended
    assert (state.last_started, state.last_ended) == (later, ended)
    state.apply(started)  # a resume starts: nothing has ended it yet
    assert (state.last_started, state.last_ended) == (started, None)
    assert state.last_event_at == T0
    assert state.uploads == {"h": "img"}
    assert state.spent_usd == 0
    assert state.is_complete("k")  # no submission journaled: never pay twice


# ---------------------------------------------------------------------------
# The fold keeping line offsets


@settings(deadline=None, max_examples=40)
@given(events=st.lists(_events, max_size=25))
def test_offsets_fold_reads_back_what_resume_state_keeps(events: list[Event]) -> None:
    """JournalOffsets is the same fold: each offset reads back the event ResumeState
    kept, for images, superseded images, failures, pending and every submission."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.jsonl"
        path.write_bytes(encode_events(events))
        state = load_state(path)
        offsets = JournalOffsets.of_file(path)
        with offsets.reading():
            images = {
                key: {i: offsets.completed_event(c) for i, c in found.items()}
                for key, found in offsets.completed_images.items()
            }
            superseded = [
                (key, i, offsets.completed_event(c)) for key, i, c in offsets.superseded
            ]
            failed = {k: offsets.failed_event(f) for k, f in offsets.failed.items()}
            pending = {
                key: [offsets.submitted_event(s) for s in subs]
                for key, subs in offsets.pending.items()
            }
            submitted = {
                uuid: offsets.submitted_event(s)
                for uuid, s in offsets.submitted.items()
            }
    assert images == state.completed_images
    assert superseded == state.superseded
    assert failed == state.failed
    assert pending == state.pending
    assert submitted == state.submitted
    assert offsets.pending_uuids() == state.pending_uuids()
    assert list(offsets.keys) == list(state.keys)
    assert offsets.spent_usd == state.spent_usd
    assert (offsets.last_started, offsets.last_ended) == (
        state.last_started,
        state.last_ended,
    )


def test_offsets_fold_reads_only_inside_reading(tmp_path: Path) -> None:
    """Events are read back from the open file; outside ``reading()`` it says so."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(encode_events([submitted("k", "u"), completed("k", "u")]))
    offsets = JournalOffsets.of_file(path)
    with pytest.raises(RuntimeError, match="reading"):
        offsets.completed_event(offsets.completed_images["k"][0])
    with offsets.reading(), offsets.reading():  # nested: one open file
        assert offsets.completed_event(offsets.completed_images["k"][0]).key == "k"
