"""The end-of-run summary reads for people first: where the run dir stands, what it
cost, where the ledger and gallery are, and the next command; request figures only
with ``-v``."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.cli.run import print_summary
from pipeline.records import RunDirCounts, RunSummary

ARGV = ["run", "job.toml", "--run-dir", "runs/x"]


def _summary(**counts: int) -> RunSummary:
    after = RunDirCounts(
        total=40,
        done=counts.get("done", 40),
        failed=counts.get("failed", 0),
        in_flight=counts.get("in_flight", 0),
        not_sent=counts.get("not_sent", 0),
        failures=tuple(
            (f"r{i}/v0", "invalidPrompt", "the prompt was refused")
            for i in range(min(5, counts.get("failed", 0)))
        ),
    )
    return RunSummary(
        tasks_total=40,
        images_total=40,
        tasks_done=counts.get("new", 0),
        tasks_done_before=after.done - counts.get("new", 0),
        images_done=after.done,
        images_new=counts.get("new", 0),
        submit_requests=3,
        poll_requests=60,
        uploads=3,
        latency_s=0.5,
        wall_s=2.0,
        spent_usd=Decimal("0.08") * after.done,
        spent_this_run_usd=Decimal("0.08") * counts.get("new", 0),
        after=after,
    )


def _printed(
    capsys: pytest.CaptureFixture[str], summary: RunSummary, verbose: int = 0
) -> str:
    print_summary(summary, Path("runs/x"), ARGV, verbose=verbose)
    return capsys.readouterr().out


def test_a_no_op_rerun_reads_all_done_and_none_new(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _printed(capsys, _summary(new=0))
    assert out.splitlines()[0] == "finished: all 40 tasks are done"
    assert "40 of 40 tasks (0 new this run, 40 before)" in out
    assert "left" not in out
    assert "resume" not in out


def test_the_ledger_and_gallery_paths_and_the_cost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _printed(capsys, _summary(done=40, new=10))
    assert str(Path("runs/x/ledger.csv")) in out
    assert str(Path("runs/x/gallery.html")) in out
    assert "$0.80 this run, $3.20 in all" in out


def test_request_figures_only_with_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = _printed(capsys, _summary(new=40))
    assert "api requests" not in quiet
    assert "concurrency / latency" not in quiet
    loud = _printed(capsys, _summary(new=40), verbose=1)
    assert "66 api requests" in loud
    assert "concurrency / latency" in loud


def test_failures_are_counted_named_and_the_retry_command_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _printed(capsys, _summary(done=31, failed=9, new=31))
    assert out.splitlines()[0] == (
        "finished with failures: 9 of 40 tasks failed for good"
    )
    assert "r0/v0: invalidPrompt: the prompt was refused" in out
    assert "... and 4 more" in out
    assert "remix run job.toml --run-dir runs/x --retry-failed" in out


def test_a_stop_says_what_is_left_and_how_to_resume(
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = _summary(done=12, new=12, not_sent=28)
    summary.stop_reason = "budget"
    summary.stop_message = "budget $1 reached"
    out = _printed(capsys, summary)
    assert out.splitlines()[0] == (
        "stopped early, 28 of 40 tasks left: budget $1 reached"
    )
    assert "12 of 40 tasks (12 new this run, 0 before)" in out
    assert "left      28 (28 not sent yet)" in out
    assert "resume with (after raising --budget): remix run job.toml" in out
