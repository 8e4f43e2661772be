"""RunwareClient against the in-process sandbox (real sockets), plus tiny apps for
answers the sandbox never gives (402, request-level 400, oversized chunked bodies)."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image
from pydantic import SecretStr

from pipeline.client import PollOutcome, RunwareClient
from pipeline.config import ApiSettings, RetrySettings, Settings
from pipeline.errors import (
    AuthError,
    DownloadError,
    InsufficientCreditError,
    PipelineError,
    ProtocolError,
    RequestRejectedError,
    RequestTimeoutError,
    ServerError,
    UnusableImageError,
)
from pipeline.sandbox import STATE, SandboxConfig, create_app
from pipeline.wire import ImageInferenceRequest, ImageResult, Inputs, OutputType

KEY = "sk-test-SECRET-4242"
WRONG_KEY = "sk-wrong-SECRET-9999"
ATTEMPTS = 4


def _png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


REF = _png_data_uri()


class Sleeps:
    """A no-op sleep that remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class SpyPacer:
    """Records what the client tells its pacer."""

    def __init__(self) -> None:
        self.before = 0
        self.congestion: list[float | None] = []
        self.relief = 0

    async def before_request(self) -> None:
        self.before += 1

    def congested(self, retry_after_s: float | None) -> None:
        self.congestion.append(retry_after_s)

    def relieved(self) -> None:
        self.relief += 1


def make_settings(
    base_url: str, *, key: str | None = KEY, attempts: int = ATTEMPTS, **api: Any
) -> Settings:
    return Settings(
        api=ApiSettings(base_url=base_url, **api),
        retry=RetrySettings(attempts=attempts, wait_initial_s=0, wait_max_s=0),
        api_key=SecretStr(key) if key is not None else None,
    )


def make_task(
    ref: str = REF, *, output_type: OutputType | None = None, images: int = 1
) -> ImageInferenceRequest:
    return ImageInferenceRequest(
        task_uuid=uuid.uuid4(),
        positive_prompt="a lobby in art deco style",
        width=1024,
        height=1024,
        inputs=Inputs(reference_images=[ref]),
        delivery_method="async",
        include_cost=True,
        output_type=output_type,
        number_results=images,
    )


@asynccontextmanager
async def sandbox(**config: Any) -> AsyncIterator[TestServer]:
    config.setdefault("latency_s", 0)
    config.setdefault("render_scale", 0.05)
    config.setdefault("result_stagger_s", 0)
    config.setdefault("api_key", KEY)
    server = TestServer(create_app(SandboxConfig(**config)))
    async with server:
        yield server


@asynccontextmanager
async def client_for(
    server: TestServer,
    *,
    key: str | None = KEY,
    pacer: SpyPacer | None = None,
    sleeps: Sleeps | None = None,
    attempts: int = ATTEMPTS,
    **api: Any,
) -> AsyncIterator[RunwareClient]:
    url = str(server.make_url("/v1"))
    settings = make_settings(url, key=key, attempts=attempts, **api)
    sleep = sleeps or Sleeps()
    async with RunwareClient(settings, pacer=pacer, sleep=sleep) as client:
        yield client


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def tiny_app(
    api: Handler, image: Handler | None = None
) -> AsyncIterator[TestServer]:
    """A stand-in server for answers the sandbox has no fault for."""
    app = web.Application()
    app.router.add_post("/v1", api)
    if image is not None:
        app.router.add_get("/img", image)
    server = TestServer(app)
    async with server:
        yield server


async def poll_until_done(client: RunwareClient, uuids: list[str]) -> PollOutcome:
    outcome = await client.poll(uuids)
    assert not outcome.processing, "latency_s=0: every task is done at once"
    return outcome


# --------------------------------------------------------------------- happy paths


async def test_submit_then_poll() -> None:
    """Tasks submitted in one request are acked, then polled to priced results."""
    async with sandbox() as server, client_for(server) as client:
        tasks = [make_task(images=2) for _ in range(3)]
        submitted = await client.submit(tasks)
        uuids = [str(t.task_uuid) for t in tasks]
        assert submitted.accepted == uuids
        assert submitted.failed == {}
        assert submitted.ambiguous == []
        assert submitted.results == []
        polled = await poll_until_done(client, uuids)
        assert {r.task_uuid for r in polled.results} == set(uuids)
        assert len({r.image_uuid for r in polled.results}) == 6
        assert {str(r.cost) for r in polled.results} == {"0.08"}
        state = server.app[STATE]
        assert state.submissions == 3
        assert state.http_requests == 2
        assert state.duplicate_task_uuids == 0


