"""The library API the README shows: ``pipeline``'s exports, used as a script would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

import pipeline
from pipeline import (
    EngineOptions,
    ExitCode,
    ManifestError,
    load_job,
    run_manifest,
    run_status,
)
from tests.jobkit import base_url, fast_settings, write_job

pytestmark = pytest.mark.anyio


def test_every_export_resolves_to_its_home() -> None:
    for name in pipeline.__all__:
        value = getattr(pipeline, name)
        assert value.__name__ == name, name
        assert value.__module__.startswith("pipeline."), (name, value.__module__)


def test_import_pipeline_loads_nothing_else() -> None:
    """``python -m pipeline.sandbox`` and friends pay for what they use only."""
    code = (
        "import sys, pipeline; "
        "print(sorted(m for m in sys.modules if m.startswith('pipeline')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "['pipeline']"


async def test_run_manifest_runs_resumes_and_writes_outputs(
    tmp_path: Path, sandbox: TestServer
) -> None:
    job = write_job(tmp_path, refs=2)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    options = EngineOptions(concurrency=settings.limits.concurrency)

    summary = await run_manifest(job, run_dir, settings, options)

    assert summary.exit_code is ExitCode.OK
    assert summary.images_done == summary.images_total == load_job(job).report.images
    assert summary.outputs_error is None
    assert (run_dir / "ledger.csv").is_file()
    assert (run_dir / "gallery.html").is_file()
    assert run_status(run_dir).state == "finished"
    again = await run_manifest(job, run_dir, settings, options)
    assert again.exit_code is ExitCode.OK
    assert again.images_new == 0
    assert again.spent_this_run_usd == 0


async def test_a_ledger_that_cannot_be_written_is_a_resumable_stop(
    tmp_path: Path, sandbox: TestServer
) -> None:
    job = write_job(tmp_path, refs=1)
    settings = fast_settings(tmp_path, base_url(sandbox))
    run_dir = tmp_path / "run"
    (run_dir / "ledger.csv").mkdir(parents=True)  # a directory where the file goes
    options = EngineOptions(concurrency=4)

    summary = await run_manifest(job, run_dir, settings, options)

    assert summary.images_done == summary.images_total
    assert summary.outputs_error is not None
    assert summary.exit_code is ExitCode.STOPPED


def test_load_job_raises_every_problem(tmp_path: Path) -> None:
    job = write_job(tmp_path, refs=1, defaults={"seed": -1, "numberResults": 99})
    with pytest.raises(ManifestError) as caught:
        load_job(job)
    problems = "\n".join(caught.value.problems)
    assert "seed" in problems, problems
    assert "numberResults" in problems, problems
    assert str(job) in problems
