"""The sandbox's dialect switches over real sockets: each answers in the shape and
with the HTTP status SandboxConfig documents (runware-protocol.md §10), and the
defaults are the sandbox's original answers (tests/test_sandbox.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, get_args

import aiohttp
import anyio
import pytest
from aiohttp.test_utils import TestServer

from pipeline.cli import build_parser, sandbox_config
from pipeline.sandbox import STATE, SandboxConfig, SandboxState
from pipeline.sandbox.answers import DIALECTS
from tests.test_sandbox import (
    FakeClock,
    MakeSandbox,
    call,
    inference,
    png_data_uri,
    poll,
)

Json = dict[str, Any]
PRICE = Decimal("0.08")  # the default price per image
NOT_FOUND_CODES = ["taskFailedOrNotFound", "taskNotFound", "taskExpired"]
TASK_TYPES = ["imageInference", "getResponse"]


async def _submit(
    http: aiohttp.ClientSession, server: TestServer, n: int, **overrides: Any
) -> list[str]:
    """Submit n async tasks in one request; their taskUUIDs."""
    tasks = [inference(deliveryMethod="async", **overrides) for _ in range(n)]
    status, _ = await call(http, server, tasks)
    assert status == 200
    return [t["taskUUID"] for t in tasks]


def _without_message(item: Json) -> Json:
    assert isinstance(item["message"], str)
    assert item["message"]
    return {k: v for k, v in item.items() if k != "message"}


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with anyio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 - polls state, no event to wait on
            await anyio.sleep(0.01)


def _truncated_png() -> str:
    """A data URI whose header reads as a PNG but whose pixels cannot be decoded:
    accepted, then the render fails."""
    data = base64.b64decode(png_data_uri().split(",", 1)[1])
    return "data:image/png;base64," + base64.b64encode(data[:60]).decode()


# ---------------------------------------------------------------------------
# unknown_task


@pytest.mark.parametrize("code", NOT_FOUND_CODES)
async def test_unknown_task_as_an_error_code(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, code: str
) -> None:
    """Alone: 400 with one errors item; beside a known task: 200, data and errors."""
    server = await make_sandbox(SandboxConfig(latency_s=0, unknown_task=code))  # type: ignore[arg-type]
    ghost = str(uuid.uuid4())
    status, body = await call(http, server, poll(ghost))
    assert status == 400
    assert list(body) == ["errors"]
    [error] = body["errors"]
    assert _without_message(error) == {
        "code": code,
        "parameter": "taskUUID",
        "taskType": "getResponse",
        "taskUUID": ghost,
        "status": "error",
    }
    [known] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(known, ghost))
    assert status == 200
    assert [(e["code"], e["taskUUID"]) for e in body["errors"]] == [(code, ghost)]
    assert [(i["taskUUID"], i["status"]) for i in body["data"]] == [(known, "success")]


async def test_unknown_task_silent(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """No item at all for an unknown task: 200 ``{"data": []}`` alone."""
    server = await make_sandbox(SandboxConfig(latency_s=0, unknown_task="silent"))
    ghost = str(uuid.uuid4())
    assert await call(http, server, poll(ghost)) == (200, {"data": []})
    assert await call(http, server, poll(ghost, ghost)) == (200, {"data": []})
    [known] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(ghost, known))
    assert status == 200
    assert list(body) == ["data"]
    assert [(i["taskUUID"], i["status"]) for i in body["data"]] == [(known, "success")]


@pytest.mark.parametrize("task_type", TASK_TYPES)
async def test_unknown_task_processing_forever(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
    """An unknown task is "processing", an hour later too, in the poll taskType."""
    clock = FakeClock()
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0,
            unknown_task="processing",
            poll_task_type=task_type,  # type: ignore[arg-type]
        ),
        clock=clock,
    )
    ghost = str(uuid.uuid4())
    processing = {"taskType": task_type, "taskUUID": ghost, "status": "processing"}
    for _ in range(2):
        assert await call(http, server, poll(ghost)) == (200, {"data": [processing]})
        clock.now += 3600
    [known] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(known, ghost))
    assert status == 200
    assert list(body) == ["data"]
    assert body["data"][0]["taskUUID"] == known
    assert body["data"][0]["status"] == "success"
    assert body["data"][1] == processing


# ---------------------------------------------------------------------------
# poll_batch


@pytest.mark.parametrize("mode", ["all", "first", "reject", "empty"])
@pytest.mark.parametrize("n", [1, 2, 3])
async def test_poll_batch_modes(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, mode: str, n: int
) -> None:
    """One getResponse is always answered; several as the mode says."""
    server = await make_sandbox(SandboxConfig(latency_s=0, poll_batch=mode))  # type: ignore[arg-type]
    uuids = await _submit(http, server, n)
    status, body = await call(http, server, poll(*uuids))
    answered = [i["taskUUID"] for i in body.get("data", [])]
    if n == 1 or mode == "all":
        assert (status, answered) == (200, uuids)
        assert all(i["status"] == "success" for i in body["data"])
    elif mode == "first":
        assert (status, body["data"][0]["taskUUID"]) == (200, uuids[0])
        assert answered == uuids[:1]
        assert "errors" not in body
    elif mode == "reject":
        assert status == 400
        assert [_without_message(e) for e in body["errors"]] == [
            {"code": "invalidRequestBody"}
        ]
        assert body["errors"][0]["message"] == "one getResponse task per request"
    else:
        assert (status, body) == (200, {"data": []})
    assert server.app[STATE].requests["getResponse"] == n


@pytest.mark.parametrize("mode", ["reject", "empty"])
async def test_refused_poll_batch_processes_nothing_of_the_request(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, mode: str
) -> None:
    """A submit in the same request as a refused poll batch is not accepted."""
    server = await make_sandbox(SandboxConfig(latency_s=0, poll_batch=mode))  # type: ignore[arg-type]
    [known] = await _submit(http, server, 1)
    task = inference(deliveryMethod="async")
    status, _ = await call(http, server, [task, *poll(known, known)])
    assert status == (400 if mode == "reject" else 200)
    state = server.app[STATE]
    assert state.submissions == 1
    assert task["taskUUID"] not in state.used_task_uuids


async def test_poll_batch_first_counts_every_get_response_sent(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """ "first": a later getResponse gets no item, not even its validation error;
    other task types of the request are answered as usual."""
    server = await make_sandbox(SandboxConfig(latency_s=0, poll_batch="first"))
    [known] = await _submit(http, server, 1)
    task = inference(deliveryMethod="async")
    bad_poll = {"taskType": "getResponse", "taskUUID": "not-a-uuid"}
    status, body = await call(http, server, [*poll(known), bad_poll, task])
    assert status == 200
    assert "errors" not in body
    assert [(i["taskUUID"], i["status"]) for i in body["data"]] == [
        (known, "success"),
        (task["taskUUID"], "processing"),
    ]


# ---------------------------------------------------------------------------
# poll_task_type and failed_as


@pytest.mark.parametrize("task_type", TASK_TYPES)
async def test_poll_items_carry_the_poll_task_type(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
    """Processing and success items of a poll say the dialect's taskType; the ack
    and a sync result say imageInference."""
    clock = FakeClock()
    server = await make_sandbox(
        SandboxConfig(latency_s=1, poll_task_type=task_type),  # type: ignore[arg-type]
        clock=clock,
    )
    task = inference(deliveryMethod="async")
    _, ack = await call(http, server, [task])
    assert ack == {
        "data": [
            {
                "taskType": "imageInference",
                "taskUUID": task["taskUUID"],
                "status": "processing",
            }
        ]
    }
    _, busy = await call(http, server, poll(task["taskUUID"]))
    assert busy == {
        "data": [
            {
                "taskType": task_type,
                "taskUUID": task["taskUUID"],
                "status": "processing",
            }
        ]
    }
    clock.now += 1
    _, done = await call(http, server, poll(task["taskUUID"]))
    [item] = done["data"]
    assert (item["taskType"], item["status"]) == (task_type, "success")
    assert item["imageUUID"]

    fast = await make_sandbox(
        SandboxConfig(latency_s=0, poll_task_type=task_type)  # type: ignore[arg-type]
    )
    status, sync = await call(http, fast, [inference()])
    assert status == 200
    assert sync["data"][0]["taskType"] == "imageInference"


@pytest.mark.parametrize("task_type", TASK_TYPES)
async def test_failed_as_errors(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
    """The default form: an errors item, in the poll taskType."""
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0,
            task_fail_rate=1.0,
            poll_task_type=task_type,  # type: ignore[arg-type]
        )
    )
    [failed] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(failed))
    assert status == 400
    assert list(body) == ["errors"]
    [error] = body["errors"]
    assert _without_message(error) == {
        "code": "inferenceError",
        "taskType": task_type,
        "taskUUID": failed,
        "status": "error",
    }


@pytest.mark.parametrize("task_type", TASK_TYPES)
async def test_failed_as_data_item(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
    """A data item with status "error" and a nested error, nothing in errors: 200."""
    server = await make_sandbox(
        SandboxConfig(
            latency_s=0,
            task_fail_rate=1.0,
            failed_as="data",
            poll_task_type=task_type,  # type: ignore[arg-type]
        )
    )
    [failed] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(failed))
    assert status == 200
    assert body == {
        "data": [
            {
                "taskType": task_type,
                "taskUUID": failed,
                "status": "error",
                "error": {
                    "code": "inferenceError",
                    "message": "the provider failed to generate the image",
                },
            }
        ]
    }
    [another] = await _submit(http, server, 1)  # fails too: task_fail_rate=1
    _, body = await call(http, server, poll(another, failed))
    assert [(i["taskUUID"], i["status"]) for i in body["data"]] == [
        (another, "error"),
        (failed, "error"),
    ]
    assert server.app[STATE].billed == {}


async def test_failed_as_data_for_a_render_failure(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """A reference that cannot be decoded fails the task; its reason is the message.
    A sync submit still answers with an errors item (failed_as is about polls)."""
    server = await make_sandbox(SandboxConfig(latency_s=0, failed_as="data"))
    task = inference(
        deliveryMethod="async", inputs={"referenceImages": [_truncated_png()]}
    )
    await call(http, server, [task])
    state = server.app[STATE]
    await _until(lambda: bool(state.tasks[task["taskUUID"]].failed))
    status, body = await call(http, server, poll(task["taskUUID"]))
    assert status == 200
    [item] = body["data"]
    assert (item["status"], item["error"]["code"]) == ("error", "inferenceError")
    assert "could not be decoded" in item["error"]["message"]
    status, body = await call(
        http, server, [inference(inputs={"referenceImages": [_truncated_png()]})]
    )
    assert status == 400
    assert body["errors"][0]["code"] == "inferenceError"


# ---------------------------------------------------------------------------
# reuse_code


@pytest.mark.parametrize("code", ["conflictTaskUUID", "duplicateTaskUUID"])
async def test_reuse_code(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, code: str
) -> None:
    """A taskUUID accepted before is refused with the code; nothing changes."""
    server = await make_sandbox(SandboxConfig(latency_s=0, reuse_code=code))  # type: ignore[arg-type]
    task = inference(deliveryMethod="async")
    await call(http, server, [task])
    status, body = await call(http, server, [task])
    assert status == 400
    [error] = body["errors"]
    assert _without_message(error) == {
        "code": code,
        "parameter": "taskUUID",
        "taskType": "imageInference",
        "taskUUID": task["taskUUID"],
    }
    twin = inference(deliveryMethod="async")
    status, body = await call(http, server, [twin, dict(twin)])
    assert status == 200
    assert [i["taskUUID"] for i in body["data"]] == [twin["taskUUID"]]
    assert [e["code"] for e in body["errors"]] == [code]
    state = server.app[STATE]
    assert (state.submissions, state.duplicate_task_uuids) == (2, 2)
    await _until(lambda: len(state.billed) == 2)


# ---------------------------------------------------------------------------
# ack


async def test_empty_ack(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """The task is accepted without an item; a later poll finds it."""
    clock = FakeClock()
    server = await make_sandbox(SandboxConfig(latency_s=1, ack="empty"), clock=clock)
    tasks = [inference(deliveryMethod="async") for _ in range(2)]
    assert await call(http, server, tasks) == (200, {"data": []})
    uuids = [t["taskUUID"] for t in tasks]
    _, body = await call(http, server, poll(*uuids))
    assert [(i["taskUUID"], i["status"]) for i in body["data"]] == [
        (u, "processing") for u in uuids
    ]
    clock.now += 1
    _, body = await call(http, server, poll(*uuids))
    assert [(i["taskUUID"], i["status"]) for i in body["data"]] == [
        (u, "success") for u in uuids
    ]
    assert server.app[STATE].submissions == 2


async def test_empty_ack_beside_a_refusal_is_still_a_success(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """Accepted but unacked tasks keep the answer at 200, errors beside; a sync task
    is answered with its result as before."""
    server = await make_sandbox(SandboxConfig(latency_s=0, ack="empty"))
    old = inference(deliveryMethod="async")
    await call(http, server, [old])
    new = inference(deliveryMethod="async")
    status, body = await call(http, server, [new, old])
    assert status == 200
    assert body["data"] == []
    assert [(e["code"], e["taskUUID"]) for e in body["errors"]] == [
        ("conflictTaskUUID", old["taskUUID"])
    ]
    assert server.app[STATE].task(new["taskUUID"]) is not None
    status, body = await call(http, server, [inference()])
    assert (status, body["data"][0]["status"]) == (200, "success")


# ---------------------------------------------------------------------------
# credit_usd


def _credit_refusal(task_uuid: str) -> Json:
    return {
        "code": "insufficientCredits",
        "parameter": "taskUUID",
        "taskType": "imageInference",
        "taskUUID": task_uuid,
    }


async def _credit(
    http: aiohttp.ClientSession, server: TestServer, add_usd: str | None = None
) -> tuple[int, Json]:
    url = server.make_url("/sandbox/credit")
    if add_usd is None:
        async with http.get(url) as resp:
            return resp.status, await resp.json()
    async with http.post(url, json={"add_usd": add_usd}) as resp:
        return resp.status, await resp.json()


async def test_credit_for_two_of_three(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """Two acks and one insufficientCredits at 200; the third is neither billed nor
    used, so after a top-up its taskUUID is accepted."""
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=2 * PRICE))
    state = server.app[STATE]
    tasks = [inference(deliveryMethod="async") for _ in range(3)]
    uuids = [t["taskUUID"] for t in tasks]
    status, body = await call(http, server, tasks)
    assert status == 200
    assert body["data"] == [
        {"taskType": "imageInference", "taskUUID": u, "status": "processing"}
        for u in uuids[:2]
    ]
    assert [_without_message(e) for e in body["errors"]] == [_credit_refusal(uuids[2])]
    assert state.credit_usd == 0
    assert state.submissions == 2
    assert uuids[2] not in state.used_task_uuids
    assert state.task(uuids[2]) is None
    await _until(lambda: len(state.billed) == 2)
    assert {b.task_uuid for b in state.billed.values()} == set(uuids[:2])

    status, body = await call(http, server, [tasks[2]])
    assert status == 402
    assert [_without_message(e) for e in body["errors"]] == [_credit_refusal(uuids[2])]
    assert await _credit(http, server, "0.08") == (200, {"credit_usd": "0.08"})
    status, body = await call(http, server, [tasks[2]])
    assert status == 200
    assert [i["taskUUID"] for i in body["data"]] == [uuids[2]]
    assert await _credit(http, server) == (200, {"credit_usd": "0.00"})
    await _until(lambda: len(state.billed) == 3)
    assert state.duplicate_task_uuids == 0


async def test_no_credit_at_all_is_402(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """Every imageInference refused for credit: 402 with each refusal."""
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=Decimal(0)))
    tasks = [inference(deliveryMethod="async"), inference()]
    status, body = await call(http, server, tasks)
    assert status == 402
    assert list(body) == ["errors"]
    assert [_without_message(e) for e in body["errors"]] == [
        _credit_refusal(t["taskUUID"]) for t in tasks
    ]
    state = server.app[STATE]
    assert (state.submissions, state.credit_usd, len(state.billed)) == (
        0,
        Decimal(0),
        0,
    )


async def test_402_only_when_every_refusal_is_for_credit(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """A reused taskUUID beside a credit refusal: nothing accepted, but not every
    imageInference lacked credit, so the usual 400."""
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=PRICE))
    old = inference(deliveryMethod="async")
    await call(http, server, [old])
    status, body = await call(http, server, [old, inference()])
    assert status == 400
    assert [e["code"] for e in body["errors"]] == [
        "conflictTaskUUID",
        "insufficientCredits",
    ]


async def test_credit_is_charged_in_array_order_by_price_and_results(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """price(renderingSpeed) * numberResults, task by task: a dear task that does
    not fit is refused and a cheaper one after it still accepted."""
    prices = {"TURBO": Decimal("0.03"), "DEFAULT": PRICE, "QUALITY": Decimal("0.1")}
    server = await make_sandbox(
        SandboxConfig(latency_s=0, prices_usd=prices, credit_usd=Decimal("0.25"))
    )
    quality = {"ideogram": {"renderingSpeed": "QUALITY"}}
    turbo = {"ideogram": {"renderingSpeed": "TURBO"}}
    tasks = [
        inference(deliveryMethod="async", numberResults=2, providerSettings=quality),
        inference(deliveryMethod="async", numberResults=2, providerSettings=quality),
        inference(deliveryMethod="async", numberResults=1, providerSettings=turbo),
    ]
    status, body = await call(http, server, tasks)
    assert status == 200
    assert [i["taskUUID"] for i in body["data"]] == [
        tasks[0]["taskUUID"],
        tasks[2]["taskUUID"],
    ]
    assert [e["taskUUID"] for e in body["errors"]] == [tasks[1]["taskUUID"]]
    assert server.app[STATE].credit_usd == Decimal("0.02")


async def test_a_failed_task_holds_its_charge_until_it_fails(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """A task is charged at acceptance (the sandbox's fault is not known to the
    account) and refunded once its failure is out."""
    server = await make_sandbox(
        SandboxConfig(latency_s=0.5, credit_usd=2 * PRICE, task_fail_rate=1.0)
    )
    state = server.app[STATE]
    uuids = await _submit(http, server, 2)
    assert state.credit_usd == 0
    assert (await call(http, server, [inference()]))[0] == 402
    await _until(lambda: state.credit_usd == 2 * PRICE)
    status, body = await call(http, server, poll(*uuids))
    assert status == 400
    assert [e["code"] for e in body["errors"]] == ["inferenceError"] * 2
    assert state.billed == {}


async def test_a_render_failure_is_refunded(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=PRICE))
    state = server.app[STATE]
    task = inference(
        deliveryMethod="async", inputs={"referenceImages": [_truncated_png()]}
    )
    await call(http, server, [task])
    await _until(lambda: state.credit_usd == PRICE)
    assert state.tasks[task["taskUUID"]].failed
    assert state.billed == {}


async def test_credit_endpoint(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """GET reads, POST adds; the /v1 key is required; bad amounts are refused;
    an unlimited account stays unlimited."""
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=Decimal("1")))
    assert await _credit(http, server) == (200, {"credit_usd": "1"})
    assert await _credit(http, server, "2.50") == (200, {"credit_usd": "3.50"})
    url = server.make_url("/sandbox/credit")
    async with aiohttp.ClientSession() as stranger:
        async with stranger.post(url, json={"add_usd": "9"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["errors"][0]["code"] == "missingApiKey"
        headers = {"Authorization": "Bearer wrong"}
        async with stranger.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["errors"][0]["code"] == "invalidApiKey"
    for bad in ("-1", "NaN", "lots"):
        status, body = await _credit(http, server, bad)
        assert (status, body["errors"][0]["code"]) == (400, "invalidParameter")
    async with http.post(url, data=b"[") as resp:
        assert resp.status == 400
    assert server.app[STATE].credit_usd == Decimal("3.50")

    unlimited = await make_sandbox(SandboxConfig(latency_s=0))
    assert await _credit(http, unlimited, "5") == (200, {"credit_usd": None})
    assert unlimited.app[STATE].credit_usd is None


def test_top_up_in_process() -> None:
    state = SandboxState(credit_usd=Decimal("0.5"))
    state.top_up(Decimal("0.25"))
    assert state.credit_usd == Decimal("0.75")
    with pytest.raises(ValueError, match="non-negative"):
        state.top_up(Decimal(-1))
    unlimited = SandboxState()
    unlimited.top_up(Decimal(1))
    assert unlimited.credit_usd is None


# ---------------------------------------------------------------------------
# config and CLI


@pytest.mark.parametrize(
    "overrides",
    [
        {"poll_task_type": "imageinference"},
        {"unknown_task": "notFound"},
        {"poll_batch": "some"},
        {"failed_as": "error"},
        {"reuse_code": "conflict"},
        {"ack": "none"},
        {"credit_usd": 0.5},
        {"credit_usd": Decimal(-1)},
        {"credit_usd": Decimal("Infinity")},
    ],
)
def test_config_refuses_unknown_dialects(overrides: Json) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        SandboxConfig(**overrides)


def test_defaults_are_the_original_answers() -> None:
    config = SandboxConfig()
    assert {name: getattr(config, name) for name in DIALECTS} == {
        "poll_task_type": "imageInference",
        "unknown_task": "taskFailedOrNotFound",
        "poll_batch": "all",
        "failed_as": "errors",
        "reuse_code": "conflictTaskUUID",
        "ack": "processing",
    }
    assert config.credit_usd is None


def test_sandbox_help_lists_every_dialect_switch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each switch is a flag with exactly the config's values, a help text and its
    default; --credit-usd names the top-up endpoint."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sandbox", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = SandboxConfig()
    for name, kind in DIALECTS.items():
        flag = "--" + name.replace("_", "-")
        assert f"{flag} {{{','.join(get_args(kind))}}}" in text
        assert f"(default: {getattr(defaults, name)})" in text
    assert "--credit-usd CREDIT_USD the account balance in USD" in text
    assert "POST /sandbox/credit" in text
    for option in (  # the options that came before the dialects have help too
        "--host HOST address",
        "--port PORT port",
        "--seed SEED seed",
        "--api-key API_KEY the key",
        "--latency LATENCY seconds",
        "--latency-jitter LATENCY_JITTER up to",
        "--failure-rate FAILURE_RATE share",
        "--server-error-rate SERVER_ERROR_RATE share",
        "--rate-limit-rate RATE_LIMIT_RATE share",
        "--max-in-flight MAX_IN_FLIGHT queue",
    ):
        assert option in text


def test_sandbox_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        [
            "sandbox",
            "--poll-task-type=getResponse",
            "--unknown-task=processing",
            "--poll-batch=reject",
            "--failed-as=data",
            "--reuse-code=duplicateTaskUUID",
            "--ack=empty",
            "--credit-usd=1.50",
        ]
    )
    config = sandbox_config(args)
    assert (
        config.poll_task_type,
        config.unknown_task,
        config.poll_batch,
        config.failed_as,
        config.reuse_code,
        config.ack,
        config.credit_usd,
    ) == (
        "getResponse",
        "processing",
        "reject",
        "data",
        "duplicateTaskUUID",
        "empty",
        Decimal("1.50"),
    )
    plain = sandbox_config(build_parser().parse_args(["sandbox"]))
    assert {n: getattr(plain, n) for n in DIALECTS} == {
        n: getattr(SandboxConfig(), n) for n in DIALECTS
    }
    assert plain.credit_usd is None


@pytest.mark.slow
def test_standalone_sandbox_tops_up_over_http() -> None:
    """`remix sandbox --credit-usd 0`: a submit is 402 until a POST to
    /sandbox/credit, as with curl, then accepted."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "pipeline", "sandbox", "--port", "0"]
    with subprocess.Popen(
        [*argv, "--credit-usd", "0", "--ack", "empty"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            api = proc.stdout.readline().strip()
            assert api.endswith("/v1")
            task = inference(deliveryMethod="async")
            status, body = _post(api, [task])
            assert (status, body["errors"][0]["code"]) == (402, "insufficientCredits")
            credit = api.removesuffix("/v1") + "/sandbox/credit"
            assert _post(credit, {"add_usd": "0.08"}) == (200, {"credit_usd": "0.08"})
            assert _post(api, [task]) == (200, {"data": []})
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert proc.returncode == 0


def _post(url: str, body: object) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer sandbox", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