async def test_poll_many_uuids_in_one_request() -> None:
    """A poll of many taskUUIDs is ONE HTTP request with one getResponse each."""
    async with sandbox() as server, client_for(server) as client:
        tasks = [make_task() for _ in range(25)]
        await client.submit(tasks)
        state = server.app[STATE]
        before = state.http_requests
        polled = await poll_until_done(client, [str(t.task_uuid) for t in tasks])
        assert len(polled.results) == 25
        assert state.http_requests - before == 1
        assert state.requests["getResponse"] == 25


async def test_poll_reports_processing_then_results() -> None:
    """Unfinished tasks are 'processing' until the sandbox clock passes latency."""
    now = [0.0]
    server = TestServer(
        create_app(
            SandboxConfig(latency_s=30, render_scale=0.05, api_key=KEY),
            clock=lambda: now[0],
        )
    )
    async with server, client_for(server) as client:
        task = make_task()
        await client.submit([task])
        first = await client.poll([str(task.task_uuid)])
        assert first.processing == {str(task.task_uuid)}
        assert not first.results
        now[0] = 31.0
        second = await client.poll([str(task.task_uuid)])
        assert not second.processing
        assert [r.task_uuid for r in second.results] == [str(task.task_uuid)]


async def test_poll_unknown_uuids_are_not_found() -> None:
    """taskFailedOrNotFound becomes not_found, alone or beside known tasks."""
    async with sandbox() as server, client_for(server) as client:
        known = make_task()
        await client.submit([known])
        ghosts = [str(uuid.uuid4()) for _ in range(2)]
        alone = await client.poll(ghosts[:1])
        assert alone.not_found == set(ghosts[:1])
        mixed = await client.poll([*ghosts, str(known.task_uuid)])
        assert mixed.not_found == set(ghosts)
        assert [r.task_uuid for r in mixed.results] == [str(known.task_uuid)]


async def test_auth_in_body() -> None:
    """With api.auth_in_body the key travels as an authentication task at index 0."""
    async with sandbox() as server, client_for(server, auth_in_body=True) as client:
        ref = await client.upload_image(REF)
        task = make_task(ref)
        assert (await client.submit([task])).accepted == [str(task.task_uuid)]
        assert server.app[STATE].uploads == 1


async def test_sync_submit_returns_results() -> None:
    """A sync task's images come back in the submit answer itself."""
    async with sandbox() as server, client_for(server) as client:
        task = make_task().model_copy(update={"delivery_method": None})
        outcome = await client.submit([task])
        assert outcome.accepted == [str(task.task_uuid)]
        assert [r.task_uuid for r in outcome.results] == [str(task.task_uuid)]


async def test_pacer_sees_every_request() -> None:
    """before_request precedes every POST and relieved() follows each 2xx."""
    pacer = SpyPacer()
    async with sandbox() as server, client_for(server, pacer=pacer) as client:
        task = make_task()
        await client.submit([task])
        await client.poll([str(task.task_uuid)])
        assert pacer.before == 2 == server.app[STATE].http_requests
        assert pacer.relief == 2
        assert pacer.congestion == []


# --------------------------------------------------------------------- faults


async def test_429_with_retry_after_then_success() -> None:
    """A 429 is retried no sooner than Retry-After, and the poll then succeeds."""
    pacer = SpyPacer()
    sleeps = Sleeps()
    async with (
        sandbox(
            rate_limit_rate=0.5,
            retry_after_s=2.5,
            fault_task_types=frozenset({"getResponse"}),
        ) as server,
        client_for(server, pacer=pacer, sleeps=sleeps, attempts=30) as client,
    ):
        task = make_task()
        await client.submit([task])
        for _ in range(20):  # the seeded fault fires on some polls, not all
            polled = await client.poll([str(task.task_uuid)])
            assert [r.task_uuid for r in polled.results] == [str(task.task_uuid)]
            if client.retries:
                break
        assert client.retries >= 1
        assert sleeps.waits
        assert min(sleeps.waits) >= 2.5
        assert pacer.congestion
        assert set(pacer.congestion) == {2.5}


