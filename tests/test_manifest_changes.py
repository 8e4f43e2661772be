"""A run dir is of the manifest's tasks, not its bytes: comments pass, new tasks extend
the run, changed or dropped tasks are refused (naming them) unless --rerun-changed."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from pipeline import runner
from pipeline.cli.app import main
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.expand import expand
from pipeline.journal import JournalWriter, load_state, read_journal
from pipeline.journal_events import CompletedEvent, Event, RerunEvent, SubmittedEvent
from pipeline.ledger import read_ledger, write_ledger
from pipeline.manifest import load_manifest
from pipeline.records import EngineOptions, RunSummary
from pipeline.run_identity import supersede, task_fingerprint
from pipeline.sandbox import STATE
from pipeline.task_prints import PRINTS_NAME, compare_prints, read_prints
from tests.jobkit import base_url, fast_settings, run_manifest, write_job

PROMPTS = [
    {"id": "v0", "positivePrompt": "a {thing} in ink"},
    {"id": "v1", "positivePrompt": "a {thing} in oil"},
]


async def rerun(job: Path, run_dir: Path, settings: Settings) -> RunSummary:
    """``remix run --rerun-changed``, as the CLI calls it."""
    options = EngineOptions(concurrency=8)
    return await runner.run_manifest(
        job, run_dir, settings, options, rerun_changed=True
    )


def _events(run_dir: Path) -> list[Event]:
    return list(read_journal(run_dir / "journal.jsonl"))


def _submitted(run_dir: Path) -> int:
    return sum(isinstance(e, SubmittedEvent) for e in _events(run_dir))


def _fingerprints(manifest: Path) -> dict[str, bytes]:
    return {
        spec.key: task_fingerprint(spec, manifest.parent.resolve())
        for spec in expand(load_manifest(manifest))
    }


def test_fingerprints_follow_the_tasks_not_the_bytes(tmp_path: Path) -> None:
    """Comments, spacing and key order leave every fingerprint; a parameter, a
    reference row or a moved picture name changes exactly the tasks it reaches."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    before = _fingerprints(job)
    text = job.read_text()
    job.write_text("# nightly styles\n\n" + text.replace("width = 1024", "width=1024"))
    assert _fingerprints(job) == before
    job.write_text(text.replace("oil", "watercolour"))
    after = _fingerprints(job)
    assert {k for k in before if before[k] != after[k]} == {"r0/v1", "r1/v1"}
    job.write_text(text.replace('image = "refs/r1.png"', 'image = "refs/r0.png"'))
    after = _fingerprints(job)
    assert {k for k in before if before[k] != after[k]} == {"r1/v0", "r1/v1"}


def test_reference_csv_rows_are_part_of_the_identity(tmp_path: Path) -> None:
    """A references CSV is read into the tasks: changing a row's vars changes its
    tasks (the manifest's own bytes do not change)."""
    job = write_job(tmp_path, refs=1)
    (tmp_path / "refs.csv").write_text("id,image,thing\nc0,refs/r0.png,a cat\n")
    job.write_text(job.read_text() + '\n[references_from]\ncsv = "refs.csv"\n')
    before = _fingerprints(job)
    (tmp_path / "refs.csv").write_text("id,image,thing\nc0,refs/r0.png,a dog\n")
    after = _fingerprints(job)
    assert {k for k in before if before[k] != after[k]} == {"c0/v0"}


async def test_a_comment_does_not_block_the_resume(
    tmp_path: Path, sandbox: TestServer
) -> None:
    """Same tasks, different bytes: the resume goes on and sends nothing."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    job.write_text("# tuned on Monday\n" + job.read_text() + "\n# the end\n")
    again = await run_manifest(job, run_dir, settings)
    assert again.exit_code == 0
    assert again.images_new == 0
    assert sandbox.app[STATE].submissions == 4


async def test_added_tasks_extend_the_run(tmp_path: Path, sandbox: TestServer) -> None:
    """A new reference adds tasks: they run, the done ones stay as they were."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    first = {e.key: e.sha256 for e in _events(run_dir) if isinstance(e, CompletedEvent)}
    write_job(tmp_path, refs=3, variants=PROMPTS)
    again = await run_manifest(job, run_dir, settings)
    assert again.exit_code == 0
    assert again.images_new == 2
    done = {e.key: e.sha256 for e in _events(run_dir) if isinstance(e, CompletedEvent)}
    assert set(done) - set(first) == {"r2/v0", "r2/v1"}
    assert {k: done[k] for k in first} == first
    assert sandbox.app[STATE].submissions == 6


