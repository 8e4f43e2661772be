"""The conformance matrix: every dialect the real API may speak (runware-protocol.md
§10), alone and under the fault mix, on a 48-task job: the FIRST run finishes, nothing
is billed twice, and images = billed = ledger = journal.

The credit dialect stops with exit 3 once the account is empty, having collected
every task it had sent and the API had accepted; after a top-up the same command
finishes the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import pytest

from pipeline.dialect import DIALECT_NAME, Dialect, PollMode
from pipeline.journal import read_journal
from pipeline.journal_events import FailedEvent
from pipeline.records import RunSummary
from pipeline.sandbox import STATE, SandboxConfig, SandboxState, create_app, serving
from pipeline.sandbox.presets import DIALECTS
from pipeline.sandbox.presets import FAULT_MIX as FAULTS
from tests.conftest import SandboxFactory
from tests.faultkit import billed_digests, run_facts
from tests.jobkit import (
    StopAfter,
    base_url,
    fast_settings,
    run_manifest,
    styles,
    write_job,
)
from tests.test_politeness import Arrivals

pytestmark = pytest.mark.slow

TASKS: Final = 48
IMAGES: Final = 64
"""4 references x 12 variants; every third variant asks two images."""

QUIET: Final[dict[str, Any]] = {
    "seed": 7,
    "latency_s": 0.05,
    "latency_jitter_s": 0.05,
    "result_stagger_s": 0.02,
    "render_scale": 0.05,
}
FAULT_MIX: Final[dict[str, Any]] = {**QUIET, **FAULTS, "retry_after_s": 0.02}
DIALECTS_DONE: Final = [d for d in DIALECTS if "task_fail_rate" not in DIALECTS[d]]
"""The dialects in which every task succeeds (failures as data are tested apart)."""


def _job(root: Path) -> Path:
    return write_job(root, refs=4, variants=styles(12, pairs_every=3))


@dataclass(frozen=True)
class Counted:
    summary: RunSummary
    state: SandboxState


async def first_run(
    root: Path, make_sandbox: SandboxFactory, config: Mapping[str, Any]
) -> Counted:
    server = await make_sandbox(SandboxConfig(**config))
    # Submits of 4: a dozen submit requests, so faults meet submits too.
    settings = fast_settings(root, base_url(server), limits={"submit_batch": 4})
    summary = await run_manifest(_job(root), root / "run", settings, concurrency=12)
    return Counted(summary, server.app[STATE])


def _assert_paid_once_and_stored(run_dir: Path, state: SandboxState) -> None:
    facts = run_facts(run_dir)
    assert facts.disk_digests == billed_digests(state)
    assert sum(facts.disk_digests.values()) == facts.state.images_done
    assert state.content_billed_twice == 0
    assert len(facts.submitted_uuids) == len(set(facts.submitted_uuids))
    assert facts.ledger_usd == state.billed_total_usd == facts.state.spent_usd
    assert not facts.mismatched
    assert not facts.parts
    assert not facts.corrupt


@pytest.mark.parametrize("faults", [False, True], ids=["alone", "fault-mix"])
@pytest.mark.parametrize("dialect", DIALECTS_DONE)
async def test_first_run_finishes_in_every_dialect(
    tmp_path: Path, make_sandbox: SandboxFactory, dialect: str, faults: bool
) -> None:
    config = {**(FAULT_MIX if faults else QUIET), **DIALECTS[dialect]}
    run = await first_run(tmp_path, make_sandbox, config)
    summary, state = run.summary, run.state
    assert summary.exit_code == 0, (summary.stop_reason, summary.stop_message)
    facts = run_facts(tmp_path / "run")
    assert (len(facts.state.done_keys), facts.state.images_done) == (TASKS, IMAGES)
    assert not facts.state.pending
    assert not facts.state.failed
    _assert_paid_once_and_stored(tmp_path / "run", state)
    record = Dialect.model_validate_json((tmp_path / "run" / DIALECT_NAME).read_text())
    expected = {
        "batch-first-only": PollMode.SINGLE,
        "batch-refused": PollMode.SINGLE,
        "batch-empty": PollMode.SINGLE,
    }.get(dialect, PollMode.BATCHED)
    assert record.poll_mode is expected


@pytest.mark.parametrize("faults", [False, True], ids=["alone", "fault-mix"])
@pytest.mark.parametrize("task_type", ["imageInference", "getResponse"])
async def test_failures_as_data_items_fail_at_once(
    tmp_path: Path, make_sandbox: SandboxFactory, task_type: str, faults: bool
) -> None:
    """A failed generation sent as a data item fails its task in the first run with
    its code; every other task is done (exit 1, nothing left hanging)."""
    config = {
        **(FAULT_MIX if faults else QUIET),
        **DIALECTS["failed-as-data"],
        "poll_task_type": task_type,
    }
    run = await first_run(tmp_path, make_sandbox, config)
    summary = run.summary
    assert summary.exit_code == 1, (summary.stop_reason, summary.stop_message)
    failed = [
        e
        for e in read_journal(tmp_path / "run" / "journal.jsonl")
        if isinstance(e, FailedEvent)
    ]
    assert failed
    assert {e.code for e in failed} == {"inferenceError"}
    facts = run_facts(tmp_path / "run")
    assert len(facts.state.done_keys) + len(facts.state.failed) == TASKS
    assert not facts.state.pending
    _assert_paid_once_and_stored(tmp_path / "run", run.state)


@pytest.mark.parametrize("faults", [False, True], ids=["alone", "fault-mix"])
async def test_credit_runs_out_mid_run_then_a_top_up_finishes(
    tmp_path: Path, make_sandbox: SandboxFactory, faults: bool
) -> None:
    """Credit for 20 images: the run stops submitting at the first refusal, collects
    every task the API accepted (exit 3), and after a top-up the same command
    finishes; nothing is paid twice."""
    config = {**(FAULT_MIX if faults else QUIET), "credit_usd": Decimal("1.60")}
    server = await make_sandbox(SandboxConfig(**config))
    settings = fast_settings(tmp_path, base_url(server))
    job, run_dir = _job(tmp_path), tmp_path / "run"
    state = server.app[STATE]
    first = await run_manifest(job, run_dir, settings, concurrency=12)
    assert first.exit_code == 3
    assert first.stop_reason == "credit"
    facts = run_facts(run_dir)
    if not faults:  # a drop may leave a task's fate to the next run
        assert not facts.state.pending, "an accepted task was not collected"
    assert 0 < facts.state.images_done <= 20
    assert facts.disk_digests == billed_digests(state), "a paid image not stored"
    state.top_up(Decimal(100))
    second = await run_manifest(job, run_dir, settings, concurrency=12)
    assert second.exit_code == 0, (second.stop_reason, second.stop_message)
    facts = run_facts(run_dir)
    assert (len(facts.state.done_keys), facts.state.images_done) == (TASKS, IMAGES)
    _assert_paid_once_and_stored(run_dir, state)


@pytest.mark.parametrize(
    "dialect",
    [
        "shipped",
        "unknown-taskNotFound",
        "unknown-silent",
        "unknown-processing",
        "ack-empty",
        "ack-empty-unknown-processing",
        "reuse-duplicate",
    ],
)
async def test_ambiguous_submits_settle_by_the_same_uuid(
    tmp_path: Path, make_sandbox: SandboxFactory, dialect: str
) -> None:
    """A third of submits answer 5xx before accepting, a third are accepted and
    then dropped: each such task is settled by its own taskUUID (asked about, then
    sent again), whatever getResponse says of unknown tasks; no task ever gets a
    second taskUUID and nothing is paid twice, in the first run."""
    config = {
        **QUIET,
        "latency_s": 0.3,  # longer than the grace: settled before any result
        **DIALECTS[dialect],
        "server_error_rate": 0.3,
        "drop_after_accept_rate": 0.3,
        "fault_task_types": frozenset({"imageInference"}),
    }
    run = await first_run(tmp_path, make_sandbox, config)
    summary, state = run.summary, run.state
    assert summary.exit_code == 0, (summary.stop_reason, summary.stop_message)
    assert summary.resent > 0
    assert summary.resubmitted == 0
    facts = run_facts(tmp_path / "run")
    assert (len(facts.state.done_keys), facts.state.images_done) == (TASKS, IMAGES)
    assert len(facts.submitted_uuids) == TASKS  # one taskUUID per task, ever
    assert {u.lower() for u in facts.submitted_uuids} == set(state.tasks)
    _assert_paid_once_and_stored(tmp_path / "run", state)
    if "processing" in dialect:
        # "processing" proves nothing there: a dropped (accepted) submit is sent
        # again and refused as reused, which settles it as accepted earlier.
        assert state.duplicate_task_uuids > 0


async def test_a_resume_starts_from_the_mode_the_run_learnt(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """An API that answers only the first task of a batch: the first run learns it
    and records it; the resumed run asks one taskUUID per request from its first
    question on (no batch is sent to be judged again)."""
    arrivals = Arrivals()
    app = create_app(SandboxConfig(**QUIET, poll_batch="first"))
    app.middlewares.append(arrivals.middleware())
    job, run_dir = _job(tmp_path), tmp_path / "run"
    async with serving(app) as url:
        settings = fast_settings(tmp_path, url)
        stop = StopAfter(20)
        first = await run_manifest(
            job, run_dir, settings, concurrency=12, on_engine=stop.attach, progress=stop
        )
        assert first.exit_code == 3
        record = Dialect.model_validate_json((run_dir / DIALECT_NAME).read_text())
        assert record.poll_mode is PollMode.SINGLE
        arrivals.poll_sizes.clear()
        second = await run_manifest(job, run_dir, settings, concurrency=12)
    assert second.exit_code == 0
    assert arrivals.poll_sizes
    assert max(arrivals.poll_sizes) == 1