async def test_5xx_burst_exhausts_retries() -> None:
    """A server error on every attempt raises ServerError after `attempts` tries."""
    async with (
        sandbox(
            server_error_rate=1.0, fault_task_types=frozenset({"getResponse"})
        ) as server,
        client_for(server) as client,
    ):
        task = make_task()
        await client.submit([task])
        with pytest.raises(ServerError, match=r"HTTP 50[03]"):
            await client.poll([str(task.task_uuid)])
        assert server.app[STATE].requests["getResponse"] == ATTEMPTS
        assert client.retries == ATTEMPTS - 1


async def test_submit_5xx_is_ambiguous_and_not_retried() -> None:
    """A 5xx on submit is never retried: every task comes back ambiguous."""
    async with (
        sandbox(
            server_error_rate=1.0, fault_task_types=frozenset({"imageInference"})
        ) as server,
        client_for(server) as client,
    ):
        tasks = [make_task() for _ in range(3)]
        outcome = await client.submit(tasks)
        assert outcome.ambiguous == [str(t.task_uuid) for t in tasks]
        assert not outcome.accepted
        assert server.app[STATE].http_requests == 1


async def test_per_task_invalid_parameter() -> None:
    """Per-task errors fail only the tasks they name, with code and parameter."""
    async with sandbox() as server, client_for(server) as client:
        good = make_task()
        bad_size = ImageInferenceRequest.model_construct(
            **{**dict(make_task()), "task_uuid": uuid.uuid4(), "width": 1000}
        )
        unknown_ref = make_task(str(uuid.uuid4()))
        outcome = await client.submit([good, bad_size, unknown_ref])
        assert outcome.accepted == [str(good.task_uuid)]
        assert not outcome.ambiguous
        size_error = outcome.failed[str(bad_size.task_uuid)]
        assert size_error.code == "invalidParameter"
        assert size_error.parameters == ["width", "height"]
        ref_error = outcome.failed[str(unknown_ref.task_uuid)]
        assert ref_error.code == "invalidParameter"
        assert ref_error.parameters == ["inputs.referenceImages"]
        assert server.app[STATE].submissions == 1


async def test_reused_uuid_is_accepted_earlier_not_failed() -> None:
    """conflictTaskUUID means 'accepted earlier': keep polling it; nothing billed."""
    async with sandbox() as server, client_for(server) as client:
        task = make_task()
        await client.submit([task])
        again = await client.submit([task])
        assert again.already_accepted == [str(task.task_uuid)]
        assert not again.failed
        assert not again.ambiguous
        assert not again.accepted
        resolved = await client.poll(again.already_accepted)
        assert [r.task_uuid for r in resolved.results] == [str(task.task_uuid)]
        assert server.app[STATE].submissions == 1


async def test_malformed_submit_is_ambiguous_and_resolvable() -> None:
    """A garbled submit answer leaves the tasks ambiguous; a poll finds them."""
    async with (
        sandbox(
            malformed_rate=1.0, fault_task_types=frozenset({"imageInference"})
        ) as server,
        client_for(server) as client,
    ):
        tasks = [make_task() for _ in range(2)]
        outcome = await client.submit(tasks)
        uuids = [str(t.task_uuid) for t in tasks]
        assert outcome.ambiguous == uuids
        resolved = await client.poll(uuids)
        assert not resolved.not_found
        assert {r.task_uuid for r in resolved.results} == set(uuids)
        assert server.app[STATE].submissions == 2


async def test_malformed_poll_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    """A garbled poll answer is a ProtocolError that is retried until a good one."""
    caplog.set_level(logging.DEBUG, logger="pipeline.client")
    async with (
        sandbox(
            malformed_rate=0.5, fault_task_types=frozenset({"getResponse"})
        ) as server,
        client_for(server, attempts=30) as client,
    ):
        task = make_task()
        await client.submit([task])
        for _ in range(20):
            polled = await client.poll([str(task.task_uuid)])
            assert [r.task_uuid for r in polled.results] == [str(task.task_uuid)]
            if client.retries:
                break
        assert client.retries >= 1
        assert "is not a Runware response" in caplog.text


async def test_malformed_poll_exhausted_raises_protocol_error() -> None:
    """When every answer is garbled, the poll raises ProtocolError after retries."""
    async with (
        sandbox(
            malformed_rate=1.0, fault_task_types=frozenset({"getResponse"})
        ) as server,
        client_for(server) as client,
    ):
        with pytest.raises(ProtocolError, match="not a Runware response"):
            await client.poll([str(uuid.uuid4())])
        assert server.app[STATE].http_requests == ATTEMPTS