def test_a_changed_parameter_is_refused_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 naming the changed tasks (capped, counted) and the ways on; the run
    dir is as it was."""
    job = write_job(tmp_path, refs=12, variants=PROMPTS)
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    capsys.readouterr()
    journal = (run_dir / "journal.jsonl").read_bytes()
    prints = (run_dir / PRINTS_NAME).read_bytes()
    job.write_text(job.read_text().replace("in oil", "in chalk"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "changed the parameters of 12 task(s)" in err
    assert "r0/v1, r1/v1, r10/v1" in err
    assert "(and 2 more)" in err
    assert "r0/v0" not in err
    assert "--rerun-changed" in err
    assert "--run-dir" in err
    assert (run_dir / "journal.jsonl").read_bytes() == journal
    assert (run_dir / PRINTS_NAME).read_bytes() == prints
    assert not list(run_dir.glob("*.part"))


async def test_rerun_changed_reruns_exactly_those_and_keeps_the_old_images(
    tmp_path: Path, sandbox: TestServer
) -> None:
    """--rerun-changed: the changed tasks run again; their earlier images move to
    superseded/ (bytes intact) and stay in the ledger as superseded, costs summing
    to what was spent; the next resume sees nothing changed."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    old = {e.key: e for e in _events(run_dir) if isinstance(e, CompletedEvent)}
    job.write_text(job.read_text().replace("in oil", "in chalk"))
    with pytest.raises(ConfigError, match="--rerun-changed"):
        await run_manifest(job, run_dir, settings)
    summary = await rerun(job, run_dir, settings)
    assert summary.exit_code == 0
    assert summary.images_new == 2
    assert summary.outputs_error is None  # ledger and gallery written
    assert sandbox.app[STATE].submissions == 6

    rows = read_ledger(write_ledger(run_dir))
    by_status = {(r.key, r.status): r for r in rows}
    for key in ("r0/v1", "r1/v1"):
        moved = by_status[key, "superseded"]
        assert moved.task_uuid == old[key].task_uuid
        assert moved.path is not None
        assert moved.path.startswith("superseded/")
        data = (run_dir / moved.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == old[key].sha256
        sidecar = json.loads((run_dir / moved.path).with_suffix(".json").read_text())
        assert sidecar["task_uuid"] == old[key].task_uuid
        new = by_status[key, "done"]
        assert new.task_uuid != old[key].task_uuid
        assert (run_dir / str(new.path)).is_file()
    for key in ("r0/v0", "r1/v0"):
        assert by_status[key, "done"].task_uuid == old[key].task_uuid
        assert (key, "superseded") not in by_status
    state = load_state(run_dir / "journal.jsonl")
    assert sum(r.cost_usd or Decimal(0) for r in rows) == state.spent_usd
    assert state.spent_usd == Decimal("0.48")

    again = await run_manifest(job, run_dir, settings)
    assert again.exit_code == 0
    assert again.images_new == 0


async def test_dropped_tasks_keep_their_results(
    tmp_path: Path, sandbox: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Dropping tasks that ran is refused; with --rerun-changed their results stay
    (ledger rows, images), said in a warning, and later resumes accept the shorter
    manifest; bringing them back unchanged sends nothing."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    text = job.read_text()
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    write_job(tmp_path, refs=2, variants=PROMPTS[:1])
    with pytest.raises(ConfigError, match=r"dropped 2 task\(s\).*r0/v1, r1/v1"):
        await run_manifest(job, run_dir, settings)
    assert (await rerun(job, run_dir, settings)).images_new == 0
    assert "2 task(s) left the manifest" in caplog.text
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    rows = read_ledger(write_ledger(run_dir))
    assert sorted(r.key for r in rows if r.status == "done") == [
        "r0/v0",
        "r0/v1",
        "r1/v0",
        "r1/v1",
    ]
    job.write_text(text)
    back = await run_manifest(job, run_dir, settings)
    assert (back.exit_code, back.images_new) == (0, 0)
    assert sandbox.app[STATE].submissions == 4


async def test_tasks_never_sent_may_change(tmp_path: Path, sandbox: TestServer) -> None:
    """Tasks without images (a budget stop before they were sent) have nothing to
    lose: changing them needs no flag."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    first = await run_manifest(
        job, run_dir, settings, concurrency=1, budget_usd=Decimal("0.08")
    )
    assert first.exit_code == 3
    state = load_state(run_dir / "journal.jsonl")
    assert set(state.completed_images) == {"r0/v0"}  # the budget fitted one task
    job.write_text(job.read_text().replace("in oil", "in pencil"))  # only v1
    assert set(_fingerprints(job)) == {"r0/v0", "r0/v1", "r1/v0", "r1/v1"}
    done = await run_manifest(job, run_dir, settings, budget_usd=Decimal(1))
    assert (done.exit_code, done.images_new) == (0, 3)
    prompts = {t.request.positive_prompt for t in sandbox.app[STATE].tasks.values()}
    assert prompts == {
        "a thing 0 in ink",
        "a thing 0 in pencil",
        "a thing 1 in ink",
        "a thing 1 in pencil",
    }


async def test_a_changed_task_in_flight_is_refused_even_with_the_flag(
    tmp_path: Path, sandbox: TestServer
) -> None:
    """A changed task still at the API would be lost (its answer never collected):
    refused, resume with the earlier manifest first."""
    job = write_job(tmp_path, refs=1, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    async with JournalWriter.open(run_dir / "journal.jsonl") as journal:
        await journal.append(  # r0/v1 asked again for 2 images: one still to come
            SubmittedEvent(
                key="r0/v1",
                task_uuid=str(uuid.uuid4()),
                images=2,
                estimate_usd=Decimal("0.16"),
            )
        )
    assert "r0/v1" in load_state(run_dir / "journal.jsonl").pending
    job.write_text(job.read_text().replace("in oil", "in chalk"))
    with pytest.raises(ConfigError, match=r"still in flight.*r0/v1.*earlier manifest"):
        await rerun(job, run_dir, settings)
    assert not any(isinstance(e, RerunEvent) for e in _events(run_dir))


async def test_a_rerun_journaled_before_a_crash_is_not_asked_again(
    tmp_path: Path, sandbox: TestServer
) -> None:
    """Killed after journaling the reruns, before the fingerprints were kept: the
    next run, even without the flag, knows the change was taken and runs them."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    prints = (run_dir / PRINTS_NAME).read_bytes()
    job.write_text(job.read_text().replace("in oil", "in chalk"))
    new = _fingerprints(job)
    await supersede(run_dir, {k: new[k].hex() for k in ("r0/v1", "r1/v1")})
    assert (run_dir / PRINTS_NAME).read_bytes() == prints  # the crash: not kept
    again = await run_manifest(job, run_dir, settings)
    assert (again.exit_code, again.images_new) == (0, 2)
    reruns = [e for e in _events(run_dir) if isinstance(e, RerunEvent)]
    assert sorted(e.key for e in reruns) == ["r0/v1", "r1/v1"]
    assert all(len(e.moved) == 1 for e in reruns)


async def test_a_run_dir_of_an_older_remix(tmp_path: Path, sandbox: TestServer) -> None:
    """No fingerprint file: the same manifest bytes adopt the tasks; other bytes are
    refused as before (which tasks changed cannot be known)."""
    job = write_job(tmp_path, refs=2, variants=PROMPTS)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0
    info = json.loads((run_dir / "run.json").read_text())
    del info["api"]
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / PRINTS_NAME).unlink()
    text = job.read_text()
    job.write_text(text + "# edited\n")
    with pytest.raises(ConfigError, match="older remix"):
        await run_manifest(job, run_dir, settings)
    job.write_text(text)
    again = await run_manifest(job, run_dir, settings)
    assert (again.exit_code, again.images_new) == (0, 0)
    assert (run_dir / PRINTS_NAME).is_file()
    job.write_text(text + "# edited\n")
    assert (await run_manifest(job, run_dir, settings)).exit_code == 0


def test_a_big_jobs_fingerprints_stay_small(tmp_path: Path) -> None:
    """Comparing 20k tasks holds only the stored fingerprints (~170 bytes a task):
    a 100k-task job resumes within ~17 MB."""

    def prints(changed: int) -> Iterator[tuple[str, bytes]]:
        for i in range(20_000):
            key = f"ref{i:06d}/v{i % 4}/remixStrength={i % 5 * 20}"
            yield key, hashlib.sha256(f"{key}{i < changed}".encode()).digest()[:16]

    compare_prints(tmp_path, None, prints(0)).commit()
    tracemalloc.start()
    try:
        changes = compare_prints(tmp_path, read_prints(tmp_path), prints(3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (changes.added, len(changes.changed), len(changes.removed)) == (0, 3, 0)
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MB"
