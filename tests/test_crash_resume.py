"""``remix run`` SIGKILLed at seeded random moments, restarted each time, then finished.

The sandbox runs in this process (so its counters are exact) on a real port; each run
is a ``python -m pipeline run`` subprocess. Kills land right after new ``submitted``
journal lines, while images are being written (a new image file or a ``.part`` file
appears), at random times, and, through ``python -m tests.faultkit``, exactly at an
image's rename into place (before or after it). After the last, unkilled run: every
task done, images on disk = images billed, nothing submitted or billed twice, ledger
= billed total, and no ``.part`` file or undecodable image survives.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import pytest

from pipeline.journal import JOURNAL_NAME, read_journal
from pipeline.journal_events import LostEvent
from pipeline.sandbox import STATE, SandboxConfig, SandboxState, create_app
from tests.faultkit import (
    CRASH_ENV,
    billed_digests,
    image_files,
    part_files,
    run_facts,
    served,
    write_config,
)
from tests.jobkit import SANDBOX_KEY, styles, write_job

SEED: Final = 20_260_507
REPO: Final = Path(__file__).resolve().parents[1]
KINDS: Final = (
    "submitted",
    "image",
    "time",
    "submitted",
    "replace-before",
    "image",
    "submitted",
    "time",
    "replace-after",
    "image",
    "submitted",
    "image",
)
"""One kill attempt per entry, in this order (parameters drawn from SEED)."""
TASKS, IMAGES = 60, 80


@dataclass(frozen=True)
class Kill:
    kind: str
    count: int
    """New submitted lines / new images / image renames to wait for."""
    delay_s: float
    """For ``time``: seconds after start; otherwise a delay after the trigger."""


def _schedule(rng: random.Random) -> list[Kill]:
    kills = []
    for kind in KINDS:
        match kind:
            case "submitted":
                kills.append(Kill(kind, rng.randint(1, 6), rng.choice((0.0, 0.003))))
            case "image":
                kills.append(Kill(kind, rng.randint(1, 4), 0.0))
            case "time":
                kills.append(Kill(kind, 0, rng.uniform(0.8, 1.6)))
            case _:
                kills.append(Kill(kind, rng.randint(1, 6), 0.0))
    return kills


def _submitted_lines(run_dir: Path) -> int:
    try:
        return (run_dir / JOURNAL_NAME).read_bytes().count(b'"event":"submitted"')
    except FileNotFoundError:
        return 0


def _image_count(run_dir: Path) -> int:
    return len(image_files(run_dir)) if (run_dir / "images").is_dir() else 0


def _sent(state: SandboxState) -> int:
    """imageInference tasks the API has received."""
    return state.requests["imageInference"]


@dataclass(frozen=True)
class _Before:
    """The run dir (and the API) when a run starts: kills count what is new since."""

    submitted: int
    images: int
    parts: frozenset[Path]
    state: SandboxState
    sent: int

    @classmethod
    def of(cls, run_dir: Path, state: SandboxState) -> _Before:
        parts = frozenset(part_files(run_dir)) if run_dir.is_dir() else frozenset()
        return cls(
            _submitted_lines(run_dir), _image_count(run_dir), parts, state, _sent(state)
        )


def _fired(kill: Kill, run_dir: Path, started: float, before: _Before) -> bool:
    match kill.kind:
        case "submitted":
            # New submits: journaled afresh, or sent again under their taskUUIDs.
            return (
                _submitted_lines(run_dir) - before.submitted >= kill.count
                or _sent(before.state) - before.sent >= kill.count
            )
        case "image":
            if (run_dir / "images").is_dir() and any(
                p not in before.parts for p in part_files(run_dir / "images")
            ):
                return True  # a write in progress
            return _image_count(run_dir) - before.images >= kill.count
        case "time":
            return time.monotonic() - started >= kill.delay_s
        case _:
            return False  # the process kills itself


async def _run_once(
    cmd: list[str],
    env: dict[str, str],
    run_dir: Path,
    kill: Kill | None,
    log: Path,
    state: SandboxState,
) -> int:
    """One ``remix run``; SIGKILLed when ``kill`` fires. Returns the exit status."""
    if kill is not None and kill.kind.startswith("replace-"):
        env = {**env, CRASH_ENV: f"{kill.kind.removeprefix('replace-')}:{kill.count}"}
        cmd = [sys.executable, "-m", "tests.faultkit", *cmd[3:]]
    before = _Before.of(run_dir, state)
    with log.open("ab") as out, anyio.fail_after(60):
        process = await anyio.open_process(
            cmd, env=env, cwd=REPO, stdout=out, stderr=out
        )
        async with process:
            started = time.monotonic()
            while process.returncode is None:
                if kill is not None and _fired(kill, run_dir, started, before):
                    if kill.delay_s and kill.kind != "time":
                        await anyio.sleep(kill.delay_s)
                    process.send_signal(signal.SIGKILL)
                    break
                await anyio.sleep(0.002)
            return await process.wait()


def _remix_run(
    tmp_path: Path, url: str
) -> tuple[list[str], dict[str, str], Path, Path]:
    """The 60-task job at concurrency 4 as a ``remix run`` subprocess against
    ``url``: its command, environment, run dir and log."""
    job = write_job(tmp_path, refs=5, variants=styles(12, pairs_every=3))
    config = write_config(tmp_path / "config.toml", limits={"concurrency": 4})
    run_dir = tmp_path / "run"
    env = {
        **{k: v for k, v in os.environ.items() if k != CRASH_ENV},
        "REMIX_BASE_URL": url,
        "RUNWARE_API_KEY": SANDBOX_KEY,
    }
    cmd = [sys.executable, "-m", "pipeline", "-q", "run", str(job)]
    cmd += ["--run-dir", str(run_dir), "--config", str(config)]
    return cmd, env, run_dir, tmp_path / "runs.log"


@pytest.mark.slow
async def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    """≥10 SIGKILLs (after submits, mid-write, at renames): all done, all paid once."""
    rng = random.Random(SEED)
    app = create_app(
        SandboxConfig(seed=SEED, latency_s=0.3, latency_jitter_s=0.2, render_scale=0.1)
    )
    async with served(app) as url:
        cmd, env, run_dir, log = _remix_run(tmp_path, url)
        killed: list[str] = []
        for kill in _schedule(rng):
            status = await _run_once(cmd, env, run_dir, kill, log, app[STATE])
            if status == 0:
                break  # finished before this kill fired
            assert status == -signal.SIGKILL, log.read_text()[-3000:]
            killed.append(kill.kind)
        final = await _run_once(cmd, env, run_dir, None, log, app[STATE])
    state = app[STATE]
    assert final == 0, log.read_text()[-3000:]
    assert len(killed) >= 10, killed
    assert {"submitted", "image", "replace-before", "replace-after"} <= set(killed)
    facts = run_facts(run_dir)
    assert (len(facts.state.done_keys), facts.state.images_done) == (TASKS, IMAGES)
    assert not facts.state.pending
    assert len(facts.submitted_uuids) == len(set(facts.submitted_uuids))
    assert state.duplicate_task_uuids == 0
    assert state.content_billed_twice == 0
    assert facts.disk_digests == billed_digests(state)
    assert facts.ledger_usd == facts.state.spent_usd == state.billed_total_usd
    assert not facts.mismatched
    assert not facts.parts
    assert not facts.corrupt


@pytest.mark.slow
@pytest.mark.parametrize("unknown_task", ["taskNotFound", "silent", "processing"])
async def test_sigkill_with_tasks_journaled_then_resume_sends_the_same_uuids(
    tmp_path: Path, unknown_task: str
) -> None:
    """Killed just after tasks were journaled as sent (some sent, most not): the
    rerun settles each by its own taskUUID, whatever getResponse says of unknown
    tasks: every journaled taskUUID is the one the API accepted, none is replaced
    by a new one or marked lost, nothing is paid twice."""
    app = create_app(
        SandboxConfig(
            seed=SEED,
            latency_s=0.3,
            render_scale=0.1,
            unknown_task=unknown_task,  # type: ignore[arg-type]
        )
    )
    state = app[STATE]
    async with served(app) as url:
        cmd, env, run_dir, log = _remix_run(tmp_path, url)
        kill = Kill("submitted", 1, 0.0)
        assert await _run_once(cmd, env, run_dir, kill, log, state) == -signal.SIGKILL
        journaled = _submitted_lines(run_dir)
        sent_before = _sent(state)
        assert journaled > sent_before, "nothing was left journaled but unsent"
        final = await _run_once(cmd, env, run_dir, None, log, state)
    assert final == 0, log.read_text()[-3000:]
    facts = run_facts(run_dir)
    assert (len(facts.state.done_keys), facts.state.images_done) == (TASKS, IMAGES)
    events = list(read_journal(run_dir / JOURNAL_NAME))
    assert not [e for e in events if isinstance(e, LostEvent)]
    assert len(facts.submitted_uuids) == len(set(facts.submitted_uuids)) == TASKS
    assert {u.lower() for u in facts.submitted_uuids} == set(state.tasks)
    assert state.content_billed_twice == 0
    assert facts.disk_digests == billed_digests(state)
    assert facts.ledger_usd == state.billed_total_usd