async def test_dropped_connection_after_accept_resolves_without_resubmit() -> None:
    """A connection dropped after acceptance: ambiguous, then a poll finds it."""
    async with (
        sandbox(drop_after_accept_rate=1.0) as server,
        client_for(server) as client,
    ):
        tasks = [make_task() for _ in range(3)]
        uuids = [str(t.task_uuid) for t in tasks]
        outcome = await client.submit(tasks)
        assert outcome.ambiguous == uuids
        resolved = await client.poll(uuids)
        assert not resolved.not_found
        assert {r.task_uuid for r in resolved.results} == set(uuids)
        state = server.app[STATE]
        assert state.requests["imageInference"] == 3
        assert state.submissions == 3
        assert state.duplicate_task_uuids == 0


async def test_timeouts() -> None:
    """A slow answer: submit reports ambiguous, poll raises RequestTimeoutError."""
    async with (
        sandbox(slow_response_s=0.3) as server,
        client_for(server, request_timeout_s=0.05) as client,
    ):
        task = make_task()
        outcome = await client.submit([task])
        assert outcome.ambiguous == [str(task.task_uuid)]
        with pytest.raises(RequestTimeoutError, match="timed out"):
            await client.poll([str(task.task_uuid)])


async def test_request_level_400_fails_submit_and_refuses_poll_batch() -> None:
    """A 4xx naming no task fails a whole submit; a poll batch says it was refused
    (nothing about its tasks); one task alone gets its own answer."""
    seen: list[int] = []

    async def reject_batches(request: web.Request) -> web.Response:
        tasks = await request.json()
        seen.append(len(tasks))
        if len(tasks) > 1 or tasks[0]["taskType"] != "getResponse":
            return web.json_response(
                {"errors": [{"code": "invalidRequest", "message": "one at a time"}]},
                status=400,
            )
        error = {
            "code": "taskFailedOrNotFound",
            "message": "unknown",
            "taskUUID": tasks[0]["taskUUID"],
        }
        return web.json_response({"errors": [error]}, status=400)

    async with tiny_app(reject_batches) as server, client_for(server) as client:
        tasks = [make_task() for _ in range(2)]
        outcome = await client.submit(tasks)
        assert set(outcome.failed) == {str(t.task_uuid) for t in tasks}
        assert {e.code for e in outcome.failed.values()} == {"invalidRequest"}
        seen.clear()
        ghosts = [str(uuid.uuid4()) for _ in range(4)]
        polled = await client.poll(ghosts)
        assert polled.batch_refused
        assert polled.unanswered == set(ghosts)
        assert not polled.answered
        alone = await client.poll(ghosts[:1])
        assert alone.not_found == set(ghosts[:1])
        assert not alone.batch_refused
        assert seen == [4, 1]


# --------------------------------------------------------------------- run-fatal


async def test_401_is_auth_error_without_the_key() -> None:
    """A wrong key raises AuthError naming RUNWARE_API_KEY, never the key itself."""
    async with sandbox() as server, client_for(server, key=WRONG_KEY) as client:
        with pytest.raises(AuthError, match="RUNWARE_API_KEY") as raised:
            await client.submit([make_task()])
        assert raised.value.status == 401
        with pytest.raises(AuthError, match="RUNWARE_API_KEY") as polled:
            await client.poll([str(uuid.uuid4())])
        for err in (raised.value, polled.value):
            assert WRONG_KEY not in str(err)
            assert WRONG_KEY not in repr(err)
        assert server.app[STATE].http_requests == 2


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "forbidden", AuthError),
        (400, "invalidApiKey", AuthError),
        (404, "notFound", None),
        (418, "teapot", None),
    ],
)
async def test_single_poll_rejections(
    status: int, code: str, expected: type[PipelineError] | None
) -> None:
    """403 or a key code is AuthError; any other 4xx for one task fails that task."""

    async def answer(_request: web.Request) -> web.Response:
        body = {"errors": [{"code": code, "message": "no"}]}
        return web.json_response(body, status=status)

    ghost = str(uuid.uuid4())
    async with tiny_app(answer) as server, client_for(server) as client:
        if expected is not None:
            with pytest.raises(expected, match="RUNWARE_API_KEY"):
                await client.poll([ghost])
        else:
            outcome = await client.poll([ghost])
            assert outcome.failed[ghost].code == code


