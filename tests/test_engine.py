"""The worker pool against the sandbox: bounds, batching, resume, budget, faults."""

from __future__ import annotations

import csv
import gc
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeline import collector as collector_module
from pipeline import gc_tuning
from pipeline.errors import StorageError
from pipeline.journal import load_state, read_journal
from pipeline.journal_events import FailedEvent, LostEvent, SubmittedEvent
from pipeline.ledger import write_ledger
from pipeline.sandbox import STATE, SandboxConfig
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

VARIANTS: list[dict[str, Any]] = [
    {"id": "ink", "positivePrompt": "a {thing} drawn in ink"},
    {
        "id": "poster",
        "positivePrompt": "a {thing} as a poster",
        "providerSettings": {"ideogram": {"styleType": "DESIGN"}},
    },
]


async def test_job_completes_with_exact_costs_and_images(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Every image lands on disk, matches what was billed; the ledger sums exactly."""
    server = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.25))
    job = write_job(
        tmp_path,
        refs=3,
        variants=VARIANTS,
        matrix={"providerSettings.ideogram.remixStrength": [20, 80]},
    )
    run_dir = tmp_path / "run"
    summary = await run_manifest(
        job, run_dir, fast_settings(tmp_path, base_url(server)), concurrency=4
    )
    state = server.app[STATE]
    assert summary.exit_code == 0
    assert (summary.tasks_done, summary.images_done) == (12, 12)
    files = image_files(run_dir)
    assert len(files) == 12
    on_disk = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert on_disk == {b.sha256 for b in state.billed.values()}
    ledger = write_ledger(run_dir)
    with ledger.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(Decimal(r["cost_usd"]) for r in rows) == state.billed_total_usd
    assert summary.spent_usd == state.billed_total_usd == Decimal("0.96")
    assert state.submissions == 12
    assert state.duplicate_task_uuids == 0
    assert state.uploads == 3  # one imageUpload per distinct reference file


async def test_in_flight_never_exceeds_concurrency(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """The sandbox never sees more tasks in flight than the concurrency (a spy)."""
    server = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.1))
    variants = styles(10)
    job = write_job(tmp_path, refs=4, variants=variants)
    summary = await run_manifest(
        job, tmp_path / "run", fast_settings(tmp_path, base_url(server)), concurrency=5
    )
    state = server.app[STATE]
    assert summary.tasks_done == 40
    assert 0 < state.max_in_flight_seen <= 5
    assert 0 < summary.max_in_flight <= 5


async def test_number_results_gives_one_row_per_image(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """numberResults=3: three distinct images per task, three ledger rows."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0.05, result_stagger_s=0.05, render_scale=0.1)
    )
    job = write_job(tmp_path, refs=2, defaults={"numberResults": 3})
    run_dir = tmp_path / "run"
    summary = await run_manifest(
        job, run_dir, fast_settings(tmp_path, base_url(server))
    )
    assert (summary.tasks_done, summary.images_done) == (2, 6)
    files = image_files(run_dir)
    assert len(files) == 6
    assert {p.name for p in files} == {"image-1.png", "image-2.png", "image-3.png"}
    with write_ledger(run_dir).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert len({r["image_uuid"] for r in rows}) == 6


