"""The exit code follows the run dir's state after the run, on every path: 0 only
when every task of the run dir (the job, or the shard) is done, 1 while any failed
for good, 3 while any is left."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.cli import main
from pipeline.exit_codes import ExitCode
from pipeline.records import EngineOptions
from pipeline.sandbox import SandboxConfig
from pipeline.shard import Shard
from pipeline.status import run_status
from tests.conftest import SandboxFactory
from tests.jobkit import (
    StopAfter,
    base_url,
    fast_settings,
    run_manifest,
    styles,
    write_job,
)


def _agrees_with_status(run_dir: Path, code: ExitCode) -> None:
    """``remix status`` reads the same state the exit code came from."""
    state = run_status(run_dir).state
    expected = {
        ExitCode.OK: "finished",
        ExitCode.FAILED: "finished-with-failures",
        ExitCode.STOPPED: "stopped",
    }[code]
    assert state == expected


async def test_a_fresh_run_and_a_rerun_with_nothing_to_do_exit_0(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=2, variants=styles(3))
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    first = await run_manifest(job, run_dir, settings)
    assert first.exit_code == ExitCode.OK
    again = await run_manifest(job, run_dir, settings)
    assert again.exit_code == ExitCode.OK
    assert again.tasks_done == 0
    assert again.tasks_done_before == 6
    _agrees_with_status(run_dir, ExitCode.OK)


async def test_a_stop_once_every_task_is_done_exits_0(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A Ctrl-C that lands after the last task is stored leaves nothing to do."""
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=2, variants=styles(3))
    settings = fast_settings(tmp_path, base_url(server))
    stopper = StopAfter(6, hard=False)
    summary = await run_manifest(
        job,
        tmp_path / "run",
        settings,
        progress=stopper,
        on_engine=stopper.attach,
    )
    assert summary.stop_reason == "interrupted"
    assert summary.exit_code == ExitCode.OK
    _agrees_with_status(tmp_path / "run", ExitCode.OK)


async def test_failures_exit_1_until_retried_then_0(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Failed for good: 1 on the run and on a plain rerun that sends nothing; a
    ``--retry-failed`` that fixes them: 0, and so is every rerun after it."""
    failing = await make_sandbox(
        SandboxConfig(seed=3, latency_s=0.02, render_scale=0.1, task_fail_rate=0.3)
    )
    job = write_job(tmp_path, refs=4, variants=styles(5))
    run_dir = tmp_path / "run"
    settings = fast_settings(tmp_path, base_url(failing))
    first = await run_manifest(job, run_dir, settings)
    assert first.after is not None
    failed = first.after.failed
    assert failed > 0
    assert first.exit_code == ExitCode.FAILED
    again = await run_manifest(job, run_dir, settings)
    assert (again.tasks_done, again.tasks_failed) == (0, 0)  # nothing was sent
    assert again.exit_code == ExitCode.FAILED
    assert again.after is not None
    assert again.after.failed == failed
    _agrees_with_status(run_dir, ExitCode.FAILED)
    healthy = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    settings = fast_settings(tmp_path, base_url(healthy))
    retried = await run_manifest(job, run_dir, settings, retry_failed=True)
    assert retried.tasks_done == failed
    assert retried.exit_code == ExitCode.OK
    assert (await run_manifest(job, run_dir, settings)).exit_code == ExitCode.OK
    _agrees_with_status(run_dir, ExitCode.OK)


async def test_after_a_kill_3_then_a_rerun_finishes_with_0(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0.2, render_scale=0.1))
    job = write_job(tmp_path, refs=4, variants=styles(5))
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    stopper = StopAfter(2, hard=True)
    killed = await run_manifest(
        job, run_dir, settings, progress=stopper, on_engine=stopper.attach
    )
    assert killed.exit_code == ExitCode.STOPPED
    assert killed.after is not None
    assert killed.after.left > 0
    _agrees_with_status(run_dir, ExitCode.STOPPED)
    assert (await run_manifest(job, run_dir, settings)).exit_code == ExitCode.OK


async def test_a_budget_stop_exits_3_on_every_rerun_until_raised(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=2, variants=styles(5))  # 10 tasks, $0.80
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    for _ in range(2):
        stopped = await run_manifest(job, run_dir, settings, budget_usd=Decimal("0.5"))
        assert stopped.exit_code == ExitCode.STOPPED
        _agrees_with_status(run_dir, ExitCode.STOPPED)
    done = await run_manifest(job, run_dir, settings, budget_usd=Decimal("0.8"))
    assert done.exit_code == ExitCode.OK


async def test_a_shard_exits_on_its_own_tasks(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A shard whose tasks are all done exits 0, though the job has more."""
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=4, variants=styles(5))
    settings = fast_settings(tmp_path, base_url(server))
    for label in ("0/2", "1/2"):
        run_dir = tmp_path / f"run-{label.replace('/', 'of')}"
        options = EngineOptions(concurrency=4, shard=Shard.parse(label))
        for _ in range(2):  # the run, then a rerun with nothing to do
            summary = await runner.run_manifest(
                job, run_dir, settings, options, outputs=False
            )
            assert summary.exit_code == ExitCode.OK
            assert summary.after is not None
            assert 0 < summary.after.done == summary.tasks_total < 20
        _agrees_with_status(run_dir, ExitCode.OK)


def test_the_cli_exits_with_the_run_dirs_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``remix run`` returns the same code: a budget stop 3, twice; then 0."""
    job = write_job(tmp_path, refs=2, variants=styles(2))  # 4 tasks, $0.32
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main([*argv, "--budget", "0.2"]) == ExitCode.STOPPED
    assert main([*argv, "--budget", "0.2"]) == ExitCode.STOPPED
    out = capsys.readouterr().out
    assert "2 of 4 tasks (0 new this run, 2 before)" in out
    assert main(argv) == ExitCode.OK
    assert main(argv) == ExitCode.OK
    assert "4 of 4 tasks (0 new this run, 4 before)" in capsys.readouterr().out