async def test_missing_key_fails_before_sending() -> None:
    """With no key configured nothing is sent and AuthError says how to set one."""
    async with sandbox() as server, client_for(server, key=None) as client:
        with pytest.raises(AuthError, match="RUNWARE_API_KEY"):
            await client.poll([str(uuid.uuid4())])
        assert server.app[STATE].http_requests == 0


@pytest.mark.parametrize(
    ("status", "code"), [(402, "paymentRequired"), (400, "insufficientCredits")]
)
async def test_insufficient_credit(status: int, code: str) -> None:
    """A submit refused for credit (402, or a credit code under any status) says so
    per task in its outcome; a poll so refused is InsufficientCreditError."""

    async def broke(_request: web.Request) -> web.Response:
        body = {"errors": [{"code": code, "message": "balance too low"}]}
        return web.json_response(body, status=status)

    async with tiny_app(broke) as server, client_for(server) as client:
        task = make_task()
        outcome = await client.submit([task])
        assert list(outcome.credit_refused) == [str(task.task_uuid)]
        assert not outcome.accepted
        assert not outcome.ambiguous
        assert outcome.credit_message == f"{code}: balance too low"
        with pytest.raises(InsufficientCreditError, match="top up") as raised:
            await client.poll([str(uuid.uuid4())])
        assert "rerun the same command" in str(raised.value)


@pytest.mark.parametrize("status", [200, 402, 400])
async def test_credit_refusals_beside_acks_keep_the_acks(status: int) -> None:
    """Acks beside per-task credit refusals (even under a 4xx) are accepted tasks;
    a code that merely contains "Credits" is an ordinary task failure."""
    tasks = [make_task() for _ in range(3)]
    first, second, third = (str(t.task_uuid) for t in tasks)

    async def mixed(_request: web.Request) -> web.Response:
        body = {
            "data": [{"taskType": "imageInference", "taskUUID": first}],
            "errors": [
                {"code": "insufficientCredits", "message": "low", "taskUUID": second},
                {"code": "styleCreditsInvalid", "message": "odd", "taskUUID": third},
            ],
        }
        return web.json_response(body, status=status)

    async with tiny_app(mixed) as server, client_for(server) as client:
        outcome = await client.submit(tasks)
        assert outcome.accepted == [first]
        assert list(outcome.credit_refused) == [second]
        assert list(outcome.failed) == [third]
        assert not outcome.ambiguous


async def test_upload_rejected() -> None:
    """An image the API cannot read is a RequestRejectedError, not retried."""
    async with sandbox() as server, client_for(server) as client:
        with pytest.raises(RequestRejectedError, match="imageUpload rejected"):
            await client.upload_image("data:image/png;base64,bm90IGFuIGltYWdl")
        assert server.app[STATE].http_requests == 1


async def test_upload_retries_with_fresh_task_uuids() -> None:
    """A failed upload is retried, each attempt under a new taskUUID."""
    uuids: list[str] = []

    async def flaky(request: web.Request) -> web.Response:
        task = (await request.json())[0]
        uuids.append(task["taskUUID"])
        if len(uuids) < 3:
            return web.json_response({"errors": []}, status=502)
        item = {
            "taskType": "imageUpload",
            "taskUUID": task["taskUUID"],
            "imageUUID": "0b8a5c49-6f4e-4c61-8b36-5f7c8e0c1a2d",
        }
        return web.json_response({"data": [item]})

    async with tiny_app(flaky) as server, client_for(server) as client:
        assert await client.upload_image(REF) == "0b8a5c49-6f4e-4c61-8b36-5f7c8e0c1a2d"
        assert len(set(uuids)) == 3


# --------------------------------------------------------------------- downloads


@pytest.mark.parametrize("output_type", ["URL", "dataURI", "base64Data"])
async def test_fetch_image_every_output_type(output_type: OutputType) -> None:
    """URL results are downloaded, data URIs and base64 decoded, byte for byte."""
    async with sandbox() as server, client_for(server) as client:
        task = make_task(output_type=output_type)
        await client.submit([task])
        (result,) = (await poll_until_done(client, [str(task.task_uuid)])).results
        data = await client.fetch_image(result)
        billed = server.app[STATE].billed[result.image_uuid]
        assert hashlib.sha256(data).hexdigest() == billed.sha256
        assert server.app[STATE].downloads == (1 if output_type == "URL" else 0)


