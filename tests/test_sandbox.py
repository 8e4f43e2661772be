"""The sandbox over real sockets: protocol, delivery, auth, billing, faults, images."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops, ImageStat

from pipeline.sandbox import STATE, SandboxConfig, running_sandbox
from pipeline.sandbox.render import PALETTES, RenderSpec, Source, render
from pipeline.wire import ALLOWED_SIZES, Envelope, ImageResult

AUTH = {"Authorization": "Bearer sandbox"}
FOREIGN_REF = "https://assets.example.com/inputs/atrium.jpg"
Json = dict[str, Any]
MakeSandbox = Callable[..., Awaitable[TestServer]]


class FakeClock:
    """A clock tests move by hand: no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def inference(**overrides: Any) -> Json:
    """A valid imageInference task with a fresh taskUUID."""
    task: Json = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "ideogram:3@2",
        "positivePrompt": "Transform the atrium into an Art Deco hall",
        "width": 1344,
        "height": 768,
        "inputs": {"referenceImages": [FOREIGN_REF]},
    }
    task.update(overrides)
    return task


def poll(*task_uuids: str) -> list[Json]:
    return [{"taskType": "getResponse", "taskUUID": t} for t in task_uuids]


def png_data_uri(colour: tuple[int, int, int] = (200, 40, 40)) -> str:
    img = Image.new("RGB", (96, 64), colour)
    img.paste((20, 20, 220), (10, 10, 50, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def call(
    http: aiohttp.ClientSession,
    server: TestServer,
    tasks: list[Json],
    headers: dict[str, str] | None = None,
) -> tuple[int, Json]:
    async with http.post(server.make_url("/v1"), json=tasks, headers=headers) as resp:
        return resp.status, json.loads(await resp.text(), parse_float=Decimal)


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as resp:
        return resp.status, await resp.read()


def image_bytes(item: Json) -> bytes:
    if "imageDataURI" in item:
        return base64.b64decode(item["imageDataURI"].split(";base64,", 1)[1])
    return base64.b64decode(item["imageBase64Data"])


# ---------------------------------------------------------------------------
# Delivery


async def test_sync_returns_finished_image(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """A sync task answers with the finished image, downloadable at the asked size."""
    task = inference()
    status, body = await call(http, sandbox, [task])
    assert status == 200
    [item] = body["data"]
    result = ImageResult.model_validate(item)
    assert result.task_uuid == task["taskUUID"]
    assert result.status == "success"
    assert result.seed is not None
    assert 0 <= result.seed < 2**32
    assert "cost" not in item
    assert "NSFWContent" not in item
    code, data = await fetch(http, item["imageURL"])
    assert code == 200
    assert Image.open(io.BytesIO(data)).size == (1344, 768)
    assert sandbox.app[STATE].downloads == 1


async def test_async_ack_then_poll(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """An async submit is acked bare; getResponse says processing, then success."""
    clock = FakeClock()
    server = await make_sandbox(SandboxConfig(latency_s=5), clock=clock)
    task = inference(deliveryMethod="async")
    status, body = await call(http, server, [task])
    assert status == 200
    assert body == {
        "data": [
            {
                "taskType": "imageInference",
                "taskUUID": task["taskUUID"],
                "status": "processing",
            }
        ]
    }
    _, body = await call(http, server, poll(task["taskUUID"]))
    assert [i["status"] for i in body["data"]] == ["processing"]
    clock.now += 5
    _, body = await call(http, server, poll(task["taskUUID"]))
    [item] = body["data"]
    assert item["status"] == "success"
    assert "imageURL" in item
    # Cumulative: a finished item repeats, with the same identity.
    _, again = await call(http, server, poll(task["taskUUID"]))
    assert again["data"] == [item]
    assert server.app[STATE].requests["getResponse"] == 3


async def test_batched_get_response(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """One getResponse request answers many task UUIDs, matched by taskUUID."""
    tasks = [inference(deliveryMethod="async") for _ in range(12)]
    status, body = await call(http, sandbox, tasks)
    assert status == 200
    assert len(body["data"]) == 12
    status, body = await call(http, sandbox, poll(*[t["taskUUID"] for t in tasks]))
    assert status == 200
    assert {i["taskUUID"] for i in body["data"]} == {t["taskUUID"] for t in tasks}
    assert all(i["status"] == "success" for i in body["data"])
    assert sandbox.app[STATE].http_requests == 2


async def test_number_results_staggered(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """numberResults=3 gives 3 distinct imageUUIDs and seeds, finishing one by one."""
    clock = FakeClock()
    config = SandboxConfig(latency_s=1, result_stagger_s=0.5)
    server = await make_sandbox(config, clock=clock)
    task = inference(deliveryMethod="async", numberResults=3)
    await call(http, server, [task])
    seen: list[int] = []
    for _ in range(3):
        clock.now += 1 if not seen else 0.5
        _, body = await call(http, server, poll(task["taskUUID"]))
        seen.append(sum(i["status"] == "success" for i in body["data"]))
    assert seen == [1, 2, 3]
    items = body["data"]
    assert len({i["imageUUID"] for i in items}) == 3
    assert len({i["seed"] for i in items}) == 3
    assert server.app[STATE].max_in_flight_seen == 1


@pytest.mark.parametrize("output_type", ["URL", "dataURI", "base64Data"])
async def test_output_types(
    sandbox: TestServer, http: aiohttp.ClientSession, output_type: str
) -> None:
    """Each outputType carries the image under its own key and decodes."""
    status, body = await call(http, sandbox, [inference(outputType=output_type)])
    assert status == 200
    [item] = body["data"]
    if output_type == "URL":
        assert not {"imageDataURI", "imageBase64Data"} & item.keys()
        _, data = await fetch(http, item["imageURL"])
    else:
        assert "imageURL" not in item
        data = image_bytes(item)
    assert Image.open(io.BytesIO(data)).format == "JPEG"


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("JPG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WEBP")]
)
async def test_output_formats(
    sandbox: TestServer,
    http: aiohttp.ClientSession,
    output_format: str,
    pil_format: str,
) -> None:
    """Each outputFormat decodes with Pillow at width x height."""
    task = inference(
        outputFormat=output_format, outputQuality=60, width=768, height=1344
    )
    _, body = await call(http, sandbox, [task])
    url = body["data"][0]["imageURL"]
    assert url.endswith("." + {"JPEG": "jpg"}.get(pil_format, pil_format.lower()))
    _, data = await fetch(http, url)
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.size) == (pil_format, (768, 1344))


# ---------------------------------------------------------------------------
# Validation and protocol errors


@pytest.mark.parametrize(
    ("overrides", "code", "parameter"),
    [
        (
            {"providerSettings": {"ideogram": {"remixStrength": 101}}},
            "invalidParameter",
            "providerSettings.ideogram.remixStrength",
        ),
        ({"width": 1024, "height": 768}, "invalidParameter", ["width", "height"]),
        ({"seed": 42}, "unknownParameter", "seed"),
        ({"outputQuality": 10}, "invalidParameter", "outputQuality"),
        (
            {"inputs": {"referenceImages": []}},
            "invalidParameter",
            "inputs.referenceImages",
        ),
        (
            {"providerSettings": {"ideogram": {"colorPalette": {}}}},
            "invalidParameter",
            "providerSettings.ideogram.colorPalette",
        ),
    ],
)
async def test_invalid_parameter_named(
    sandbox: TestServer,
    http: aiohttp.ClientSession,
    overrides: Json,
    code: str,
    parameter: str | list[str],
) -> None:
    """A bad task gets 400 with a Runware error naming the camelCase parameter."""
    task = inference(**overrides)
    status, body = await call(http, sandbox, [task])
    assert status == 400
    [error] = body["errors"]
    assert (error["code"], error["parameter"]) == (code, parameter)
    assert error["taskUUID"] == task["taskUUID"]
    assert sandbox.app[STATE].submissions == 0


async def test_missing_parameter(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """A missing required parameter is missingParameter."""
    task = inference()
    del task["positivePrompt"]
    _, body = await call(http, sandbox, [task])
    assert body["errors"][0]["code"] == "missingParameter"
    assert body["errors"][0]["parameter"] == "positivePrompt"


async def test_snake_case_rejected(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """snake_case keys are unknown parameters, with a camelCase hint."""
    task = inference()
    task["positive_prompt"] = task.pop("positivePrompt")
    status, body = await call(http, sandbox, [task])
    assert status == 400
    error = body["errors"][0]
    assert (error["code"], error["parameter"]) == (
        "unknownParameter",
        "positive_prompt",
    )
    assert "positivePrompt" in error["message"]


async def test_bad_task_does_not_sink_the_array(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """One invalid task errors; the others in the array are still processed."""
    good, bad = inference(), inference(width=1)
    status, body = await call(http, sandbox, [good, bad])
    assert status == 200
    assert [i["taskUUID"] for i in body["data"]] == [good["taskUUID"]]
    assert [e["taskUUID"] for e in body["errors"]] == [bad["taskUUID"]]


async def test_reused_task_uuid_conflicts(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """A taskUUID sent again is conflictTaskUUID, counted, and not billed again."""
    task = inference()
    assert (await call(http, sandbox, [task]))[0] == 200
    status, body = await call(http, sandbox, [task])
    assert status == 400
    assert body["errors"][0]["code"] == "conflictTaskUUID"
    twin = inference()
    _, body = await call(http, sandbox, [twin, dict(twin)])
    assert [e["code"] for e in body["errors"]] == ["conflictTaskUUID"]
    state = sandbox.app[STATE]
    assert (state.duplicate_task_uuids, state.submissions, len(state.billed)) == (
        2,
        2,
        2,
    )


async def test_unknown_task_uuid(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """Polling an unknown UUID is taskFailedOrNotFound: 400 alone, 200 beside data."""
    unknown = str(uuid.uuid4())
    status, body = await call(http, sandbox, poll(unknown))
    assert status == 400
    assert body["errors"][0]["code"] == "taskFailedOrNotFound"
    assert body["errors"][0]["taskUUID"] == unknown
    known = inference(deliveryMethod="async")
    await call(http, sandbox, [known])
    status, body = await call(http, sandbox, poll(unknown, known["taskUUID"]))
    assert status == 200
    assert len(body["data"]) == len(body["errors"]) == 1


async def test_body_must_be_array(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """A body that is not a task array is 400 invalidRequestBody."""
    async with http.post(sandbox.make_url("/v1"), data=b"{}") as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == "invalidRequestBody"


# ---------------------------------------------------------------------------
# Auth


async def test_auth_header_and_task(sandbox: TestServer) -> None:
    """Bearer header and an authentication task at index 0 both authenticate."""
    async with aiohttp.ClientSession() as anon:
        auth_task = {"taskType": "authentication", "apiKey": "sandbox"}
        status, _ = await call(anon, sandbox, [auth_task, inference()])
        assert status == 200
        status, _ = await call(anon, sandbox, [inference()], headers=AUTH)
        assert status == 200


@pytest.mark.parametrize(
    ("headers", "tasks_prefix", "code"),
    [
        ({"Authorization": "Bearer wrong"}, [], "invalidApiKey"),
        ({}, [{"taskType": "authentication", "apiKey": "nope"}], "invalidApiKey"),
        ({}, [], "missingApiKey"),
    ],
)
async def test_auth_rejected(
    sandbox: TestServer, headers: dict[str, str], tasks_prefix: list[Json], code: str
) -> None:
    """A wrong or missing key is 401 with the documented error body; nothing runs."""
    async with aiohttp.ClientSession() as anon:
        status, body = await call(anon, sandbox, [*tasks_prefix, inference()], headers)
    assert status == 401
    assert body["errors"][0]["code"] == code
    assert body["errors"][0]["parameter"] == "apiKey"
    assert body["errors"][0]["taskType"] == "authentication"
    assert "wrong" not in json.dumps(body)
    assert sandbox.app[STATE].submissions == 0


async def test_any_key_when_unset(make_sandbox: MakeSandbox) -> None:
    """api_key=None accepts any key, or none."""
    server = await make_sandbox(SandboxConfig(latency_s=0, api_key=None))
    async with aiohttp.ClientSession() as anon:
        assert (await call(anon, server, [inference()]))[0] == 200


# ---------------------------------------------------------------------------
# References


async def test_upload_then_reference(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """An uploaded image's UUID works as referenceImages and styleReferenceImages."""
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4())}
    status, body = await call(http, sandbox, [{**upload, "image": png_data_uri()}])
    assert status == 200
    [item] = body["data"]
    assert item["taskType"] == "imageUpload"
    _, served = await fetch(http, item["imageURL"])
    assert Image.open(io.BytesIO(served)).size == (96, 64)
    ref = item["imageUUID"]
    task = inference(
        inputs={"referenceImages": [ref]},
        providerSettings={"ideogram": {"styleReferenceImages": [ref]}},
    )
    status, body = await call(http, sandbox, [task])
    assert status == 200
    # The reference's layout survives: a red field with a blue box at the top left.
    _, data = await fetch(http, body["data"][0]["imageURL"])
    img = Image.open(io.BytesIO(data)).convert("RGB")
    field, box = img.getpixel((1300, 700)), img.getpixel((300, 300))
    assert isinstance(field, tuple)
    assert isinstance(box, tuple)
    assert field[0] > field[2]
    assert box[2] > box[0]


async def test_unknown_reference_uuid(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """A reference UUID the sandbox never stored is an invalidParameter."""
    task = inference(inputs={"referenceImages": [str(uuid.uuid4())]})
    status, body = await call(http, sandbox, [task])
    assert status == 400
    assert body["errors"][0]["parameter"] == "inputs.referenceImages"


async def test_foreign_url_gets_placeholder(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """A URL it cannot fetch renders a placeholder derived from the URL, repeatably."""
    a = inference(inputs={"referenceImages": ["https://x.example/a.jpg"]})
    b = inference(inputs={"referenceImages": ["https://x.example/b.jpg"]})
    _, body = await call(http, sandbox, [a, dict(a, taskUUID=str(uuid.uuid4())), b])
    urls = [i["imageURL"] for i in body["data"]]
    images = [(await fetch(http, u))[1] for u in urls]
    seeds = [i["seed"] for i in body["data"]]
    assert len(set(seeds)) == 3  # each image its own seed, so compare loosely
    diff_same = _mean_diff(images[0], images[1])
    diff_other = _mean_diff(images[0], images[2])
    assert diff_same < diff_other


def _mean_diff(a: bytes, b: bytes) -> float:
    ia, ib = (Image.open(io.BytesIO(x)).convert("L") for x in (a, b))
    return float(ImageStat.Stat(ImageChops.difference(ia, ib)).mean[0])


# ---------------------------------------------------------------------------
# TTL


async def test_url_expires_after_ttl(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """A result URL answers until its ttl (or image_ttl_s) passes, then 404."""
    clock = FakeClock()
    server = await make_sandbox(
        SandboxConfig(latency_s=0, image_ttl_s=600), clock=clock
    )
    _, body = await call(http, server, [inference(ttl=60), inference()])
    short, long = (i["imageURL"] for i in body["data"])
    clock.now += 59
    assert (await fetch(http, short))[0] == 200
    clock.now += 2
    assert (await fetch(http, short))[0] == 404
    assert (await fetch(http, long))[0] == 200
    clock.now += 600
    assert (await fetch(http, long))[0] == 404


# ---------------------------------------------------------------------------
# Faults


async def test_server_error_fault(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """server_error_rate=1 answers 5xx with Retry-After and accepts nothing."""
    config = SandboxConfig(latency_s=0, server_error_rate=1.0, retry_after_s=2)
    server = await make_sandbox(config)
    for _ in range(4):
        async with http.post(server.make_url("/v1"), json=[inference()]) as resp:
            assert resp.status in (500, 503)
            assert resp.headers["Retry-After"] == "2"
    assert server.app[STATE].submissions == 0


async def test_rate_limit_fault(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """rate_limit_rate=1 answers 429 with Retry-After, polls included."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0, rate_limit_rate=1.0, retry_after_s=0.5)
    )
    for tasks in ([inference()], poll(str(uuid.uuid4()))):
        async with http.post(server.make_url("/v1"), json=tasks) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "0.5"
            assert (await resp.json())["errors"][0]["code"] == "rateLimitExceeded"
    assert server.app[STATE].submissions == 0


async def test_drop_after_accept(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """The connection closes with no response, yet the task was accepted and runs."""
    server = await make_sandbox(SandboxConfig(latency_s=0, drop_after_accept_rate=1.0))
    task = inference(deliveryMethod="async")
    with pytest.raises(aiohttp.ServerDisconnectedError, match="disconnected"):
        await call(http, server, [task])
    status, body = await call(http, server, poll(task["taskUUID"]))
    assert status == 200
    assert body["data"][0]["status"] == "success"
    assert server.app[STATE].submissions == 1


async def test_malformed_fault(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """malformed_rate=1 answers 200 with a body that is not the JSON envelope."""
    server = await make_sandbox(SandboxConfig(latency_s=0, malformed_rate=1.0))
    for _ in range(4):
        async with http.post(server.make_url("/v1"), json=[inference()]) as resp:
            assert resp.status == 200
            text = await resp.text()
        with pytest.raises(ValueError, match=r"JSON|Invalid"):
            Envelope.model_validate_json(text)


async def test_download_failure_fault(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """download_failure_rate=1 makes every image GET answer 500."""
    server = await make_sandbox(SandboxConfig(latency_s=0, download_failure_rate=1.0))
    _, body = await call(http, server, [inference()])
    assert (await fetch(http, body["data"][0]["imageURL"]))[0] == 500
    assert server.app[STATE].downloads == 0


async def test_task_fail_fault(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """task_fail_rate=1 ends tasks in an inferenceError item; nothing is billed."""
    server = await make_sandbox(SandboxConfig(latency_s=0, task_fail_rate=1.0))
    task = inference(deliveryMethod="async")
    await call(http, server, [task])
    status, body = await call(http, server, poll(task["taskUUID"]))
    assert status == 400
    [error] = body["errors"]
    assert (error["code"], error["status"], error["taskUUID"]) == (
        "inferenceError",
        "error",
        task["taskUUID"],
    )
    assert server.app[STATE].billed == {}


async def test_slow_response(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """slow_response_s delays the answer."""
    server = await make_sandbox(SandboxConfig(latency_s=0, slow_response_s=0.05))
    started = time.monotonic()
    await call(http, server, poll(str(uuid.uuid4())))
    assert time.monotonic() - started >= 0.05


async def test_fault_task_types(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """fault_task_types limits request faults to requests holding those types."""
    config = SandboxConfig(
        latency_s=0,
        server_error_rate=1.0,
        fault_task_types=frozenset({"imageInference"}),
    )
    server = await make_sandbox(config)
    assert (await call(http, server, poll(str(uuid.uuid4()))))[0] == 400
    async with http.post(server.make_url("/v1"), json=[inference()]) as resp:
        assert resp.status in (500, 503)


async def test_max_in_flight(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """Submits beyond the queue capacity get 429 and nothing of them is accepted."""
    clock = FakeClock()
    server = await make_sandbox(
        SandboxConfig(latency_s=1, max_in_flight=2), clock=clock
    )
    three = [inference(deliveryMethod="async") for _ in range(3)]
    async with http.post(server.make_url("/v1"), json=three) as resp:
        assert resp.status == 429
        assert "Retry-After" in resp.headers
    assert (await call(http, server, three[:2]))[0] == 200
    assert (await call(http, server, three[2:]))[0] == 429
    clock.now += 1
    assert (await call(http, server, three[2:]))[0] == 200
    state = server.app[STATE]
    assert (state.submissions, state.max_in_flight_seen) == (3, 2)


# ---------------------------------------------------------------------------
# Billing


async def test_billing_matches_delivered_bytes(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """Each image is billed once, with the sha256 of exactly the bytes delivered."""
    tasks = [
        inference(includeCost=True, numberResults=2),
        inference(includeCost=True, outputType="dataURI", outputFormat="PNG"),
        inference(outputType="base64Data", outputFormat="WEBP"),
    ]
    _, body = await call(http, sandbox, tasks)
    state = sandbox.app[STATE]
    for item in body["data"]:
        if "imageURL" in item:
            data = (await fetch(http, item["imageURL"]))[1]
        else:
            data = image_bytes(item)
        billed = state.billed[item["imageUUID"]]
        assert billed.sha256 == hashlib.sha256(data).hexdigest()
        assert billed.task_uuid == item["taskUUID"]
        if "cost" in item:
            assert item["cost"] == billed.cost == Decimal("0.08")
    # Polling again repeats items but never bills twice.
    await call(http, sandbox, poll(*[t["taskUUID"] for t in tasks]))
    assert len(state.billed) == 4
    assert state.billed_total_usd == Decimal("0.32")


async def test_content_billed_twice(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """The same request content billed under two taskUUIDs is counted."""
    task = inference()
    await call(http, sandbox, [task])
    assert sandbox.app[STATE].content_billed_twice == 0
    await call(http, sandbox, [dict(task, taskUUID=str(uuid.uuid4()))])
    assert sandbox.app[STATE].content_billed_twice == 1


async def test_billed_without_polling(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """An accepted task is billed at completion even if nobody ever polls it."""
    server = await make_sandbox(SandboxConfig(latency_s=0.01))
    await call(http, server, [inference(deliveryMethod="async")])
    with anyio.fail_after(5):
        while not server.app[STATE].billed:  # noqa: ASYNC110 - polls a counter, no event
            await anyio.sleep(0.01)


async def test_prices_by_rendering_speed(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """prices_usd sets the price per renderingSpeed."""
    prices = {
        "TURBO": Decimal("0.03"),
        "DEFAULT": Decimal("0.08"),
        "QUALITY": Decimal("0.1"),
    }
    server = await make_sandbox(SandboxConfig(latency_s=0, prices_usd=prices))
    task = inference(
        includeCost=True, providerSettings={"ideogram": {"renderingSpeed": "TURBO"}}
    )
    _, body = await call(http, server, [task])
    assert body["data"][0]["cost"] == Decimal("0.03")
    assert server.app[STATE].billed_total_usd == Decimal("0.03")


async def test_safety_reports_nsfw(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """NSFWContent appears only when safety.checkContent is on."""
    _, body = await call(http, sandbox, [inference(safety={"checkContent": True})])
    assert body["data"][0]["NSFWContent"] is False


# ---------------------------------------------------------------------------
# Rendering


def _spec(**overrides: Any) -> RenderSpec:
    fields: dict[str, Any] = {"width": 1344, "height": 768, "seed": 7, "scale": 0.25}
    fields.update(overrides)
    return RenderSpec(**fields)


def test_render_deterministic_and_varied() -> None:
    """Same inputs and seed give the same bytes; seeds, styles, palettes differ."""
    ref = Source(key="url:https://x.example/hall.jpg")
    base = render(ref, _spec())
    assert render(ref, _spec()) == base
    variants = [
        render(ref, _spec(seed=8)),
        render(ref, _spec(style_type="DESIGN")),
        render(ref, _spec(style_type="ANIME")),
        render(ref, _spec(palette=(((255, 0, 0), 1.0), ((0, 0, 255), 0.5)))),
        render(Source(key="url:https://x.example/other.jpg"), _spec()),
    ]
    assert len({base, *variants}) == 6


def test_remix_strength_blends_towards_reference() -> None:
    """remixStrength 1 stays close to the reference; 100 departs further."""
    ref = Source(key="url:https://x.example/hall.jpg")
    plain = render(
        ref, _spec(remix_strength=1, style_type="FICTION", output_format="PNG")
    )
    full = render(
        ref, _spec(remix_strength=100, style_type="FICTION", output_format="PNG")
    )
    reference = render(ref, _spec(remix_strength=1, seed=99, output_format="PNG"))
    assert _mean_diff(plain, reference) < 1.0
    assert _mean_diff(full, reference) > 10.0


@settings(deadline=None, max_examples=25)
@given(
    size=st.sampled_from(sorted(ALLOWED_SIZES)),
    style=st.sampled_from(
        ["AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION"]
    ),
    palette=st.none() | st.sampled_from(sorted(PALETTES)),
    fmt=st.sampled_from(["JPG", "PNG", "WEBP"]),
    strength=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_render_any_size(
    size: tuple[int, int],
    style: str,
    palette: str | None,
    fmt: str,
    strength: int,
    seed: int,
) -> None:
    """Every allowed size, style and palette renders at the scaled size, repeatably."""
    from pipeline.sandbox.render import preset_palette

    spec = RenderSpec(
        width=size[0],
        height=size[1],
        seed=seed,
        style_type=style,
        palette=preset_palette(palette) if palette else (),
        remix_strength=strength,
        output_format=fmt,
        scale=0.0625,
    )
    data = render(Source(key="url:https://x.example/p.jpg"), spec)
    assert Image.open(io.BytesIO(data)).size == spec.output_size
    assert render(Source(key="url:https://x.example/p.jpg"), spec) == data


# ---------------------------------------------------------------------------
# Webhooks and uploadEndpoint


async def test_webhook_and_upload_endpoint(
    sandbox: TestServer, http: aiohttp.ClientSession
) -> None:
    """Finished items are POSTed to webhookURL and their bytes PUT to uploadEndpoint."""
    hooks: list[Json] = []
    puts: list[bytes] = []
    done = anyio.Event()

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        if len(puts) == 2 and len(hooks) == 2:
            done.set()
        return web.Response()

    async def put(request: web.Request) -> web.Response:
        puts.append(await request.read())
        if len(puts) == 2 and len(hooks) == 2:
            done.set()
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    receiver.router.add_put("/bucket/out.jpg", put)
    receiver_server = TestServer(receiver)
    async with receiver_server:
        task = inference(
            deliveryMethod="async",
            numberResults=2,
            webhookURL=str(receiver_server.make_url("/hook")),
            uploadEndpoint=str(receiver_server.make_url("/bucket/out.jpg?X-Sig=abc")),
        )
        _, ack = await call(http, sandbox, [task])
        assert ack["data"][0].keys() == {"taskType", "taskUUID", "status"}
        with anyio.fail_after(5):
            await done.wait()
    assert {h["data"][0]["imageUUID"] for h in hooks} == set(sandbox.app[STATE].billed)
    billed = {b.sha256 for b in sandbox.app[STATE].billed.values()}
    assert {hashlib.sha256(p).hexdigest() for p in puts} == billed
    assert sandbox.app[STATE].webhooks_sent == 2


# ---------------------------------------------------------------------------
# Running for real


async def test_running_sandbox_yields_base_url() -> None:
    """running_sandbox serves on an ephemeral port and yields the /v1 base URL."""
    async with running_sandbox(SandboxConfig(latency_s=0)) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        async with (
            aiohttp.ClientSession(headers=AUTH) as session,
            session.post(base_url, json=[inference()]) as resp,
        ):
            assert resp.status == 200


def test_serve_prints_url_first_and_stops_on_sigterm() -> None:
    """serve() prints the bound URL as the first stdout line and exits on SIGTERM."""
    code = (
        "from pipeline.sandbox import serve, SandboxConfig;"
        "serve('127.0.0.1', 0, SandboxConfig(latency_s=0))"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:")
        assert line.endswith("/v1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