async def test_resume_after_cancel_never_resubmits(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A run cancelled mid-way resumes by polling: no task is submitted twice."""
    server = await make_sandbox(SandboxConfig(latency_s=0.3, render_scale=0.1))
    variants = styles(10)
    job = write_job(tmp_path, refs=3, variants=variants)
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    stopper = StopAfter(5)
    first = await run_manifest(
        job,
        run_dir,
        settings,
        concurrency=8,
        on_engine=stopper.attach,
        progress=stopper,
    )
    assert first.exit_code == 3
    assert 5 <= first.tasks_done < 30
    assert not list(run_dir.rglob("*.part"))
    pending = load_state(run_dir / "journal.jsonl").pending
    assert pending, "cancelled with tasks in flight"
    uploads_before = server.app[STATE].uploads
    second = await run_manifest(job, run_dir, settings, concurrency=8)
    state = server.app[STATE]
    assert second.exit_code == 0
    assert state.uploads == uploads_before == 3  # the journal remembers uploads
    assert second.resumed == sum(len(v) for v in pending.values())
    assert state.submissions == 30
    assert state.duplicate_task_uuids == 0
    assert state.content_billed_twice == 0
    assert len(image_files(run_dir)) == 30
    assert load_state(run_dir / "journal.jsonl").spent_usd == state.billed_total_usd


async def test_budget_cap_stops_submitting_and_resumes(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """The budget is a hard cap: spend stays under it; a higher cap finishes the job."""
    server = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.1))
    variants = styles(5)
    job = write_job(tmp_path, refs=2, variants=variants)
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    first = await run_manifest(
        job, run_dir, settings, concurrency=3, budget_usd=Decimal("0.40")
    )
    state = server.app[STATE]
    assert first.exit_code == 3
    assert first.stop_reason == "budget"
    assert state.billed_total_usd <= Decimal("0.40")
    assert first.spent_usd == state.billed_total_usd
    second = await run_manifest(
        job, run_dir, settings, concurrency=3, budget_usd=Decimal("1.00")
    )
    assert second.exit_code == 0
    assert state.billed_total_usd == Decimal("0.80")
    assert state.content_billed_twice == 0


async def test_dropped_submits_are_resolved_not_paid_twice(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Submits whose answer was lost are polled first; nothing is billed twice."""
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0.05,
            render_scale=0.1,
            drop_after_accept_rate=0.5,
            fault_task_types=frozenset({"imageInference"}),
        )
    )
    variants = styles(8)
    job = write_job(tmp_path, refs=2, variants=variants)
    summary = await run_manifest(
        job, tmp_path / "run", fast_settings(tmp_path, base_url(server)), concurrency=4
    )
    state = server.app[STATE]
    assert summary.tasks_done == 16
    assert state.content_billed_twice == 0
    assert state.duplicate_task_uuids == 0
    assert summary.resubmitted == 0  # every dropped task was found by polling
    assert len(state.billed) == 16


async def test_rate_limited_submits_recover(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """429s with Retry-After on submits: the tasks are ambiguous, and unknown to the
    API after the grace they go again under the SAME taskUUIDs (accepted then, once);
    no task gets a second taskUUID."""
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0.05,
            render_scale=0.1,
            rate_limit_rate=0.4,
            retry_after_s=0.05,
            fault_task_types=frozenset({"imageInference"}),
        )
    )
    variants = styles(6)
    job = write_job(tmp_path, refs=2, variants=variants)
    run_dir = tmp_path / "run"
    summary = await run_manifest(
        job, run_dir, fast_settings(tmp_path, base_url(server)), concurrency=4
    )
    state = server.app[STATE]
    assert summary.tasks_done == 12
    assert summary.resent > 0
    assert summary.resubmitted == 0
    events = list(read_journal(run_dir / "journal.jsonl"))
    assert not [e for e in events if isinstance(e, LostEvent)]
    submitted = [e.task_uuid for e in events if isinstance(e, SubmittedEvent)]
    assert len(submitted) == len(set(submitted)) == 12
    assert state.content_billed_twice == 0
    assert state.duplicate_task_uuids == 0  # a 429 accepted nothing
    assert len(state.billed) == 12


