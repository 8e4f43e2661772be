"""Politeness toward the account: one ceiling on API requests per second for
submits, polls and uploads together, and no task asked about sooner than
``poll.first_after_s`` after it was sent."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler

from pipeline.sandbox import SandboxConfig, create_app
from tests.jobkit import base_url, fast_settings, run_manifest, styles, write_job


@dataclass
class Arrivals:
    """When each API request arrived, and the task types and UUIDs it held."""

    times: list[float] = field(default_factory=list)
    types: list[set[str]] = field(default_factory=list)
    first_submit: dict[str, float] = field(default_factory=dict)
    first_poll: dict[str, float] = field(default_factory=dict)
    poll_sizes: list[int] = field(default_factory=list)
    """How many getResponse tasks each request held (requests holding any)."""

    def middleware(self) -> web.middleware:  # type: ignore[valid-type]
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method == "POST" and request.path == "/v1":
                now = time.monotonic()
                tasks = json.loads(await request.read())
                self.times.append(now)
                self.types.append({str(t.get("taskType")) for t in tasks})
                polls = sum(t.get("taskType") == "getResponse" for t in tasks)
                if polls:
                    self.poll_sizes.append(polls)
                for task in tasks:
                    seen = {
                        "imageInference": self.first_submit,
                        "getResponse": self.first_poll,
                    }.get(str(task.get("taskType")))
                    if seen is not None:
                        seen.setdefault(str(task.get("taskUUID")), now)
            return await handler(request)

        return record


async def _serve(arrivals: Arrivals, config: SandboxConfig) -> TestServer:
    app = create_app(config)
    app.middlewares.append(arrivals.middleware())
    server = TestServer(app)
    await server.start_server()
    return server


async def test_one_request_ceiling_for_the_whole_account(tmp_path: Path) -> None:
    """At 20 requests/s with a burst of 3, no stretch of time holds more requests
    (uploads, submits and polls counted together) than the ceiling allows."""
    arrivals = Arrivals()
    server = await _serve(arrivals, SandboxConfig(latency_s=0.05, render_scale=0.05))
    try:
        job = write_job(tmp_path, refs=3, variants=styles(6))
        settings = fast_settings(
            tmp_path,
            base_url(server),
            limits={"requests_per_s": 20.0, "burst": 3, "submit_batch": 4},
        )
        summary = await run_manifest(job, tmp_path / "run", settings, concurrency=4)
    finally:
        await server.close()
    assert summary.exit_code == 0
    kinds = set().union(*arrivals.types)
    assert {"imageUpload", "imageInference", "getResponse"} <= kinds
    times = sorted(arrivals.times)
    assert len(times) > 10
    slack_s = 0.01  # the server sees requests a little after they start
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            allowed = 3 + 20.0 * (times[j] - start + slack_s)
            assert j - i + 1 <= allowed, (j - i + 1, times[j] - start)


async def test_no_task_is_asked_about_before_the_first_poll_delay(
    tmp_path: Path,
) -> None:
    """An API that finishes at once (latency 0) is still first asked about each
    task no sooner than poll.first_after_s after it was sent."""
    arrivals = Arrivals()
    server = await _serve(arrivals, SandboxConfig(latency_s=0, render_scale=0.05))
    try:
        job = write_job(tmp_path, refs=2, variants=styles(8))
        settings = fast_settings(
            tmp_path, base_url(server), poll={"first_after_s": 0.3}
        )
        summary = await run_manifest(job, tmp_path / "run", settings, concurrency=8)
    finally:
        await server.close()
    assert summary.exit_code == 0
    assert len(arrivals.first_submit) == 16
    assert arrivals.first_poll.keys() == arrivals.first_submit.keys()
    for task_uuid, sent in arrivals.first_submit.items():
        assert arrivals.first_poll[task_uuid] - sent >= 0.3 - 0.005
