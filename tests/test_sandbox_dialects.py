"""The sandbox's dialect switches over real sockets: each answers as documented in
SandboxConfig (runware-protocol.md §10), and the defaults are unchanged."""

from __future__ import annotations

import argparse
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pipeline.cli import build_parser
from pipeline.sandbox import STATE, SandboxConfig
from tests.test_sandbox import (
    FakeClock,
    MakeSandbox,
    call,
    inference,
    poll,
)

Json = dict[str, Any]


async def _submit(
    http: aiohttp.ClientSession, server: TestServer, n: int, **overrides: Any
) -> list[str]:
    tasks = [inference(deliveryMethod="async", **overrides) for _ in range(n)]
    await call(http, server, tasks)
    return [t["taskUUID"] for t in tasks]


@pytest.mark.parametrize(
    "code", ["taskFailedOrNotFound", "taskNotFound", "taskExpired"]
)
async def test_unknown_task_as_a_code(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, code: str
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0, unknown_task=code))  # type: ignore[arg-type]
    ghost = str(uuid.uuid4())
    status, body = await call(http, server, poll(ghost))
    assert status == 400
    [error] = body["errors"]
    assert (error["code"], error["taskUUID"], error["status"]) == (code, ghost, "error")
    [known] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(known, ghost))
    assert status == 200
    assert [e["taskUUID"] for e in body["errors"]] == [ghost]
    assert [i["taskUUID"] for i in body["data"]] == [known]


async def test_unknown_task_silent(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0, unknown_task="silent"))
    ghost = str(uuid.uuid4())
    assert await call(http, server, poll(ghost)) == (200, {"data": []})
    [known] = await _submit(http, server, 1)
    status, body = await call(http, server, poll(ghost, known))
    assert status == 200
    assert [i["taskUUID"] for i in body["data"]] == [known]
    assert "errors" not in body


@pytest.mark.parametrize("task_type", ["imageInference", "getResponse"])
async def test_unknown_task_processing_forever(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
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
    for _ in range(2):
        status, body = await call(http, server, poll(ghost))
        assert status == 200
        assert body == {
            "data": [{"taskType": task_type, "taskUUID": ghost, "status": "processing"}]
        }
        clock.now += 3600


@pytest.mark.parametrize("mode", ["all", "first", "reject", "empty"])
@pytest.mark.parametrize("n", [1, 2, 3])
async def test_poll_batch_modes(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, mode: str, n: int
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0, poll_batch=mode))  # type: ignore[arg-type]
    uuids = await _submit(http, server, n)
    status, body = await call(http, server, poll(*uuids))
    answered = [i["taskUUID"] for i in body.get("data", [])]
    if n == 1 or mode == "all":
        assert (status, answered) == (200, uuids)
    elif mode == "first":
        assert (status, answered) == (200, uuids[:1])
    elif mode == "reject":
        assert status == 400
        assert body["errors"][0]["code"] == "invalidRequestBody"
        assert not answered
    else:
        assert (status, body) == (200, {"data": []})
    assert server.app[STATE].requests["getResponse"] == n


