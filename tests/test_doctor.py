"""``remix doctor`` against the sandbox over real sockets, in every dialect it reads.

The doctor asks getResponse about random taskUUIDs only, so nothing is submitted or
billed (unless ``--spend-one``), and writes its findings where ``remix run`` looks
(``REMIX_CACHE_DIR`` points at the test's tmp_path).
"""

from __future__ import annotations

import json
import socket
from decimal import Decimal
from pathlib import Path
from typing import get_args

import anyio.to_thread
import pytest
from aiohttp.test_utils import TestServer

from pipeline.cli import main
from pipeline.cli.doctor import render_table
from pipeline.config import load_settings
from pipeline.dialect import (
    Dialect,
    PollMode,
    UnknownTask,
    cache_path,
    load_dialect,
)
from pipeline.doctor import examine
from pipeline.sandbox import STATE, SandboxConfig
from pipeline.sandbox.answers import PollBatch
from pipeline.sandbox.answers import UnknownTask as SandboxUnknownTask
from tests.conftest import SandboxFactory
from tests.jobkit import base_url, fast_settings

BAD_KEY = "not-the-key-0f9e8d7c6b5a"

UNKNOWN_TASK: tuple[SandboxUnknownTask, ...] = get_args(SandboxUnknownTask)
POLL_BATCH: tuple[PollBatch, ...] = get_args(PollBatch)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real key or URL from the environment; the cache under tmp_path."""
    monkeypatch.delenv("RUNWARE_API_KEY", raising=False)
    monkeypatch.delenv("REMIX_BASE_URL", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("REMIX_CACHE_DIR", str(cache))
    return cache


def expected(unknown_task: str, poll_batch: str) -> tuple[UnknownTask, PollMode]:
    unknown = {
        "silent": UnknownTask.SILENT,
        "processing": UnknownTask.PROCESSING,
    }.get(unknown_task, UnknownTask.NOT_FOUND)
    if poll_batch == "reject":
        mode = PollMode.SINGLE
    elif unknown is UnknownTask.SILENT:
        mode = PollMode.UNKNOWN  # nothing answered either way: cannot tell
    elif poll_batch == "all":
        mode = PollMode.BATCHED
    else:
        mode = PollMode.SINGLE
    return unknown, mode


def assert_spent_nothing(server: TestServer) -> None:
    state = server.app[STATE]
    assert state.submissions == 0
    assert state.billed == {}
    assert state.requests["imageInference"] == 0
    assert state.uploads == 0


def images_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.json")) if cache.exists() else []


@pytest.mark.parametrize("poll_batch", POLL_BATCH)
@pytest.mark.parametrize("unknown_task", UNKNOWN_TASK)
async def test_doctor_reads_each_dialect(
    make_sandbox: SandboxFactory,
    tmp_path: Path,
    cache_dir: Path,
    unknown_task: SandboxUnknownTask,
    poll_batch: PollBatch,
) -> None:
    """Each (unknown_task, poll_batch) dialect is recorded as what it is, from
    getResponse requests only, and cached where `remix run` looks."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0, unknown_task=unknown_task, poll_batch=poll_batch)
    )
    url = base_url(server)
    findings = await examine(fast_settings(tmp_path, url))

    unknown, mode = expected(unknown_task, poll_batch)
    assert findings.exit_code == 0, render_table(findings)
    assert findings.usable
    dialect = findings.dialect
    assert dialect is not None
    assert dialect.unknown_task is unknown
    assert dialect.unknown_task_code == (
        unknown_task if unknown is UnknownTask.NOT_FOUND else None
    )
    assert dialect.poll_mode is mode
    assert dialect.source == "doctor"
    assert dialect.checked_at is not None

    state = server.app[STATE]
    assert_spent_nothing(server)
    assert state.http_requests == 3  # key/unknown task, batch, one more round trip
    assert findings.round_trip is not None
    assert findings.round_trip.samples == 3

    path = cache_path(url)
    assert path.is_relative_to(cache_dir)
    assert findings.cache == path
    assert Dialect.model_validate_json(path.read_bytes()) == dialect
    assert cache_files(cache_dir) == [path]


