"""The Runware-compatible aiohttp.web application: task arrays in, envelopes out.

One POST endpoint (``/v1``) takes arrays of imageInference, getResponse, imageUpload and
authentication tasks, validates each with the shared ``wire`` models (by alias only, so
snake_case fails), and answers ``{"data": [...]}`` / ``{"errors": [...]}`` with the
documented statuses; ``answers.py`` words every item, in the dialect the config picks
for the undocumented parts (runware-protocol.md §10). Results are served under
``/images/``; ``/sandbox/credit`` reads and tops up the balance when the config sets
one. Latency, limits and faults come from ``SandboxConfig``; task state is lazy on the
injected clock. One background job per accepted task renders and bills its images at
completion (or refunds a failed task's charge) and fires its webhook and
uploadEndpoint, so work is paid for even when nobody polls (as on the real API).

This module holds the routes and the app's lifetime; the rest is split by idea:
``config`` (SandboxConfig, the switches), ``runtime`` (what all parts share),
``images`` (references, uploads, rendering and billing results), ``delivery``
(background completion) and ``tasks`` (``Sandbox``: each task of a request answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Final

import aiohttp
import anyio
from aiohttp import web
from anyio.streams.memory import MemoryObjectReceiveStream
from pydantic import ValidationError

from pipeline.sandbox.answers import auth_refusal, retry_response
from pipeline.sandbox.config import API_PATH, CREDIT_PATH, IMAGES_PATH, SandboxConfig
from pipeline.sandbox.faults import Fault
from pipeline.sandbox.runtime import Clock, Job, JsonObject
from pipeline.sandbox.state import SandboxState
from pipeline.sandbox.tasks import Sandbox
from pipeline.wire import REQUEST_ADAPTER, AuthenticationRequest, error_body

log = logging.getLogger(__name__)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


# ---------------------------------------------------------------------------
# Handlers


SANDBOX: Final = web.AppKey("sandbox", Sandbox)
STATE: Final = web.AppKey("sandbox_state", SandboxState)


async def _api(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[SANDBOX]
    state, faults, config = sandbox.state, sandbox.faults, sandbox.config
    state.http_requests += 1
    try:
        raw = json.loads(await request.read())
    except (ValueError, RecursionError):  # not JSON, or nested past the parser
        raw = None
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(t, dict) for t in raw)
    ):
        return web.json_response(
            error_body(
                "invalidRequestBody",
                "the body must be a non-empty JSON array of task objects",
            ),
            status=400,
        )
    tasks: list[JsonObject] = raw
    key = _bearer(request)
    if tasks[0].get("taskType") == "authentication":
        auth = tasks.pop(0)
        try:
            parsed = REQUEST_ADAPTER.validate_json(json.dumps(auth), by_name=False)
        except ValidationError:
            parsed = None
        key = parsed.api_key if isinstance(parsed, AuthenticationRequest) else None
    if not sandbox.authorised(key):
        return auth_refusal(key)
    if not tasks:
        return web.json_response({"data": [{"taskType": "authentication"}]})

    types = [str(t.get("taskType")) for t in tasks]
    state.requests.update(types)
    eligible = faults.applies_to(types)
    if config.slow_response_s > 0:
        await anyio.sleep(config.slow_response_s)
    if eligible and faults.roll(Fault.SERVER_ERROR):
        status = (503, 500)[faults.choice(Fault.SERVER_ERROR, 2)]
        return retry_response(
            status,
            "serviceUnavailable",
            "simulated server error; retry later",
            config.retry_after_s,
        )
    if eligible and faults.roll(Fault.RATE_LIMIT):
        return retry_response(
            429,
            "rateLimitExceeded",
            "simulated rate limit; retry later",
            config.retry_after_s,
        )

    outcome = await sandbox.process(tasks, f"{request.scheme}://{request.host}")
    if isinstance(outcome, web.Response):
        return outcome

    if eligible and "imageInference" in types and faults.roll(Fault.DROP_AFTER_ACCEPT):
        log.debug("dropping the connection after accepting the request")
        if request.transport is not None:
            request.transport.close()
        # Nothing can be written any more; aiohttp drops this response silently.
        raise web.HTTPInternalServerError
    if eligible and faults.roll(Fault.MALFORMED):
        if faults.choice(Fault.MALFORMED, 2) == 0:
            return web.Response(
                status=200, text="<html>oops</html>", content_type="text/html"
            )
        text = json.dumps(outcome.body())
        return web.Response(
            status=200,
            text=text[: max(1, len(text) // 2)],
            content_type="application/json",
        )
    return web.json_response(outcome.body(), status=outcome.status)


async def _credit(request: web.Request) -> web.StreamResponse:
    """GET the balance; POST ``{"add_usd": "5.00"}`` to top it up."""
    sandbox = request.app[SANDBOX]
    key = _bearer(request)
    if not sandbox.authorised(key):
        return auth_refusal(key)
    if request.method == "POST":
        try:
            body = await request.json()
            amount = Decimal(str(body["add_usd"]))
            if not amount.is_finite() or amount < 0:
                raise ValueError(amount)
        except (ValueError, KeyError, TypeError, ArithmeticError):
            return web.json_response(
                error_body("invalidParameter", 'send {"add_usd": "<amount>"}'),
                status=400,
            )
        sandbox.state.top_up(amount)
    balance = sandbox.state.credit_usd
    return web.json_response({"credit_usd": None if balance is None else str(balance)})


async def _image(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[SANDBOX]
    image_uuid = request.match_info["name"].partition(".")[0].lower()
    stored = sandbox.state.images.get(image_uuid)
    if (
        stored is not None
        and stored.expires_at is not None
        and sandbox.clock() >= stored.expires_at
    ):
        del sandbox.state.images[image_uuid]  # expired: free the memory too
        stored = None
    if stored is None:
        return web.json_response(
            error_body(
                "imageNotFound", f"image {image_uuid} does not exist or has expired"
            ),
            status=404,
        )
    if sandbox.config.slow_download_s > 0:
        await anyio.sleep(sandbox.config.slow_download_s)
    if sandbox.faults.roll(Fault.DOWNLOAD_FAILURE):
        return web.json_response(
            error_body("serverError", "simulated download failure"), status=500
        )
    sandbox.state.downloads += 1
    return web.Response(body=stored.data, content_type=stored.content_type)


async def _run_jobs(receive: MemoryObjectReceiveStream[Job]) -> None:
    async with anyio.create_task_group() as tg, receive:
        async for job in receive:
            tg.start_soon(job)


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Own the webhook session and the job runner for the app's lifetime."""
    sandbox = app[SANDBOX]
    # Unbounded on purpose: a submit must never wait on webhook work; the buffer holds
    # at most one job per accepted task.
    send, receive = anyio.create_memory_object_stream[Job](math.inf)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        sandbox.session, sandbox.jobs = session, send
        # aiohttp's documented background-task pattern: one task for the app's
        # lifetime, inside which the jobs run in an anyio task group.
        runner = asyncio.get_running_loop().create_task(_run_jobs(receive))
        try:
            yield
        finally:
            sandbox.jobs = None
            send.close()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            receive.close()
            sandbox.session = None


def create_app(
    config: SandboxConfig, *, clock: Clock = time.monotonic
) -> web.Application:
    """The sandbox as an aiohttp application (POST /v1, GET /images/<uuid>.<ext>)."""
    app = web.Application(client_max_size=64 * 1024**2)
    sandbox = Sandbox(config, clock)
    app[SANDBOX] = sandbox
    app[STATE] = sandbox.state
    app.router.add_post(API_PATH, _api)
    app.router.add_get(IMAGES_PATH + "/{name}", _image)
    app.router.add_route("*", CREDIT_PATH, _credit)
    app.cleanup_ctx.append(_background)
    return app
