"""The budget against the sandbox: what fits is sent (task by task, not batch by
batch), what is left is said, a budget below one task is refused before anything is
sent, and a rerun never spends past the cap."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.exit_codes import ExitCode
from pipeline.journal import load_state
from pipeline.records import EngineOptions
from pipeline.sandbox import STATE, SandboxConfig
from pipeline.status import run_status
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

PRICE = Decimal("0.08")


@pytest.mark.parametrize(("budget", "fits"), [("0.50", 6), ("1", 12), ("2.50", 31)])
async def test_a_budget_sends_every_task_that_fits(
    tmp_path: Path, make_sandbox: SandboxFactory, budget: str, fits: int
) -> None:
    """A budget below one submit batch still sends what fits, then stops (exit 3);
    the summary's counts are the status's."""
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=4, variants=styles(10))  # 40 tasks, $3.20
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    summary = await run_manifest(
        job, run_dir, settings, concurrency=8, budget_usd=Decimal(budget)
    )
    state = server.app[STATE]
    assert state.billed_total_usd == fits * PRICE
    assert summary.tasks_done == fits
    assert summary.stop_reason == "budget"
    assert summary.exit_code == ExitCode.STOPPED
    assert summary.after is not None
    assert (summary.after.done, summary.after.left) == (fits, 40 - fits)
    status = run_status(run_dir)
    assert (status.done, status.in_flight + (status.remaining or 0)) == (
        fits,
        40 - fits,
    )
    assert summary.budget_next_usd == PRICE
    assert summary.stop_message is not None
    assert f"${budget}" in summary.stop_message
    assert "$0.08" in summary.stop_message


async def test_a_rerun_with_the_same_budget_does_nothing_and_a_raise_continues(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """After a budget stop, the same budget sends nothing and exits 3 again; a
    higher one finishes the job, nothing paid twice."""
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=4, variants=styles(10))
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    state = server.app[STATE]
    first = await run_manifest(job, run_dir, settings, budget_usd=Decimal("1"))
    assert first.tasks_done == 12
    submissions = state.submissions
    again = await run_manifest(job, run_dir, settings, budget_usd=Decimal("1"))
    assert state.submissions == submissions  # nothing new was sent
    assert again.exit_code == ExitCode.STOPPED
    assert again.stop_reason == "budget"
    assert again.tasks_done == 0
    assert again.after is not None
    assert (again.after.done, again.after.left) == (12, 28)
    last = await run_manifest(job, run_dir, settings, budget_usd=Decimal("10"))
    assert last.exit_code == ExitCode.OK
    assert state.billed_total_usd == 40 * PRICE
    assert state.content_billed_twice == 0
    assert len(image_files(run_dir)) == 40


async def test_a_budget_below_one_task_is_refused_before_anything_is_sent(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """ConfigError naming the price and the budget; no request, no run dir."""
    server = await make_sandbox(SandboxConfig(latency_s=0.02))
    job = write_job(tmp_path, refs=2)
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    options = EngineOptions(concurrency=4, budget_usd=Decimal("0.05"))
    with pytest.raises(ConfigError) as caught:
        await runner.run_manifest(job, run_dir, settings, options, outputs=False)
    assert "$0.05" in str(caught.value)
    assert "$0.08" in str(caught.value)
    assert server.app[STATE].submissions == 0
    assert not run_dir.exists()


def test_the_cli_exits_2_for_a_budget_below_one_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, refs=2)
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main([*argv, "--budget", "0.01"]) == ExitCode.INVALID
    err = capsys.readouterr().err
    assert "$0.01" in err
    assert "$0.08" in err
    assert not run_dir.exists()


async def test_a_resumed_run_counts_what_an_earlier_run_sent_against_the_budget(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Tasks a killed run sent are paid when they finish: a rerun under the same
    budget reserves them first, so the bill never passes the cap."""
    server = await make_sandbox(SandboxConfig(latency_s=0.3, render_scale=0.1))
    job = write_job(tmp_path, refs=4, variants=styles(10))
    settings = fast_settings(tmp_path, base_url(server), limits={"submit_batch": 4})
    run_dir = tmp_path / "run"
    stopper = StopAfter(1, hard=True)
    await run_manifest(
        job,
        run_dir,
        settings,
        concurrency=16,
        budget_usd=Decimal("2"),
        progress=stopper,
        on_engine=stopper.attach,
    )
    assert load_state(run_dir / "journal.jsonl").pending  # sent, not collected
    await run_manifest(job, run_dir, settings, budget_usd=Decimal("2"))
    state = server.app[STATE]
    assert state.billed_total_usd <= Decimal("2")
    assert state.content_billed_twice == 0