@pytest.mark.parametrize("task_type", ["imageInference", "getResponse"])
async def test_poll_items_carry_the_dialects_task_type(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
    clock = FakeClock()
    server = await make_sandbox(
        SandboxConfig(latency_s=1, poll_task_type=task_type),  # type: ignore[arg-type]
        clock=clock,
    )
    task = inference(deliveryMethod="async")
    _, ack = await call(http, server, [task])
    assert ack["data"][0]["taskType"] == "imageInference"  # the submit's own answer
    _, busy = await call(http, server, poll(task["taskUUID"]))
    clock.now += 1
    _, done = await call(http, server, poll(task["taskUUID"]))
    assert busy["data"][0]["taskType"] == task_type
    assert (done["data"][0]["taskType"], done["data"][0]["status"]) == (
        task_type,
        "success",
    )


@pytest.mark.parametrize("task_type", ["imageInference", "getResponse"])
async def test_failed_as_data_item(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession, task_type: str
) -> None:
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
    assert "errors" not in body
    [item] = body["data"]
    assert item["taskType"] == task_type
    assert (item["taskUUID"], item["status"]) == (failed, "error")
    assert item["error"]["code"] == "inferenceError"
    assert item["error"]["message"]
    assert server.app[STATE].billed == {}


async def test_reuse_code(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    server = await make_sandbox(
        SandboxConfig(latency_s=0, reuse_code="duplicateTaskUUID")
    )
    task = inference(deliveryMethod="async")
    await call(http, server, [task])
    status, body = await call(http, server, [task])
    assert status == 400
    assert [e["code"] for e in body["errors"]] == ["duplicateTaskUUID"]
    state = server.app[STATE]
    assert (state.submissions, state.duplicate_task_uuids) == (1, 1)


async def test_empty_ack(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    server = await make_sandbox(SandboxConfig(latency_s=0, ack="empty"))
    task = inference(deliveryMethod="async")
    assert await call(http, server, [task]) == (200, {"data": []})
    _, body = await call(http, server, poll(task["taskUUID"]))
    assert body["data"][0]["status"] == "success"
    assert server.app[STATE].submissions == 1


async def test_credit_refusals_beside_acks_and_a_top_up(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    """Credit for 2 tasks of 3: two acks and one insufficientCredits (200); the
    refused one is neither billed nor used, so after a top-up its UUID is accepted."""
    server = await make_sandbox(SandboxConfig(latency_s=0, credit_usd=Decimal("0.16")))
    state = server.app[STATE]
    tasks = [inference(deliveryMethod="async") for _ in range(3)]
    status, body = await call(http, server, tasks)
    assert status == 200
    assert [i["taskUUID"] for i in body["data"]] == [t["taskUUID"] for t in tasks[:2]]
    [refusal] = body["errors"]
    assert (refusal["code"], refusal["taskUUID"]) == (
        "insufficientCredits",
        tasks[2]["taskUUID"],
    )
    assert state.credit_usd == 0
    status, body = await call(http, server, [tasks[2]])
    assert status == 402
    assert body["errors"][0]["code"] == "insufficientCredits"
    url = server.make_url("/sandbox/credit")
    async with http.post(url, json={"add_usd": "0.08"}) as resp:
        assert (resp.status, await resp.json()) == (200, {"credit_usd": "0.08"})
    status, body = await call(http, server, [tasks[2]])
    assert (status, body["data"][0]["taskUUID"]) == (200, tasks[2]["taskUUID"])
    await call(http, server, poll(*(t["taskUUID"] for t in tasks)))
    assert len(state.billed) == 3
    assert state.duplicate_task_uuids == 0
    async with http.get(url) as resp:
        assert await resp.json() == {"credit_usd": "0.00"}
    async with (
        aiohttp.ClientSession() as stranger,
        stranger.post(url, json={"add_usd": "9"}) as resp,
    ):
        assert resp.status == 401
    async with http.post(url, json={"add_usd": "-1"}) as resp:
        assert resp.status == 400


async def test_a_failed_task_is_refunded(
    make_sandbox: MakeSandbox, http: aiohttp.ClientSession
) -> None:
    server = await make_sandbox(
        SandboxConfig(latency_s=0, credit_usd=Decimal("0.24"), task_fail_rate=1.0)
    )
    await _submit(http, server, 2)
    assert server.app[STATE].credit_usd == Decimal("0.24")


def _help(command: str) -> str:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return str(action.choices[command].format_help())
    raise AssertionError("no subcommands")


async def test_sandbox_help_lists_every_dialect_switch() -> None:
    text = _help("sandbox")
    for flag in (
        "--poll-task-type",
        "--unknown-task",
        "--poll-batch",
        "--failed-as",
        "--reuse-code",
        "--ack",
        "--credit-usd",
        "/sandbox/credit",
    ):
        assert flag in text
    assert "(default:" in text
