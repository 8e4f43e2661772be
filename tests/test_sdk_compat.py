"""The official runware-sdk (1.8.x, REST transport) works against the sandbox unchanged.

The SDK sends exactly the caller's parameters plus ``taskType``, ``taskUUID`` and
``deliveryMethod`` (it defaults to ``async``), with ``Authorization: Bearer``; all are
documented keys, so the sandbox's strict models accept it as is. ``validate=False``
(the SDK default) keeps it from calling Runware's ``/resolve`` endpoint.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from pipeline.sandbox import STATE, SandboxConfig

runware = pytest.importorskip("runware")

MakeSandbox = Callable[..., Awaitable[TestServer]]

PARAMS: dict[str, Any] = {
    "taskType": "imageInference",
    "model": "ideogram:3@2",
    "positivePrompt": "Transform the reference into an origami market atrium",
    "width": 1216,
    "height": 832,
    "numberResults": 2,
    "includeCost": True,
    "providerSettings": {"ideogram": {"magicPrompt": "OFF", "styleType": "DESIGN"}},
    "inputs": {"referenceImages": ["https://assets.example.com/inputs/atrium.jpg"]},
}


@pytest.mark.parametrize("delivery", ["sync", "async"])
async def test_sdk_image_inference(make_sandbox: MakeSandbox, delivery: str) -> None:
    """runware-sdk completes a sync and an async ideogram:3@2 task on the sandbox."""
    server = await make_sandbox(SandboxConfig(latency_s=0, result_stagger_s=0))
    client = runware.Runware(
        api_key="sandbox",
        transport="rest",
        http_base_url=str(server.make_url("/v1")),
        validate=False,
        max_retries=0,
    )
    async with client:
        results = await client.run({**PARAMS, "deliveryMethod": delivery})
    assert len(results) == 2
    assert len({r["imageUUID"] for r in results}) == 2
    state = server.app[STATE]
    assert state.submissions == 1
    assert state.duplicate_task_uuids == 0
    async with aiohttp.ClientSession() as http:
        for result in results:
            async with http.get(result["imageURL"]) as resp:
                data = await resp.read()
            assert Image.open(io.BytesIO(data)).size == (1216, 832)
            assert float(result["cost"]) == pytest.approx(0.08)
    assert state.requests["getResponse"] == (1 if delivery == "async" else 0)
