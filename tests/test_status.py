"""``remix status`` during and after a run: in flight means sent (not journaled
ahead), the live run's pid, and the run dirs of one job's shards shown as one job."""

from __future__ import annotations

import fcntl
import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from pipeline.cli import main
from pipeline.engine import Engine
from pipeline.journal import JOURNAL_NAME, JournalWriter
from pipeline.journal_events import (
    Event,
    LostEvent,
    RunStartedEvent,
    SentEvent,
    SubmittedEvent,
)
from pipeline.sandbox import SandboxConfig
from pipeline.status import RunStatus, format_status, run_status
from tests.conftest import SandboxFactory
from tests.jobkit import base_url, fast_settings, run_manifest, styles, write_job

T0 = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)
PRICE = Decimal("0.08")


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNWARE_API_KEY", raising=False)
    monkeypatch.delenv("REMIX_BASE_URL", raising=False)


def uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def started(
    tasks: int, *, shard: str | None = None, journals_sent: bool = True
) -> RunStartedEvent:
    return RunStartedEvent(
        ts=T0,
        run_id="run",
        manifest_sha256="a" * 64,
        tasks=tasks,
        images=tasks,
        estimate_usd=PRICE * tasks,
        shard=shard,
        journals_sent=journals_sent,
    )


def submitted(n: int) -> SubmittedEvent:
    return SubmittedEvent(
        ts=T0, key=f"r{n}/v0", task_uuid=uuid(n), images=1, estimate_usd=PRICE
    )


def write_journal(run_dir: Path, events: list[Event]) -> None:
    async def append() -> None:
        async with JournalWriter.open(run_dir / JOURNAL_NAME) as journal:
            await journal.append(*events)

    run_dir.mkdir(parents=True, exist_ok=True)
    anyio.run(append)


# ---------------------------------------------------------------------------
# In flight vs queued