async def test_run_starts_from_the_doctors_findings(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """`remix run` (load_dialect without a run-dir record) reads the doctor's cache;
    a run dir's own record still comes first."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0, unknown_task="taskNotFound", poll_batch="first")
    )
    url = base_url(server)
    assert load_dialect(None, url) == Dialect()
    findings = await examine(fast_settings(tmp_path, url))
    loaded = load_dialect(None, url)
    assert loaded == findings.dialect
    assert loaded.source == "doctor"
    assert loaded.poll_mode is PollMode.SINGLE
    assert loaded.unknown_task is UnknownTask.NOT_FOUND
    assert loaded.unknown_task_code == "taskNotFound"
    assert loaded.processing_proves_acceptance

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    own = Dialect(poll_mode=PollMode.BATCHED, source="run")
    (run_dir / "dialect.json").write_text(own.model_dump_json())
    assert load_dialect(run_dir, url) == own


async def test_bad_key_is_not_usable_and_never_shown(
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cache_dir: Path,
) -> None:
    """A refused key: exit 3, "key refused", no cache, the key in no output."""
    server = await make_sandbox()
    monkeypatch.setenv("REMIX_BASE_URL", base_url(server))
    monkeypatch.setenv("RUNWARE_API_KEY", BAD_KEY)
    for fmt in ("table", "json"):
        assert await cli(["doctor", "--format", fmt]) == 3
        out, err = capsys.readouterr()
        assert "key refused" in out
        assert "RUNWARE_API_KEY" in out
        assert BAD_KEY not in out + err
    assert cache_files(cache_dir) == []
    assert_spent_nothing(server)


async def test_unreachable_api_is_one_plain_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cache_dir: Path,
) -> None:
    """A closed port: exit 3 and one plain line naming the host, not a repr."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("REMIX_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("RUNWARE_API_KEY", BAD_KEY)
    config = tmp_path / "doctor.toml"
    config.write_text("[retry]\nwait_initial_s = 0\nwait_max_s = 0\n")
    assert await cli(["doctor", "--config", str(config)]) == 3
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines == [f"remix: unreachable: 127.0.0.1:{port} (Connection refused)"]
    assert "unreachable: 127.0.0.1" in out
    assert "Error(" not in out + err
    assert "Traceback" not in out + err
    assert BAD_KEY not in out + err
    assert cache_files(cache_dir) == []


async def test_no_key_says_to_set_it(tmp_path: Path, cache_dir: Path) -> None:
    """No key: not usable, naming RUNWARE_API_KEY, and nothing is asked."""
    settings = load_settings(
        None, env={"REMIX_BASE_URL": "http://127.0.0.1:9/v1"}, overrides={}
    )
    findings = await examine(settings)
    assert findings.exit_code == 3
    assert "RUNWARE_API_KEY" in render_table(findings)
    assert cache_files(cache_dir) == []


async def test_spend_one_runs_one_task_after_naming_its_price(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """--spend-one: the price is announced before the submit; exactly one task is
    submitted and billed; its time, reported cost and image size are reported."""
    server = await make_sandbox()
    state = server.app[STATE]
    said: list[tuple[str, int]] = []
    findings = await examine(
        fast_settings(tmp_path, base_url(server)),
        spend_one=True,
        announce=lambda line: said.append((line, state.submissions)),
    )
    assert said == [(said[0][0], 0)]
    assert "$0.08" in said[0][0]
    assert "TURBO" in said[0][0]
    assert findings.exit_code == 0, render_table(findings)
    assert state.submissions == 1
    assert len(state.billed) == 1
    spend = findings.spend
    assert spend is not None
    assert spend.error is None
    assert (spend.width, spend.height) == (1024, 640)
    assert spend.rendering_speed == "TURBO"
    assert spend.cost_usd is not None
    assert str(spend.cost_usd) == "0.08"
    assert spend.image_bytes is not None
    assert spend.image_bytes > 0
    assert spend.seconds is not None
    task = state.task(spend.task_uuid)
    assert task is not None
    assert task.request.number_results == 1
    assert task.request.delivery_method == "async"
    assert task.request.include_cost is True
    assert not images_under(tmp_path)  # counted, not saved


async def test_spend_one_that_fails_is_reported_and_the_findings_kept(
    make_sandbox: SandboxFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """A real task that fails: exit 1 with its code; the free findings are cached."""
    server = await make_sandbox(SandboxConfig(latency_s=0, task_fail_rate=1.0))
    findings = await examine(fast_settings(tmp_path, base_url(server)), spend_one=True)
    assert findings.exit_code == 1
    assert findings.spend is not None
    assert findings.spend.error is not None
    assert "inferenceError" in findings.spend.error
    assert not findings.checks[-1].ok
    assert cache_files(cache_dir) == [cache_path(base_url(server))]
    assert server.app[STATE].submissions == 1


async def test_spend_one_without_credit_exits_3(
    make_sandbox: SandboxFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """An account that cannot pay for the one task: exit 3 as `run` would, nothing
    billed; the free findings are still cached."""
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=Decimal("0.01")))
    findings = await examine(fast_settings(tmp_path, base_url(server)), spend_one=True)
    assert findings.exit_code == 3, render_table(findings)
    assert findings.usable
    assert findings.spend is not None
    assert findings.spend.credit_refused
    assert server.app[STATE].billed == {}
    assert cache_files(cache_dir) == [cache_path(base_url(server))]


async def test_cli_spend_one_prints_the_price_first(
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`remix doctor --spend-one --out F`: one task billed, the price on stderr
    before the table, the image written to F."""
    server = await make_sandbox()
    monkeypatch.setenv("REMIX_BASE_URL", base_url(server))
    monkeypatch.setenv("RUNWARE_API_KEY", "sandbox")
    image = tmp_path / "one.jpg"
    assert await cli(["doctor", "--spend-one", "--out", str(image)]) == 0
    out, err = capsys.readouterr()
    assert "will cost about $0.08" in err
    assert "one real task" in out
    assert "cost $0.08" in out
    state = server.app[STATE]
    assert state.submissions == 1
    assert len(state.billed) == 1
    assert image.stat().st_size > 0
    assert "sandbox" not in err  # the key


async def test_cli_table_and_json(
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cache_dir: Path,
) -> None:
    """The table has one row per check and the cache path; --format json says the
    same as one object."""
    server = await make_sandbox()
    url = base_url(server)
    monkeypatch.setenv("REMIX_BASE_URL", url)
    monkeypatch.setenv("RUNWARE_API_KEY", "sandbox")

    assert await cli(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("API key", "unknown taskUUID", "batched getResponse", "round trip"):
        assert row in out
    assert "taskFailedOrNotFound" in out
    assert "an ambiguous submit is settled by asking" in out
    assert "up to limits.poll_batch (100) taskUUIDs per request" in out
    assert f"findings written to {cache_path(url)}" in out
    assert "Bearer" not in out

    assert await cli(["doctor", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] is True
    assert report["exit_code"] == 0
    assert [c["check"] for c in report["checks"]] == [
        "API key",
        "unknown taskUUID",
        "batched getResponse",
        "round trip",
    ]
    assert report["dialect"]["poll_mode"] == "batched"
    assert report["dialect"]["unknown_task"] == "not_found"
    assert report["dialect"]["unknown_task_code"] == "taskFailedOrNotFound"
    assert report["dialect"]["source"] == "doctor"
    assert report["round_trip_ms"]["samples"] == 3
    unknown = report["checks"][1]
    assert unknown["found"] == "answered taskFailedOrNotFound"
    assert unknown["action"].endswith("then by sending the same taskUUID again")
    assert report["cache"] == str(cache_path(url))
    assert report["spend"] is None
    assert load_dialect(None, url).model_dump(mode="json") == report["dialect"]
    assert_spent_nothing(server)


def test_cli_sandbox_demo_keeps_no_cache(
    capsys: pytest.CaptureFixture[str], cache_dir: Path
) -> None:
    """`remix doctor --sandbox` checks an in-process sandbox and caches nothing (its
    port is new each time)."""
    assert main(["doctor", "--sandbox"]) == 0
    out = capsys.readouterr().out
    assert "batched getResponse" in out
    assert "not written" in out
    assert cache_files(cache_dir) == []


def test_out_needs_spend_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--sandbox", "--out", "x.jpg"]) == 2
    assert "--spend-one" in capsys.readouterr().err


async def cli(argv: list[str]) -> int:
    """`remix ...` in a worker thread (main runs its own event loop)."""
    return await anyio.to_thread.run_sync(main, argv)
