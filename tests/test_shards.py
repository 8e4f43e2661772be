"""A job split into shards: each shard's share of the budget, ``plan --shard``,
``--shard auto/N`` from a scheduler's environment."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.journal import load_state
from pipeline.shard import Shard, missing_shards
from tests.jobkit import write_job

REPO = Path(__file__).resolve().parent.parent
NIGHTLY = REPO / "jobs" / "nightly.toml"
SCHEDULER_ENV = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RUNWARE_API_KEY", "REMIX_BASE_URL", *SCHEDULER_ENV):
        monkeypatch.delenv(name, raising=False)


def eight_task_job(root: Path, budget_usd: str) -> Path:
    """2 references x 4 variants, one image each ($0.08): $0.64 for the job."""
    variants = [{"id": f"v{i}", "positivePrompt": f"style {i}"} for i in range(4)]
    return write_job(root, refs=2, variants=variants, budget_usd=budget_usd)


def test_each_shard_gets_its_share_of_the_job_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """budget_usd 0.32 over 2 shards: $0.16 each, so the two together never spend
    more than the job's cap (each used to get the whole $0.32)."""
    job = eight_task_job(tmp_path, "0.32")
    spent = []
    for index in range(2):
        run_dir = tmp_path / f"s{index}"
        argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
        code = main([*argv, "--shard", f"{index}/2"])
        tasks = sum(
            Shard(index, 2).contains(f"r{r}/v{v}") for r in range(2) for v in range(4)
        )
        out = capsys.readouterr().out
        assert code == (3 if tasks > 2 else 0), out
        if tasks > 2:
            assert "budget $0.16 reached" in out
        spent.append(load_state(run_dir / "journal.jsonl").spent_usd)
    assert max(spent) <= Decimal("0.16")
    assert sum(spent) <= Decimal("0.32")


def test_a_shard_budget_flag_overrides_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--budget is the shard's own cap: no split."""
    job = eight_task_job(tmp_path, "0.32")
    index = max(
        range(2),
        key=lambda i: sum(
            Shard(i, 2).contains(f"r{r}/v{v}") for r in range(2) for v in range(4)
        ),
    )
    run_dir = tmp_path / "big"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main([*argv, "--shard", f"{index}/2", "--budget", "1"]) == 0
    capsys.readouterr()


def test_budget_share_never_adds_up_to_more_than_the_budget() -> None:
    """budget / N rounded down, shown plainly."""
    assert Shard(0, 2).budget_share(Decimal("20.0")) == Decimal("10.00")
    assert str(Shard(0, 2).budget_share(Decimal("20.0"))) == "10.00"
    assert str(Shard(1, 3).budget_share(Decimal("20"))) == "6.666666"
    assert Shard(0, 3).budget_share(Decimal("20")) * 3 <= Decimal(20)
    assert str(Shard(0, 4).budget_share(Decimal("7.5"))) == "1.875"


def test_plan_of_a_shard_counts_its_tasks_and_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """plan --shard I/N: that shard's tasks, images and estimate, and budget / N;
    the shards' counts add up to the job's."""
    assert main(["plan", str(NIGHTLY), "--format", "json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    parts = []
    for index in range(2):
        argv = ["plan", str(NIGHTLY), "--shard", f"{index}/2", "--format", "json"]
        assert main(argv) == 0
        parts.append(json.loads(capsys.readouterr().out))
    assert [p["shard"] for p in parts] == ["0/2", "1/2"]
    assert sum(p["tasks"] for p in parts) == whole["tasks"] == 54
    assert 0 < parts[0]["tasks"] < 54
    assert sum(p["images"] for p in parts) == whole["images"]
    assert sum(Decimal(p["estimated_cost_usd"]) for p in parts) == Decimal(
        whole["estimated_cost_usd"]
    )
    assert parts[0]["estimated_cost_usd"] == str(Decimal("0.08") * parts[0]["images"])
    assert {p["shard_budget_usd"] for p in parts} == {"10.00"}
    assert main(["plan", str(NIGHTLY), "--shard", "1/2"]) == 0
    table = capsys.readouterr().out
    assert f"tasks           {parts[1]['tasks']}" in table
    assert "$10.00 for this shard: the job's $20.0 split across 2 shards" in table
    assert main(["plan", str(NIGHTLY)]) == 0
    assert "each shard gets 1/N" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"JOB_COMPLETION_INDEX": "0"}, Shard(0, 4)),
        ({"JOB_COMPLETION_INDEX": "3"}, Shard(3, 4)),
        ({"SLURM_ARRAY_TASK_ID": "2"}, Shard(2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}, Shard(3, 4)),
        ({"JOB_COMPLETION_INDEX": "1", "SLURM_ARRAY_TASK_ID": "9"}, Shard(1, 4)),
    ],
)
def test_shard_auto_takes_the_index_from_the_scheduler(
    env: dict[str, str], expected: Shard
) -> None:
    """Kubernetes Indexed Jobs (0-based) and Slurm arrays (less their first index)."""
    assert Shard.resolve("auto/4", env) == expected
    assert Shard.resolve("2/4", env) == Shard(2, 4)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "neither is set"),
        (
            {"JOB_COMPLETION_INDEX": "4"},
            "JOB_COMPLETION_INDEX=4 is shard 4, not one of 0..3",
        ),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "1"}, "is shard -1"),
        ({"SLURM_ARRAY_TASK_ID": "5"}, "--array=0-3"),
        ({"JOB_COMPLETION_INDEX": "x"}, "not a whole number"),
    ],
)
def test_shard_auto_is_refused_with_exit_2_without_a_usable_index(
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No scheduler variable, or an index out of range: a usage error, exit 2,
    before anything is read or sent."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in ("run", "plan"):
        with pytest.raises(SystemExit) as exc:
            main([command, str(NIGHTLY), "--shard", "auto/4"])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_auto_shard_runs_the_indexed_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run dir records the resolved shard, so status and resume name it."""
    job = eight_task_job(tmp_path, "10")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main([*argv, "--shard", "auto/2"]) == 0
    capsys.readouterr()
    assert json.loads((run_dir / "run.json").read_text())["shard"] == "1/2"


def test_missing_shards_of_one_job() -> None:
    """Distinct shards of one N show as one job; anything else is refused."""
    assert missing_shards([None]) == []
    assert missing_shards([Shard(0, 3), Shard(2, 3)]) == [Shard(1, 3)]
    with pytest.raises(ValueError, match="whole job"):
        missing_shards([None, Shard(0, 2)])
    with pytest.raises(ValueError, match="different splits"):
        missing_shards([Shard(0, 2), Shard(0, 3)])
    with pytest.raises(ValueError, match="twice"):
        missing_shards([Shard(0, 2), Shard(0, 2)])