async def test_task_failures_are_recorded_and_retried_on_request(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A task failure is journaled with its code; --retry-failed sends it again."""
    failing = await make_sandbox(
        SandboxConfig(latency_s=0.02, render_scale=0.1, task_fail_rate=1.0)
    )
    job = write_job(tmp_path, refs=2)
    run_dir = tmp_path / "run"
    first = await run_manifest(job, run_dir, fast_settings(tmp_path, base_url(failing)))
    assert first.exit_code == 1
    assert first.tasks_failed == 2
    failed = [
        e for e in read_journal(run_dir / "journal.jsonl") if isinstance(e, FailedEvent)
    ]
    assert {e.code for e in failed} == {"inferenceError"}
    healthy = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    settings = fast_settings(tmp_path, base_url(healthy))
    skipped = await run_manifest(job, run_dir, settings)
    assert skipped.exit_code == 1
    assert skipped.tasks_skipped_failed == 2
    assert healthy.app[STATE].submissions == 0
    retried = await run_manifest(job, run_dir, settings, retry_failed=True)
    assert retried.exit_code == 0
    assert retried.tasks_done == 2


async def test_poll_deadline_leaves_task_resumable(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A task past the poll deadline is left for a rerun, which polls, not pays."""
    server = await make_sandbox(SandboxConfig(latency_s=1.0, render_scale=0.1))
    job = write_job(tmp_path, refs=1)
    run_dir = tmp_path / "run"
    hasty = fast_settings(tmp_path, base_url(server), poll={"deadline_s": 0.2})
    first = await run_manifest(job, run_dir, hasty)
    assert first.exit_code == 3
    assert first.tasks_unfinished == 1
    patient = fast_settings(tmp_path, base_url(server))
    second = await run_manifest(job, run_dir, patient)
    assert second.exit_code == 0
    assert server.app[STATE].submissions == 1


async def test_bad_key_stops_the_run_resumably(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """A rejected key is run-fatal: exit 3, a RUNWARE_API_KEY hint, no key shown."""
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    job = write_job(tmp_path, refs=2)
    run_dir = tmp_path / "run"
    wrong = "sk-wrong-key-123456"
    summary = await run_manifest(
        job, run_dir, fast_settings(tmp_path, base_url(server), key=wrong)
    )
    assert summary.exit_code == 3
    assert summary.stop_reason == "auth"
    assert "RUNWARE_API_KEY" in (summary.stop_message or "")
    assert wrong not in (summary.stop_message or "")
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert wrong.encode() not in path.read_bytes()
    fixed = await run_manifest(job, run_dir, fast_settings(tmp_path, base_url(server)))
    assert fixed.exit_code == 0
    assert fixed.tasks_done == 2


async def test_unreachable_api_stops_resumably(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """An API that cannot be reached stops the run (exit 3); a rerun finishes it."""
    job = write_job(tmp_path, refs=2)
    run_dir = tmp_path / "run"
    dead = fast_settings(tmp_path, "http://127.0.0.1:9/v1")
    first = await run_manifest(job, run_dir, dead)
    assert first.exit_code == 3
    assert first.stop_reason == "api"
    assert "rerun to resume" in (first.stop_message or "")
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.1))
    second = await run_manifest(job, run_dir, fast_settings(tmp_path, base_url(server)))
    assert second.exit_code == 0
    assert second.tasks_done == 2


async def test_queue_full_answers_lower_concurrency_and_recover(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """429s from a full queue: the pool backs off (AIMD) and still finishes."""
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0.05, render_scale=0.1, max_in_flight=6, retry_after_s=0.05
        )
    )
    job = write_job(tmp_path, refs=4, variants=styles(6))
    summary = await run_manifest(
        job, tmp_path / "run", fast_settings(tmp_path, base_url(server)), concurrency=16
    )
    state = server.app[STATE]
    assert summary.tasks_done == 24
    assert state.max_in_flight_seen <= 6
    assert summary.adaptive_floor < 16  # concurrency was lowered at least once
    assert state.content_billed_twice == 0


