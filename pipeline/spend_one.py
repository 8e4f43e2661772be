"""``remix doctor --spend-one``: one real, paid task end to end, the cheapest there is
(the lowest-priced rendering speed at the smallest allowed size), to prove submit,
poll and download before a large run."""

from __future__ import annotations

import base64
import io
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Final, get_args

import anyio
from PIL import Image, ImageDraw

from pipeline.answers import describe
from pipeline.client import RunwareClient
from pipeline.config import Settings
from pipeline.errors import InsufficientCreditError, PipelineError
from pipeline.wire import (
    ALLOWED_SIZES,
    ImageInferenceRequest,
    ImageResult,
    RenderingSpeed,
)

log = logging.getLogger(__name__)

SPEED_ORDER: Final[tuple[str, ...]] = get_args(RenderingSpeed)
"""TURBO, DEFAULT, QUALITY: the tie-break between equal prices (fastest first)."""
PROMPT: Final = "a small test picture: a yellow sun over green hills"


@dataclass(frozen=True, slots=True)
class Spend:
    """The one real task of ``--spend-one``."""

    task_uuid: str
    rendering_speed: str
    width: int
    height: int
    price_usd: Decimal
    """What remix expected to pay (``settings.prices_usd``)."""
    seconds: float | None = None
    """From submit to the answer that carried the result."""
    cost_usd: Decimal | None = None
    """What the API reported (``includeCost``)."""
    image_bytes: int | None = None
    error: str | None = None
    credit_refused: bool = False


def cheapest_speed(settings: Settings) -> tuple[str, Decimal]:
    """The rendering speed with the lowest price (ties: the fastest)."""
    prices = [
        (settings.price_for(speed), SPEED_ORDER.index(speed), speed)
        for speed in SPEED_ORDER
    ]
    price, _, speed = min(prices)
    return speed, price


def smallest_size() -> tuple[int, int]:
    """The allowed size with the fewest pixels (ties: a documented landscape one)."""
    return min(ALLOWED_SIZES, key=lambda wh: (wh[0] * wh[1], wh[1] > wh[0], wh))


def tiny_reference() -> str:
    """A small real picture as a PNG data URI (a few kB)."""
    img = Image.new("RGB", (256, 256), (70, 130, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 170, 256, 256), fill=(60, 150, 70))
    draw.ellipse((150, 30, 210, 90), fill=(250, 220, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def spend_one(
    client: RunwareClient,
    settings: Settings,
    announce: Callable[[str], None] | None,
    out: Path | None,
) -> Spend:
    """Send the one task (announced with its price first) and fetch its image; every
    failure is recorded in the ``Spend``, not raised (but a run-fatal poll error)."""
    speed, price = cheapest_speed(settings)
    width, height = smallest_size()
    task_uuid = uuid.uuid4()
    request = ImageInferenceRequest.model_validate(
        {
            "taskUUID": task_uuid,
            "positivePrompt": PROMPT,
            "width": width,
            "height": height,
            "inputs": {"referenceImages": [tiny_reference()]},
            "deliveryMethod": "async",
            "includeCost": True,
            "numberResults": 1,
            "providerSettings": {"ideogram": {"renderingSpeed": speed}},
        },
        by_alias=True,
        by_name=False,
    )
    spend = Spend(str(task_uuid), speed, width, height, price)
    if announce is not None:
        announce(
            f"--spend-one: sending 1 {speed} task at {width}x{height}; "
            f"it will cost about ${price}"
        )
    started = time.monotonic()
    try:
        result = await _run_one(client, settings, request, started)
    except InsufficientCreditError as exc:
        return replace(spend, error=str(exc), credit_refused=True)
    except _SpendFailedError as exc:
        return replace(spend, error=str(exc), credit_refused=exc.credit)
    except PipelineError as exc:
        return replace(spend, error=str(exc))
    seconds = time.monotonic() - started
    try:
        data = await client.fetch_image(result)
    except PipelineError as exc:
        return replace(
            spend, seconds=seconds, cost_usd=result.cost, error=f"download: {exc}"
        )
    spend = replace(spend, seconds=seconds, cost_usd=result.cost, image_bytes=len(data))
    if out is not None:
        try:
            await anyio.Path(out).write_bytes(data)
        except OSError as exc:
            return replace(spend, error=f"cannot write {out}: {exc.strerror or exc}")
    return spend


class _SpendFailedError(Exception):
    def __init__(self, message: str, *, credit: bool = False) -> None:
        super().__init__(message)
        self.credit = credit


async def _run_one(
    client: RunwareClient,
    settings: Settings,
    request: ImageInferenceRequest,
    started: float,
) -> ImageResult:
    """Submit, then poll until the result (protocol §7: an unknown submit outcome is
    asked about, then sent again under the same taskUUID once)."""
    task_uuid = str(request.task_uuid)
    outcome = await client.submit([request])
    if (credit := outcome.credit_refused.get(task_uuid)) is not None:
        raise _SpendFailedError(f"refused: {describe([credit])}", credit=True)
    if (error := outcome.failed.get(task_uuid)) is not None:
        raise _SpendFailedError(f"refused: {describe([error])}")
    for result in outcome.results:
        if result.task_uuid == task_uuid:
            return result
    resent = task_uuid not in outcome.ambiguous
    poll = settings.poll
    gap = max(poll.interval_s, poll.min_interval_s)
    while True:
        await anyio.sleep(gap)
        gap = min(max(gap * 1.5, poll.min_interval_s), poll.max_interval_s)
        now = time.monotonic()
        if now - started > poll.deadline_s:
            raise _SpendFailedError(
                f"no result after {now - started:.0f}s (poll.deadline_s); "
                "the task may still finish and be billed"
            )
        try:
            answer = await client.poll([task_uuid])
        except PipelineError as exc:
            if exc.run_fatal:
                raise
            log.warning("--spend-one: a poll failed (%s); asking again", exc)
            continue
        for result in answer.results:
            if result.task_uuid == task_uuid:
                return result
        if (error := answer.failed.get(task_uuid)) is not None:
            raise _SpendFailedError(f"failed: {describe([error])}")
        if not resent and now - started >= poll.not_found_grace_s:
            # Safe whatever the answers said: a conflict means it was accepted.
            resent = True
            again = await client.submit_wire([request.wire])
            if (credit := again.credit_refused.get(task_uuid)) is not None:
                raise _SpendFailedError(f"refused: {describe([credit])}", credit=True)
            if (error := again.failed.get(task_uuid)) is not None:
                raise _SpendFailedError(f"refused: {describe([error])}")
