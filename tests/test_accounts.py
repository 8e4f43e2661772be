"""The run's accounts: one ending per task, and the run ends when feeding is over and
no task is open; and the one feedback path into sending that skips the backlog (a
reference an earlier run uploaded, refused: uploaded again, sent under a new UUID)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.accounts import Accounts
from pipeline.flow import SlotGate
from pipeline.journal import load_state, read_journal
from pipeline.journal_events import LostEvent, SubmittedEvent
from pipeline.limits import Budget
from pipeline.progress import NullProgress
from pipeline.records import Flight, RunSummary
from pipeline.sandbox import STATE, SandboxConfig
from pipeline.wire import ErrorItem
from tests.conftest import SandboxFactory
from tests.jobkit import (
    StopAfter,
    base_url,
    fast_settings,
    image_files,
    run_manifest,
    styles,
    write_job,
)


class _Spec:
    key = "k"
    images = 1


def _flight(task_uuid: str, reserved: str = "0") -> Flight:
    spec: Any = _Spec()
    return Flight(
        spec=spec,
        task_uuid=task_uuid,
        wire={},
        submitted_at=0.0,
        submitted_wall=None,
        reserved_per_image=Decimal(reserved),
        next_poll_at=0.0,
        backoff_s=0.1,
    )


def _accounts(cap: Decimal | None = None) -> Accounts:
    return Accounts(
        RunSummary(),
        budget=Budget(cap),
        progress=NullProgress(),
        gate=SlotGate(lambda: 4),
        forget=lambda flight: None,
        list_price=lambda spec: Decimal("0.01"),
        concurrency=4,
    )


async def test_the_run_ends_when_feeding_is_over_and_no_task_is_open() -> None:
    accounts = _accounts()
    one, two = _flight("u1"), _flight("u2")
    accounts.entered(one.task_uuid)
    accounts.resumed(two)
    accounts.left_for_rerun(two)
    assert not accounts.all_ended.is_set()
    accounts.feeding_over()
    assert not accounts.all_ended.is_set()  # u1 is still open
    accounts.failed(one, ErrorItem(code="x", message="y"))
    assert accounts.all_ended.is_set()
    summary = accounts.summary
    assert (summary.tasks_failed, summary.tasks_unfinished, summary.resumed) == (
        1,
        1,
        1,
    )


async def test_a_task_ends_once() -> None:
    accounts = _accounts()
    flight = _flight("u1")
    accounts.entered(flight.task_uuid)
    accounts.left_for_rerun(flight)
    with pytest.raises(AssertionError, match="ended twice"):
        accounts.unsent([flight])


async def test_what_is_open_when_the_run_is_over_is_unfinished() -> None:
    accounts = _accounts()
    for task_uuid in ("u1", "u2", "u2"):  # a journal may name one twice
        accounts.entered(task_uuid)
    accounts.unsent([_flight("u2")])
    accounts.run_over(wall_s=1.0, latency_s=None, uploads=0)
    assert (accounts.summary.tasks_unsubmitted, accounts.summary.tasks_unfinished) == (
        1,
        2,
    )


async def test_reserve_and_settle_through_the_accounts() -> None:
    accounts = _accounts(cap=Decimal("0.02"))
    spec: Any = _Spec()
    assert accounts.reserve(spec) == Decimal("0.01")
    assert accounts.reserve(spec) == Decimal("0.01")
    assert accounts.reserve(spec) is None  # the cap is reached
    flight = _flight("u1", reserved="0.01")
    accounts.entered("u1")
    accounts.retire(flight)  # gives its reservation back
    assert accounts.reserve(spec) == Decimal("0.01")


async def test_refused_earlier_uploads_are_uploaded_again_and_sent_anew(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A run resumed against an API that no longer has its references: every task
    that uses them is refused, uploaded again and sent under a new taskUUID."""
    first_api = await make_sandbox(SandboxConfig(latency_s=0.3, render_scale=0.1))
    job = write_job(tmp_path, refs=2, variants=styles(4))
    run_dir = tmp_path / "run"
    stopper = StopAfter(2)
    first = await run_manifest(
        job,
        run_dir,
        fast_settings(tmp_path, base_url(first_api)),
        concurrency=3,
        on_engine=stopper.attach,
        progress=stopper,
    )
    assert first.exit_code == 3
    before = load_state(run_dir / "journal.jsonl")
    assert before.uploads
    second_api = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.1))
    second = await run_manifest(
        job, run_dir, fast_settings(tmp_path, base_url(second_api)), concurrency=3
    )
    state = second_api.app[STATE]
    assert second.exit_code == 0, second
    assert second.resubmitted > 0
    assert state.uploads == 2  # each reference uploaded again, once
    assert state.duplicate_task_uuids == 0
    assert len(image_files(run_dir)) == 8
    events = list(read_journal(run_dir / "journal.jsonl"))
    replaced = {e.replaces for e in events if isinstance(e, SubmittedEvent)} - {None}
    lost = {e.task_uuid for e in events if isinstance(e, LostEvent)}
    assert replaced
    assert replaced <= lost
    assert not load_state(run_dir / "journal.jsonl").pending