async def test_polls_failing_for_the_outage_window_stop_the_run(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Every getResponse answering 5xx: the run stops (exit 3), tasks stay pending."""
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0.02,
            render_scale=0.1,
            server_error_rate=1.0,
            fault_task_types=frozenset({"getResponse"}),
        )
    )
    job = write_job(tmp_path, refs=2)
    run_dir = tmp_path / "run"
    settings = fast_settings(
        tmp_path, base_url(server), poll={"outage_s": 0.3}, retry={"attempts": 2}
    )
    with anyio.fail_after(30):
        summary = await run_manifest(job, run_dir, settings)
    assert summary.exit_code == 3
    assert summary.stop_reason == "api"
    assert "every poll failed" in (summary.stop_message or "")
    assert len(load_state(run_dir / "journal.jsonl").pending) == 2


@asynccontextmanager
async def api_in_front_of(
    upstream: str,
    *,
    ask: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = lambda t: t,
    answer: Callable[[list[dict[str, Any]], bytes, int], bytes] = lambda t, b, s: b,
) -> AsyncIterator[str]:
    """A stand-in API that forwards to the sandbox, changing what it asks or answers
    (for API behaviours the protocol leaves open); yields its base URL."""
    async with aiohttp.ClientSession() as session:

        async def forward(request: web.Request) -> web.Response:
            tasks = await request.json()
            auth = {"Authorization": request.headers.get("Authorization", "")}
            async with session.post(upstream, json=ask(tasks), headers=auth) as resp:
                body, status = await resp.read(), resp.status
            return web.Response(
                body=answer(tasks, body, status),
                status=status,
                content_type="application/json",
            )

        app = web.Application()
        app.router.add_post("/v1", forward)
        front = TestServer(app)
        async with front:
            yield str(front.make_url("/v1"))


def first_poll_only(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    polls = all(t.get("taskType") == "getResponse" for t in tasks)
    return tasks[:1] if len(tasks) > 1 and polls else tasks


def bare_ack(tasks: list[dict[str, Any]], body: bytes, status: int) -> bytes:
    submit = tasks[0].get("taskType") == "imageInference"
    return b'{"data": []}' if status == 200 and submit else body


async def test_api_answering_only_the_first_poll_of_a_batch_is_polled_singly(
    tmp_path: Path, make_sandbox: SandboxFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Batched getResponse is undocumented: if only the first is answered, unbatch."""
    server = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.1))
    job = write_job(tmp_path, refs=3, variants=styles(4))
    async with api_in_front_of(base_url(server), ask=first_poll_only) as url:
        with anyio.fail_after(60):
            summary = await run_manifest(
                job, tmp_path / "run", fast_settings(tmp_path, url), concurrency=8
            )
    assert summary.exit_code == 0
    assert summary.tasks_done == 12
    assert server.app[STATE].content_billed_twice == 0
    # Without the fallback this still ends, one task per poll round; with 64 tasks
    # in flight and real latencies it would crawl, so the switch itself is checked.
    assert "answers only the first task of a getResponse" in caplog.text


async def test_api_acking_with_empty_data_is_resolved_by_polling(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """An async ack of `{"data": []}` (the ack body is undocumented): tasks are
    found by polling, none is sent twice."""
    server = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.1))
    job = write_job(tmp_path, refs=3, variants=styles(4))
    async with api_in_front_of(base_url(server), answer=bare_ack) as url:
        summary = await run_manifest(
            job, tmp_path / "run", fast_settings(tmp_path, url)
        )
    state = server.app[STATE]
    assert summary.exit_code == 0
    assert summary.tasks_done == 12
    assert summary.resubmitted == 0
    assert state.submissions == 12
    assert state.content_billed_twice == 0


async def test_a_slot_is_freed_when_the_api_is_done_not_when_the_image_is_saved(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Slow downloads do not hold concurrency: the API stays busy meanwhile.

    Concurrency bounds tasks in flight *at the API*. Were a slot held until the
    image is on disk, only 2 tasks could be sent before the first (1.5 s) download
    ends; as it is, all 8 are sent, and the API never has more than 2 at once.
    """
    server = await make_sandbox(
        SandboxConfig(latency_s=0.02, slow_download_s=1.5, render_scale=0.1)
    )
    state = server.app[STATE]
    job = write_job(tmp_path, refs=4, variants=VARIANTS)
    sent_before_first_download: list[int] = []

    async def watch() -> None:
        # The sandbox's counters have no event to wait on: look every 2 ms.
        while state.downloads == 0:  # noqa: ASYNC110
            await anyio.sleep(0.002)
        sent_before_first_download.append(state.submissions)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        summary = await run_manifest(
            job,
            tmp_path / "run",
            fast_settings(tmp_path, base_url(server)),
            concurrency=2,
        )
    assert summary.exit_code == 0
    assert summary.images_done == 8
    assert sent_before_first_download == [8]
    assert state.max_in_flight_seen <= 2
    assert summary.max_in_flight == 2


async def test_new_references_upload_ahead_of_the_tasks_that_need_them(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    """Uploads of different references overlap, so one slow upload stalls nothing."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0.02, upload_latency_s=0.2, render_scale=0.1)
    )
    job = write_job(tmp_path, refs=6, variants=VARIANTS[:1])
    summary = await run_manifest(
        job,
        tmp_path / "run",
        fast_settings(tmp_path, base_url(server)),
        concurrency=8,
    )
    state = server.app[STATE]
    assert summary.exit_code == 0
    assert state.uploads == summary.uploads == 6  # still one upload per file
    assert state.max_concurrent_uploads >= 2