async def test_slow_download_past_the_timeout_is_a_download_error() -> None:
    """A result URL slower than api.download_timeout_s: retried, then DownloadError."""
    async with (
        sandbox(slow_download_s=0.5) as server,
        client_for(server, download_timeout_s=0.05, attempts=2) as client,
    ):
        task = make_task()
        await client.submit([task])
        (result,) = (await poll_until_done(client, [str(task.task_uuid)])).results
        with pytest.raises(DownloadError, match="timed out"):
            await client.fetch_image(result)
        assert client.retries == 1


@pytest.mark.parametrize("output_type", ["URL", "base64Data"])
async def test_fetch_image_size_cap(output_type: OutputType) -> None:
    """An image over api.max_download_bytes is refused, not retried."""
    async with (
        sandbox() as server,
        client_for(server, max_download_bytes=100) as client,
    ):
        task = make_task(output_type=output_type)
        await client.submit([task])
        (result,) = (await poll_until_done(client, [str(task.task_uuid)])).results
        with pytest.raises(UnusableImageError, match="max_download_bytes"):
            await client.fetch_image(result)
        assert client.retries == 0


async def test_fetch_image_cap_stops_chunked_stream() -> None:
    """A body with no Content-Length is cut off as soon as it passes the cap."""

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 16384)
        await resp.write_eof()
        return resp

    async def unused(_request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async with (
        tiny_app(unused, endless) as server,
        client_for(server, max_download_bytes=50_000) as client,
    ):
        result = ImageResult(
            task_uuid=str(uuid.uuid4()),
            image_uuid=str(uuid.uuid4()),
            image_url=str(server.make_url("/img")),
        )
        with pytest.raises(UnusableImageError, match="50000 bytes"):
            await client.fetch_image(result)


async def test_fetch_image_failures_are_retried() -> None:
    """Download 5xx answers are retried, and raise DownloadError once exhausted."""
    async with (
        sandbox(download_failure_rate=1.0) as server,
        client_for(server) as client,
    ):
        task = make_task()
        await client.submit([task])
        (result,) = (await poll_until_done(client, [str(task.task_uuid)])).results
        with pytest.raises(DownloadError, match="HTTP 500"):
            await client.fetch_image(result)
        assert client.retries == ATTEMPTS - 1
        assert server.app[STATE].downloads == 0


async def test_fetch_image_invalid_base64() -> None:
    """Undecodable inline data is UnusableImageError without any request."""
    settings = make_settings("http://127.0.0.1:9/v1")
    result = ImageResult(
        task_uuid=str(uuid.uuid4()),
        image_uuid=str(uuid.uuid4()),
        image_base64_data="!!!not base64!!!",
    )
    async with RunwareClient(settings) as client:
        with pytest.raises(UnusableImageError, match="invalid base64"):
            await client.fetch_image(result)


# --------------------------------------------------------------------- secrecy


async def test_key_never_in_repr_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The key appears in no repr, no error message and no log line."""
    caplog.set_level(logging.DEBUG)
    errors: list[PipelineError] = []
    async with (
        sandbox(
            server_error_rate=1.0, fault_task_types=frozenset({"getResponse"})
        ) as server,
        client_for(server) as client,
    ):
        assert KEY not in repr(client)
        assert KEY not in str(client)
        await client.submit([make_task()])
        try:
            await client.poll([str(uuid.uuid4())])
        except ServerError as exc:
            errors.append(exc)
    async with sandbox() as server, client_for(server, key=WRONG_KEY) as client:
        try:
            await client.submit([make_task()])
        except AuthError as exc:
            errors.append(exc)
    assert len(errors) == 2
    for err in errors:
        assert KEY not in f"{err} {err!r}"
        assert WRONG_KEY not in f"{err} {err!r}"
    assert KEY not in caplog.text
    assert WRONG_KEY not in caplog.text


async def test_client_outside_context_is_a_usage_error() -> None:
    """Calling the client before `async with` is a clear RuntimeError."""
    client = RunwareClient(make_settings("http://127.0.0.1:9/v1"))
    with pytest.raises(RuntimeError, match="async with"):
        await client.poll([str(uuid.uuid4())])
