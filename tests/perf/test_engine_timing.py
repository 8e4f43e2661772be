"""Timing and request-count goals of the engine against the sandbox (marker ``perf``).

Not part of the default run (``pytest -m perf`` runs them; ``.ci/run`` on a line of
its own): they assert how soon a finished task is seen (wall-clock turnarounds) and
how few requests a job takes (ceilings measured on a quiet machine), which a loaded
machine can miss without anything being wrong. Correctness (every image stored,
nothing paid twice) is asserted in ``tests/test_engine.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from pipeline.journal import read_journal
from pipeline.journal_events import CompletedEvent
from pipeline.sandbox import STATE, SandboxConfig
from tests.conftest import SandboxFactory
from tests.jobkit import base_url, fast_settings, run_manifest, styles, write_job

pytestmark = pytest.mark.perf


async def test_requests_per_image_well_below_one(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Batched submits and polls need far fewer API requests than images."""
    server = await make_sandbox(SandboxConfig(latency_s=0.2, render_scale=0.1))
    variants = styles(20)
    job = write_job(tmp_path, refs=5, variants=variants)
    summary = await run_manifest(
        job, tmp_path / "run", fast_settings(tmp_path, base_url(server)), concurrency=50
    )
    state = server.app[STATE]
    assert summary.tasks_done == 100
    api_calls = state.http_requests
    assert api_calls / 100 < 0.5, f"{api_calls} requests for 100 images"


async def test_before_the_latency_is_known_a_task_is_seen_soon_after_done(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """With the shipped poll settings and a 2.3 s API, a first round that other
    tasks wait behind is asked again within 2% of each task's age: seen a few tens
    of ms after done, not after a gap grown 1.5x from 10 ms (asked at 2.21 s, then
    3.08 s: 0.8 s late)."""
    latency = 2.3
    server = await make_sandbox(SandboxConfig(latency_s=latency, render_scale=0.05))
    job = write_job(tmp_path, refs=5)  # 4 at once, the 5th waits for a slot
    settings = fast_settings(tmp_path, base_url(server), poll=SHIPPED_POLL)
    summary = await run_manifest(job, tmp_path / "run", settings, concurrency=4)
    assert summary.exit_code == 0
    turnarounds = _turnarounds(tmp_path / "run")
    assert len(turnarounds) == 5
    for turnaround in turnarounds[:4]:  # the first round, in order of submit
        assert latency <= turnaround <= latency + FINE_LAG_S


async def test_a_job_in_one_round_is_asked_about_sparingly(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """No task waits for a slot, so seeing a result sooner frees nothing: re-asks
    come within 10% of a task's age, not 2% (same 2.3 s API: 21 polls measured,
    72 at 2%, for results seen ~0.17 s after done)."""
    latency = 2.3
    server = await make_sandbox(SandboxConfig(latency_s=latency, render_scale=0.05))
    job = write_job(tmp_path, refs=4)
    settings = fast_settings(tmp_path, base_url(server), poll=SHIPPED_POLL)
    summary = await run_manifest(job, tmp_path / "run", settings, concurrency=4)
    assert summary.exit_code == 0
    assert summary.poll_requests <= 30
    turnarounds = _turnarounds(tmp_path / "run")
    assert len(turnarounds) == 4
    for turnaround in turnarounds:
        assert latency <= turnaround <= 1.1 * latency + FINE_LAG_S


async def test_before_anything_finishes_one_request_asks_for_the_first_round(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A first round wider than a getResponse batch: until one task is done, only
    the earliest batch is asked about (the rest are in the same state), then the
    rest are asked at once. With batches of 4 and a round of 12 that is ~1 request
    per question, not 3, and no task is seen later for it."""
    latency = 1.2
    server = await make_sandbox(SandboxConfig(latency_s=latency, render_scale=0.05))
    job = write_job(tmp_path, refs=16)  # 12 at once, 4 wait for slots
    settings = fast_settings(
        tmp_path, base_url(server), poll=SHIPPED_POLL, limits={"poll_batch": 4}
    )
    summary = await run_manifest(job, tmp_path / "run", settings, concurrency=12)
    assert summary.exit_code == 0
    assert summary.images_new == 16
    # Every 2% of its age from 0.5 s to 1.2 s is ~45 questions: ~135 requests in
    # batches of 4 for all 12, ~50 with the earliest 4 standing for the rest.
    assert summary.poll_requests <= 80
    turnarounds = _turnarounds(tmp_path / "run")
    for turnaround in turnarounds[:12]:  # the first round, in order of submit
        assert latency <= turnaround <= latency + FINE_LAG_S


async def test_a_varying_latency_is_asked_about_in_shared_requests(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """With latencies of 0.4-0.8 s, slots free and tasks go out a few at a time, so
    each task's questions keep a clock of their own. A question going out anyway
    carries the tasks about due (the poller's riders): fewer requests, and no task seen
    later for it. 96 tasks at C = 48: 49-54 polls measured, 76-82 with no riders
    (the slowest task's turnaround 0.82-0.86 s both ways)."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0.4, latency_jitter_s=0.4, render_scale=0.05)
    )
    job = write_job(tmp_path, refs=12, variants=styles(8))  # 96 tasks
    settings = fast_settings(tmp_path, base_url(server), poll=SHIPPED_POLL)
    summary = await run_manifest(job, tmp_path / "run", settings, concurrency=48)
    assert summary.exit_code == 0
    assert summary.images_new == 96
    state = server.app[STATE]
    assert state.submissions == 96
    assert state.duplicate_task_uuids == 0
    assert summary.poll_requests <= 66
    assert max(_turnarounds(tmp_path / "run")) <= 0.8 + FINE_LAG_S


SHIPPED_POLL: Final = {
    "interval_s": 0.5,
    "min_interval_s": 0.01,
    "max_interval_s": 10.0,
}
FINE_LAG_S: Final = 0.15
"""Room for the 2% re-ask gap (<= 46 ms at 2.3 s) and the test machine's delays."""


def _turnarounds(run_dir: Path) -> list[float]:
    """Seconds from submit to completion of each image, in order of submit."""
    spans = []
    for event in read_journal(run_dir / "journal.jsonl"):
        if isinstance(event, CompletedEvent):
            assert event.submitted_at is not None
            spans.append((event.submitted_at, event.ts - event.submitted_at))
    return [span.total_seconds() for _, span in sorted(spans)]


async def test_the_latency_estimate_settles_on_the_api_latency(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """The engine feeds the latency estimate real timings: it lands near the API's
    latency, and the first questions it times do not flood the API (its arithmetic
    over long runs is tested in test_latency_estimate.py)."""
    server = await make_sandbox(SandboxConfig(latency_s=0.3, render_scale=0.05))
    job = write_job(tmp_path, refs=6, variants=styles(8))  # 48 tasks, 6 rounds of 8
    summary = await run_manifest(
        job,
        tmp_path / "run",
        fast_settings(tmp_path, base_url(server)),
        concurrency=8,
    )
    assert summary.exit_code == 0
    assert summary.latency_s is not None
    assert 0.27 <= summary.latency_s <= 0.36
    # Observed: 43-54 (small submits make small cohorts; ~11 of them re-ask the
    # first round within 2% of its age, before anything is learnt: 33-38 at 5%). An
    # estimate stuck near 0 would re-ask every ~5 ms, ~55 times per cohort (~330).
    assert summary.poll_requests <= 72