@pytest.mark.parametrize("hard", [False, True], ids=["drain", "stop-now"])
async def test_a_stop_leaves_no_journaled_task_that_was_never_sent(
    tmp_path: Path, make_sandbox: SandboxFactory, hard: bool
) -> None:
    """Tasks journaled ahead of their submit but not sent by a stop are marked lost.

    The rerun then sends them at once instead of asking the API about them first.
    After a drain nothing is left pending; after a stop at once, only tasks the API
    had received are (the rerun asks about those).
    """
    server = await make_sandbox(SandboxConfig(latency_s=0.2, render_scale=0.1))
    job = write_job(tmp_path, refs=10, variants=styles(10))
    settings = fast_settings(tmp_path, base_url(server))
    run_dir = tmp_path / "run"
    stopper = StopAfter(3, hard=hard)
    first = await run_manifest(
        job,
        run_dir,
        settings,
        concurrency=4,
        on_engine=stopper.attach,
        progress=stopper,
    )
    state = server.app[STATE]
    assert first.exit_code == 3
    assert first.tasks_unsubmitted > 0
    events = list(read_journal(run_dir / "journal.jsonl"))
    lost = [e for e in events if isinstance(e, LostEvent)]
    assert lost, "tasks were journaled ahead of the stop"
    assert not {e.task_uuid for e in lost} & set(state.tasks)  # never sent
    pending = load_state(run_dir / "journal.jsonl").pending
    if not hard:
        assert not pending
    # Pending = sent and not yet stored (in flight, or done and downloading): a
    # journaled task that never went out is never among them.
    assert {e.task_uuid for v in pending.values() for e in v} <= set(state.tasks)
    second = await run_manifest(job, run_dir, settings, concurrency=4)
    assert second.exit_code == 0
    assert second.resumed == sum(len(v) for v in pending.values())
    assert state.submissions == 100
    assert state.duplicate_task_uuids == 0
    assert state.content_billed_twice == 0
    assert len(image_files(run_dir)) == 100


async def test_a_failing_write_with_downloads_queued_stops_with_that_error_alone(
    tmp_path: Path, make_sandbox: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while finished downloads wait for the writer: the run stops
    with the storage error (exit 3, resumable), not with a stray error from the
    stages feeding the writer (found as a flaky disk-full test; a traceback and
    exit 1 before)."""
    server = await make_sandbox(SandboxConfig(latency_s=0.05, render_scale=0.05))
    job = write_job(tmp_path, refs=13, variants=styles(20))  # 260 tasks at once

    async def disk_full(files: object) -> list[str]:
        await anyio.sleep(0.3)  # meanwhile the download queue and its buffer fill
        raise StorageError("cannot write image: the disk is full")

    monkeypatch.setattr(collector_module, "write_atomic_many", disk_full)
    summary = await run_manifest(
        job,
        tmp_path / "run",
        fast_settings(tmp_path, base_url(server)),
        concurrency=260,
    )
    assert summary.stop_reason == "storage"
    assert summary.stop_message is not None
    assert "disk is full" in summary.stop_message
    assert summary.exit_code == 3


def test_the_sparing_collector_restores_the_threshold_after_overlaps() -> None:
    """Two runs in one process may start and end in any order: the threshold stays
    raised until the last ends, then is what it was, also after an error."""
    before = gc.get_threshold()
    first = gc_tuning.sparing_collector()
    second = gc_tuning.sparing_collector()
    first.__enter__()
    assert gc.get_threshold()[0] >= 10_000
    assert gc.get_threshold()[1:] == before[1:]
    second.__enter__()
    first.__exit__(None, None, None)  # the first ends before the second
    assert gc.get_threshold()[0] >= 10_000
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), gc_tuning.sparing_collector():
        raise RuntimeError("boom")
    assert gc.get_threshold() == before


async def test_a_run_collects_garbage_sparingly_and_restores_the_collector(
    tmp_path: Path, make_sandbox: SandboxFactory
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0.2, render_scale=0.05))
    job = write_job(tmp_path, refs=4)
    before = gc.get_threshold()
    seen: list[int] = []
    done = anyio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.append(gc.get_threshold()[0])
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        summary = await run_manifest(
            job, tmp_path / "run", fast_settings(tmp_path, base_url(server))
        )
        done.set()
    assert summary.exit_code == 0
    assert max(seen) >= 10_000
    assert gc.get_threshold() == before
