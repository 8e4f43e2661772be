"""Run-fatal errors (bad key, no credit, full disk): exit 3, a fix, then a resume.

Each test runs ``remix run`` in-process through ``pipeline.cli.main`` (which owns its
event loop), against a sandbox served from a blocking portal's thread, sometimes
behind a :class:`~tests.faultkit.Gate` that starts refusing once three images are on
disk. After the fatal stop: exit code 3, a message naming the cause and the fix, the
journal loads and every image written so far is intact. After the fix, the same
command finishes the job without paying for any content twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import anyio.from_thread
import pytest
from aiohttp import web
from anyio.from_thread import BlockingPortal

from pipeline import cli
from pipeline.exit_codes import ExitCode
from pipeline.journal import JOURNAL_NAME, load_state
from pipeline.sandbox import STATE, SandboxConfig, SandboxState, create_app
from tests.faultkit import (
    Gate,
    billed_digests,
    completed_count,
    error_response,
    run_facts,
    served,
    write_config,
)
from tests.jobkit import SANDBOX_KEY, write_job

TASKS, IMAGES = 18, 24
TRIP_AFTER: Final = 3
"""Images on disk before the fault starts."""
WRONG_KEY: Final = "sk-wrong-key-0123456789abcdef"


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    """An event loop in a thread for the servers; cli.main runs its own loop here."""
    with anyio.from_thread.start_blocking_portal("asyncio") as p:
        yield p


@contextlib.contextmanager
def serving(portal: BlockingPortal, app: web.Application) -> Iterator[str]:
    with portal.wrap_async_context_manager(served(app)) as url:
        yield url


class Job:
    """A small job and the ``remix run`` command line for it."""

    def __init__(self, root: Path, run_dir: Path | None = None) -> None:
        variants: list[dict[str, Any]] = [
            {"id": f"v{i}", "positivePrompt": f"style {i} {{thing}}"}
            | ({"numberResults": 2} if i % 3 == 0 else {})
            for i in range(6)
        ]
        self.manifest = write_job(root, refs=3, variants=variants)
        self.config = write_config(root / "config.toml", limits={"concurrency": 2})
        self.run_dir = run_dir or root / "run"

    def run(self, monkeypatch: pytest.MonkeyPatch, url: str, key: str) -> int:
        monkeypatch.setenv("REMIX_BASE_URL", url)
        monkeypatch.setenv("RUNWARE_API_KEY", key)
        return cli.main(
            [
                "-q",
                "run",
                str(self.manifest),
                "--run-dir",
                str(self.run_dir),
                "--config",
                str(self.config),
            ]
        )


def _sandbox() -> web.Application:
    return create_app(SandboxConfig(seed=3, latency_s=0.05, render_scale=0.05))


def _assert_intact(job: Job) -> dict[str, str]:
    """The journal loads and each journaled image is on disk, whole; path -> sha."""
    facts = run_facts(job.run_dir)
    assert not facts.mismatched, facts.mismatched
    assert not facts.corrupt, facts.corrupt
    assert not facts.parts, facts.parts
    assert len(facts.submitted_uuids) == len(set(facts.submitted_uuids))
    return {e.path: e.sha256 for e in facts.completed}


def _assert_finished(job: Job, state: SandboxState, before: dict[str, str]) -> None:
    """All done, nothing billed twice, and the images of the first run unchanged."""
    facts = run_facts(job.run_dir)
    assert (len(facts.state.done_keys), facts.state.images_done) == (TASKS, IMAGES)
    assert state.content_billed_twice == 0
    assert state.duplicate_task_uuids == 0
    assert facts.disk_digests == billed_digests(state)
    assert facts.ledger_usd == state.billed_total_usd
    assert not facts.mismatched
    assert not facts.parts
    after = {e.path: e.sha256 for e in facts.completed}
    assert {p: after.get(p) for p in before} == before


def _fatal_then_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    portal: BlockingPortal,
    *,
    refusal: Callable[[], web.Response],
    refuse_all: bool,
    message: str,
) -> None:
    """A gate refuses once TRIP_AFTER images are stored; the fix is to bypass it."""
    sandbox = _sandbox()
    job = Job(tmp_path)
    with serving(portal, sandbox) as upstream:
        gate = Gate(
            upstream=upstream,
            trip_when=lambda: completed_count(job.run_dir) >= TRIP_AFTER,
            refusal=refusal,
            refuse_all=refuse_all,
        )
        with serving(portal, gate.app()) as gated:
            assert job.run(monkeypatch, gated, SANDBOX_KEY) == ExitCode.STOPPED
        out = "".join(capsys.readouterr())
        assert gate.refused > 0
        assert re.search(message, out), out
        assert "Traceback" not in out
        before = _assert_intact(job)
        assert len(before) >= TRIP_AFTER
        assert job.run(monkeypatch, upstream, SANDBOX_KEY) == ExitCode.OK
    _assert_finished(job, sandbox[STATE], before)


def test_wrong_key_stops_with_exit_3_and_the_right_key_finishes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    portal: BlockingPortal,
) -> None:
    """401: exit 3 naming RUNWARE_API_KEY (never the key); the right key finishes."""
    sandbox = _sandbox()
    job = Job(tmp_path)
    with serving(portal, sandbox) as url:
        assert job.run(monkeypatch, url, WRONG_KEY) == ExitCode.STOPPED
        out = "".join(capsys.readouterr())
        assert "RUNWARE_API_KEY" in out, out
        assert WRONG_KEY not in out
        assert "Traceback" not in out
        assert sandbox[STATE].submissions == 0
        load_state(job.run_dir / JOURNAL_NAME)
        for path in job.run_dir.rglob("*"):
            if path.is_file():
                assert WRONG_KEY.encode() not in path.read_bytes(), path
        assert job.run(monkeypatch, url, SANDBOX_KEY) == ExitCode.OK
    _assert_finished(job, sandbox[STATE], {})


def test_key_revoked_mid_run_stops_cleanly_and_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    portal: BlockingPortal,
) -> None:
    """Every request answered 401 mid-run: exit 3, images kept; rerun finishes."""
    _fatal_then_fix(
        tmp_path,
        monkeypatch,
        capsys,
        portal,
        refusal=lambda: error_response(401, "invalidApiKey", "Invalid API key."),
        refuse_all=True,
        message="RUNWARE_API_KEY",
    )


def test_credit_running_out_stops_cleanly_and_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    portal: BlockingPortal,
) -> None:
    """402 insufficientCredits on submits: exit 3 saying top up; rerun finishes."""
    _fatal_then_fix(
        tmp_path,
        monkeypatch,
        capsys,
        portal,
        refusal=lambda: error_response(
            402, "insufficientCredits", "Insufficient credits to run this task."
        ),
        refuse_all=False,
        message=r"(?i)top up",
    )


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> None:
    """Write a ballast file until the filesystem is full."""
    chunk = b"\0" * 65536
    with contextlib.suppress(OSError), (disk / "ballast").open("wb") as fh:
        while True:
            fh.write(chunk)
            fh.flush()


DISK_FULL: Final = r"(?i)disk (is )?full"


@pytest.mark.slow
def test_disk_full_on_a_tiny_tmpfs_stops_cleanly_and_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    portal: BlockingPortal,
) -> None:
    """A real ENOSPC (tmpfs filled mid-run): exit 3 'disk full'; freed, rerun ends."""
    sandbox = _sandbox()
    with _tiny_tmpfs(tmp_path / "disk", "4m") as disk:
        job = Job(tmp_path, run_dir=disk / "run")
        with serving(portal, sandbox) as upstream:
            gate = Gate(
                upstream=upstream,
                trip_when=lambda: completed_count(job.run_dir) >= TRIP_AFTER,
                on_trip=lambda: _fill(disk),
            )
            with serving(portal, gate.app()) as gated:
                assert job.run(monkeypatch, gated, SANDBOX_KEY) == ExitCode.STOPPED
            out = "".join(capsys.readouterr())
            assert gate.tripped
            assert re.search(DISK_FULL, out), out
            assert "Traceback" not in out
            (disk / "ballast").unlink()
            before = _assert_intact(job)
            assert len(before) >= TRIP_AFTER
            assert job.run(monkeypatch, upstream, SANDBOX_KEY) == ExitCode.OK
        _assert_finished(job, sandbox[STATE], before)


def test_disk_full_on_image_write_stops_cleanly_and_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    portal: BlockingPortal,
) -> None:
    """ENOSPC renaming an image into place: exit 3 'disk is full'; rerun finishes."""
    sandbox = _sandbox()
    job = Job(tmp_path)
    real_replace = os.replace
    full = False

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        nonlocal full
        parts = Path(str(dst)).parts
        if str(src).endswith(".part") and "images" in parts and "thumbs" not in parts:
            full = full or completed_count(job.run_dir) >= TRIP_AFTER
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst, **kw)

    with serving(portal, sandbox) as url:
        monkeypatch.setattr(os, "replace", replace)
        assert job.run(monkeypatch, url, SANDBOX_KEY) == ExitCode.STOPPED
        monkeypatch.setattr(os, "replace", real_replace)
        out = "".join(capsys.readouterr())
        assert full
        assert re.search(DISK_FULL, out), out
        assert "Traceback" not in out
        before = _assert_intact(job)
        assert len(before) >= TRIP_AFTER
        assert job.run(monkeypatch, url, SANDBOX_KEY) == ExitCode.OK
    _assert_finished(job, sandbox[STATE], before)


def test_disk_full_while_writing_thumbnails_leaves_no_part_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    portal: BlockingPortal,
) -> None:
    """ENOSPC on thumbnails: the gallery degrades, but no .part file survives."""
    sandbox = _sandbox()
    job = Job(tmp_path)
    real_replace = os.replace

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        if str(src).endswith(".part") and "thumbs" in Path(str(dst)).parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst, **kw)

    with serving(portal, sandbox) as url:
        monkeypatch.setattr(os, "replace", replace)
        code = job.run(monkeypatch, url, SANDBOX_KEY)
    assert code in (ExitCode.OK, ExitCode.STOPPED)
    assert not list(job.run_dir.rglob("*.part"))