@pytest.mark.anyio
async def test_status_during_a_run_counts_only_sent_tasks_in_flight(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Concurrency 3, 30 tasks journaled ahead: status says 3 in flight and 27
    queued (it used to say 30 in flight), with the running pid; after a hard stop,
    the 3 sent stay in flight for the rerun and none is queued."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=600))
    job = write_job(tmp_path, refs=10, variants=styles(3))
    run_dir = tmp_path / "run"
    settings = fast_settings(tmp_path, base_url(server))
    engines: list[Engine] = []
    seen: list[RunStatus] = []

    async def watch() -> None:
        with anyio.fail_after(60):  # a guard, not a timing goal
            while True:
                await anyio.sleep(0.01)
                if not (run_dir / JOURNAL_NAME).exists():
                    continue
                status = run_status(run_dir)
                # Journaled ahead past the concurrency, and the sends journaled.
                if status.in_flight + status.queued > 3 and status.in_flight >= 3:
                    seen.append(status)
                    engines[0].stop_now()
                    return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await run_manifest(
            job, run_dir, settings, concurrency=3, on_engine=engines.append
        )
    status = seen[0]
    assert (status.in_flight, status.queued, status.remaining) == (3, 27, 0)
    assert status.state == "running"
    assert status.running_pid == os.getpid()
    text = format_status(status)
    assert "3 in flight, 27 queued" in text
    assert f"pid           {os.getpid()}" in text
    assert "queued        27 journaled ahead, not sent yet" in text

    after = run_status(run_dir)
    assert after.state == "stopped"
    assert (after.in_flight, after.queued, after.remaining) == (3, 0, 27)
    assert after.running_pid is None


def test_a_crash_leaves_journaled_unsent_tasks_queued(tmp_path: Path) -> None:
    """Submitted lines with no sent line are queued; a lost one is neither."""
    run_dir = tmp_path / "run"
    events: list[Event] = [started(6), *(submitted(n) for n in range(5))]
    events += [SentEvent(ts=T0, task_uuids=[uuid(0), uuid(1)])]
    events += [LostEvent(ts=T0, key="r4/v0", task_uuid=uuid(4))]
    write_journal(run_dir, events)
    status = run_status(run_dir)
    assert status.state == "interrupted"
    assert (status.in_flight, status.queued, status.remaining) == (2, 2, 2)
    assert status.queued_task_uuids == (uuid(2), uuid(3))
    assert status.pending_task_uuids == tuple(uuid(n) for n in range(4))
    data = status.to_json()
    assert (data["in_flight"], data["queued"]) == (2, 2)
    text = format_status(status)
    assert "0 done, 0 failed, 2 in flight, 2 queued, 2 remaining of 6" in text
    assert f"in flight     {uuid(0)}, {uuid(1)}\n" in text


def test_an_old_journal_without_sent_lines_counts_every_pending_task_sent(
    tmp_path: Path,
) -> None:
    """A remix that journaled no sent lines: its submitted tasks are in flight, as
    before; a resume by a new remix journals sends from its run_started on."""
    run_dir = tmp_path / "run"
    write_journal(
        run_dir, [started(4, journals_sent=False), submitted(0), submitted(1)]
    )
    status = run_status(run_dir)
    assert (status.in_flight, status.queued) == (2, 0)
    write_journal(run_dir, [started(4), submitted(2), submitted(3)])
    status = run_status(run_dir)
    assert (status.in_flight, status.queued) == (2, 2)


# ---------------------------------------------------------------------------
# Several run dirs: one job's shards


def run_shards(root: Path, count: int, indices: list[int]) -> tuple[Path, list[Path]]:
    variants = [{"id": f"v{i}", "positivePrompt": f"style {i}"} for i in range(4)]
    job = write_job(root, refs=2, variants=variants)
    dirs = []
    for index in indices:
        run_dir = root / f"s{index}"
        argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
        assert main([*argv, "--shard", f"{index}/{count}"]) == 0
        dirs.append(run_dir)
    return job, dirs


def test_status_of_shards_shows_one_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status S0 S1: the job's counts added up, a line per shard; JSON too."""
    _, dirs = run_shards(tmp_path, 2, [0, 1])
    capsys.readouterr()
    assert main(["status", *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    assert "state         finished: every task of 2 shard(s) is done" in out
    assert (
        "tasks         8 done, 0 failed, 0 in flight, 0 queued, 0 remaining of 8" in out
    )
    assert "images        8 of 8" in out
    assert "cost          $0.64" in out
    assert "(2 of 2 shards)" in out
    assert out.count("shard 0/2") == 1
    assert out.count("shard 1/2") == 1
    assert main(["status", *map(str, dirs), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["done"], data["tasks_total"], data["images_done"]) == (8, 8, 8)
    assert data["spent_usd"] == "0.64"
    assert data["missing_shards"] == []
    assert sorted(run["shard"] for run in data["runs"]) == ["0/2", "1/2"]


def test_status_names_the_missing_and_unfinished_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shards 0/3 and 2/3 given, 2/3 interrupted: incomplete, with 1/3 named and
    the resume command of the one that stopped."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_journal(a, [started(2, shard="0/3")])
    write_journal(b, [started(3, shard="2/3"), submitted(0)])
    assert main(["status", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert (
        "state         incomplete: 2 shard(s) unfinished; shard(s) 1/3 not given" in out
    )
    assert "0 done, 0 failed, 0 in flight, 1 queued, 4 remaining of 5" in out
    assert f"resume with   remix run MANIFEST --run-dir {b} --shard 2/3" in out


def test_status_refuses_run_dirs_that_are_not_one_jobs_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Counting a whole run beside a shard, a shard twice, or two manifests would
    count tasks twice: exit 2, saying why."""
    whole, s0, s0_again, s1 = (tmp_path / n for n in ("whole", "s0", "again", "s1"))
    write_journal(whole, [started(4)])
    write_journal(s0, [started(2, shard="0/2")])
    write_journal(s0_again, [started(2, shard="0/2")])
    other = started(2, shard="1/2").model_copy(update={"manifest_sha256": "b" * 64})
    write_journal(s1, [other])
    cases = [
        ([whole, s0], "holds a whole job"),
        ([s0, s0_again], "shard 0/2 is given twice"),
        ([s0, s1], "different manifests"),
        ([s0, tmp_path / "nope"], "is not a run directory"),
    ]
    for dirs, message in cases:
        assert main(["status", *map(str, dirs)]) == 2
        assert message in capsys.readouterr().err


def test_status_of_shards_names_the_running_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a shard's run holds its run dir, the job is running, with that pid."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_journal(a, [started(1, shard="0/2")])
    write_journal(b, [started(1, shard="1/2")])
    with (b / ".lock").open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["status", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"running: 1 of 2 shard(s) running (pid {os.getpid()})" in out
    assert f"shard 1/2     running (pid {os.getpid()})" in out
