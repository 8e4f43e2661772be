"""The Runware-compatible aiohttp.web application: task arrays in, envelopes out.

One POST endpoint (``/v1``) takes arrays of imageInference, getResponse, imageUpload and
authentication tasks, validates each with the shared ``wire`` models (by alias only, so
snake_case fails), and answers ``{"data": [...]}`` / ``{"errors": [...]}`` with the
documented statuses; ``answers.py`` words every item, in the dialect the config picks
for the undocumented parts (runware-protocol.md §10). Results are served under
``/images/``; ``/sandbox/credit`` reads and tops up the balance when the config sets
one. Latency, limits and faults come from ``SandboxConfig``; task state is lazy on the
injected clock. One background job per accepted task renders and bills its images at
completion and fires its webhook and uploadEndpoint, so work is paid for even when
nobody polls (as on the real API).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import io
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

import aiohttp
import anyio
import anyio.to_thread
from aiohttp import web
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import ValidationError
from yarl import URL

from pipeline.sandbox.answers import (
    Ack,
    FailedAs,
    Outcome,
    PollBatch,
    PollTaskType,
    ReuseCode,
    UnknownTask,
    add_failure,
    add_unknown_task,
    credit_refusal,
    error_item,
    failure_error,
    poll_batch_refusal,
    processing_item,
    retry_response,
    reuse_refusal,
    validation_error,
)
from pipeline.sandbox.faults import Fault, FaultInjector, FaultRates
from pipeline.sandbox.render import (
    FORMATS,
    RenderSpec,
    Source,
    auto_style,
    hex_to_rgb,
    placeholder,
    preset_palette,
    render,
    sniff,
)
from pipeline.sandbox.state import (
    ImageSlot,
    SandboxState,
    SandboxTask,
    StoredImage,
    content_key,
)
from pipeline.wire import (
    DEFAULT_PRICE_USD,
    REQUEST_ADAPTER,
    RESULT_KEYS,
    AuthenticationRequest,
    ErrorItem,
    GetResponseRequest,
    ImageInferenceRequest,
    ImageResult,
    ImageUploadRequest,
    UploadResult,
    error_body,
    image_ref_kind,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Job = Callable[[], Coroutine[Any, Any, None]]
JsonObject = dict[str, Any]

API_PATH: Final = "/v1"
IMAGES_PATH: Final = "/images"
CREDIT_PATH: Final = "/sandbox/credit"
_OWN_IMAGE = re.compile(r"^/images/([0-9a-fA-F-]{36})\.[A-Za-z0-9]+$")
_UPLOAD_PLACEHOLDER_SIZE: Final = (1024, 576)


def _default_prices() -> Mapping[str, Decimal]:
    return MappingProxyType(
        dict.fromkeys(("TURBO", "DEFAULT", "QUALITY"), DEFAULT_PRICE_USD)
    )


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """How the sandbox behaves: latency, limits, prices and which faults to play."""

    seed: int = 0
    api_key: str | None = field(default="sandbox", repr=False)
    """The key clients must send; None accepts any key (or none)."""
    latency_s: float = 0.3
    latency_jitter_s: float = 0.0
    result_stagger_s: float = 0.05
    """With numberResults > 1, image i finishes i * this after the first."""
    max_in_flight: int | None = None
    """Queue capacity in tasks; a submit beyond it gets 429 and nothing is accepted."""
    server_error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_s: float = 1.0
    drop_after_accept_rate: float = 0.0
    malformed_rate: float = 0.0
    download_failure_rate: float = 0.0
    slow_response_s: float = 0.0
    slow_download_s: float = 0.0
    """Extra delay before an image download is answered (a slow CDN)."""
    upload_latency_s: float = 0.0
    """How long one imageUpload takes (a big reference on a slow uplink)."""
    task_fail_rate: float = 0.0
    prices_usd: Mapping[str, Decimal] = field(
        default_factory=_default_prices, hash=False
    )
    """Price per image by renderingSpeed."""
    image_ttl_s: int = 3600
    """How long result URLs live when the request sets no ttl."""
    render_scale: float = 1.0
    """Render images this much smaller (benchmarks); reported sizes are unchanged."""
    fault_task_types: frozenset[str] | None = None
    """Only requests holding one of these task types get request faults (None: all)."""

    # -- dialects: how the undocumented parts are answered (runware-protocol.md §10)
    poll_task_type: PollTaskType = "imageInference"
    """The taskType of every item of a getResponse answer."""
    unknown_task: UnknownTask = "taskFailedOrNotFound"
    """How getResponse answers a taskUUID it does not know: an error with that code,
    no item at all, or a "processing" item forever."""
    poll_batch: PollBatch = "all"
    """A request asking about several tasks: each answered, only the first, refused
    with 400, or answered 200 with nothing."""
    failed_as: FailedAs = "errors"
    """A failed generation in a getResponse answer: an ``errors`` item, or a ``data``
    item with status "error" and a nested ``error``."""
    reuse_code: ReuseCode = "conflictTaskUUID"
    """The code refusing an imageInference whose taskUUID was accepted before."""
    ack: Ack = "processing"
    """An accepted async task is acknowledged with a processing item, or not at all."""
    credit_usd: Decimal | None = None
    """The account's balance (None: unlimited). A task is charged when accepted; one
    that does not fit is refused with insufficientCredits (HTTP 402 when nothing in
    the request was accepted). Top up with ``SandboxState.top_up`` or POST
    /sandbox/credit."""

    def __post_init__(self) -> None:
        if self.render_scale <= 0:
            raise ValueError("render_scale must be positive")
        self.fault_rates()  # validates the rates

    def price_for(self, rendering_speed: str | None) -> Decimal:
        """USD per image for a renderingSpeed (None means DEFAULT)."""
        speed = rendering_speed or "DEFAULT"
        return self.prices_usd.get(speed, DEFAULT_PRICE_USD)

    def fault_rates(self) -> FaultRates:
        return FaultRates(
            server_error=self.server_error_rate,
            rate_limit=self.rate_limit_rate,
            drop_after_accept=self.drop_after_accept_rate,
            malformed=self.malformed_rate,
            download_failure=self.download_failure_rate,
            task_fail=self.task_fail_rate,
        )


class _TaskError(Exception):
    """A per-task problem that becomes one item of the response's ``errors``."""

    def __init__(self, code: str, message: str, parameter: str | list[str]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.parameter = parameter


class Sandbox:
    """The app's runtime: config, state, faults, clock and the background job sink."""

    def __init__(self, config: SandboxConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.state = SandboxState(seed=config.seed, credit_usd=config.credit_usd)
        self.faults = FaultInjector(
            config.fault_rates(), seed=config.seed, task_types=config.fault_task_types
        )
        self.session: aiohttp.ClientSession | None = None
        self.jobs: MemoryObjectSendStream[Job] | None = None

    # -- auth ------------------------------------------------------------------

    def authorised(self, key: str | None) -> bool:
        expected = self.config.api_key
        if expected is None:
            return True
        return key is not None and hmac.compare_digest(key.encode(), expected.encode())

    # -- per-request processing ----------------------------------------------------

    async def process(
        self, tasks: list[JsonObject], origin: str
    ) -> Outcome | web.Response:
        """Answer every task of one request; a 429 response when over capacity."""
        now = self.clock()
        parsed: list[Any] = []
        for obj in tasks:
            try:
                # JSON mode: strict models still take UUID strings and enum values.
                parsed.append(
                    REQUEST_ADAPTER.validate_json(json.dumps(obj), by_name=False)
                )
            except ValidationError as exc:
                parsed.append(validation_error(obj, exc))

        polls = [
            i for i, req in enumerate(parsed) if isinstance(req, GetResponseRequest)
        ]
        answered_polls = set(polls)
        if len(polls) > 1 and self.config.poll_batch != "all":
            match self.config.poll_batch:
                case "reject":
                    return poll_batch_refusal()
                case "empty":
                    return Outcome()
                case "first":
                    answered_polls = {polls[0]}

        seen: set[str] = set()
        conflicts: set[int] = set()
        for i, req in enumerate(parsed):
            if isinstance(req, ImageInferenceRequest):
                key = str(req.task_uuid)
                if key in self.state.used_task_uuids or key in seen:
                    conflicts.add(i)
                seen.add(key)
        accepting = sum(isinstance(req, ImageInferenceRequest) for req in parsed) - len(
            conflicts
        )
        limit = self.config.max_in_flight
        if (
            limit is not None
            and accepting
            and self.state.in_flight(now) + accepting > limit
        ):
            return retry_response(
                429,
                "rateLimitExceeded",
                f"queue capacity of {limit} tasks exceeded; retry later",
                self.config.retry_after_s,
            )

        outcome = Outcome()
        sync_tasks: list[SandboxTask] = []
        accepted: list[SandboxTask] = []
        credit_refused = 0
        for i, (obj, req) in enumerate(zip(tasks, parsed, strict=True)):
            match req:
                case ErrorItem():
                    outcome.errors.append(
                        req.model_dump(mode="json", exclude_none=True)
                    )
                case ImageInferenceRequest():
                    raw_uuid = str(obj.get("taskUUID"))
                    if i in conflicts:
                        self.state.duplicate_task_uuids += 1
                        outcome.errors.append(
                            reuse_refusal(self.config.reuse_code, raw_uuid)
                        )
                        continue
                    charge = self.config.price_for(_speed(req)) * req.images
                    balance = self.state.credit_usd
                    if balance is not None and charge > balance:
                        credit_refused += 1
                        outcome.errors.append(credit_refusal(raw_uuid, balance, charge))
                        continue
                    try:
                        task = await self._accept(req, raw_uuid, origin, now)
                    except _TaskError as exc:
                        outcome.errors.append(
                            error_item(
                                exc.code,
                                exc.message,
                                exc.parameter,
                                "imageInference",
                                raw_uuid,
                            )
                        )
                        continue
                    self.state.charge(task, charge)
                    if task.failed:
                        self.state.refund(task)
                    accepted.append(task)
                    if req.delivery_method != "async":
                        sync_tasks.append(task)
                    elif self.config.ack == "processing":
                        outcome.data.append(processing_item(task.task_uuid))
                case GetResponseRequest():
                    if i in answered_polls:
                        await self._poll(str(obj.get("taskUUID")), outcome)
                case ImageUploadRequest():
                    try:
                        outcome.data.append(
                            await self._upload(req, str(obj.get("taskUUID")), origin)
                        )
                    except _TaskError as exc:
                        outcome.errors.append(
                            error_item(
                                exc.code,
                                exc.message,
                                exc.parameter,
                                "imageUpload",
                                str(obj.get("taskUUID")),
                            )
                        )
                case AuthenticationRequest():
                    outcome.errors.append(
                        error_item(
                            "invalidParameter",
                            "the authentication task must be the first of the array",
                            "taskType",
                            "authentication",
                            None,
                        )
                    )
                case _:
                    raise AssertionError("unreachable")
        if credit_refused and not accepted and not outcome.data:
            outcome.payment_required = True
        self._start_completion(accepted)
        if sync_tasks:
            await self._sleep_until(max(t.done_at for t in sync_tasks))
            for task in sync_tasks:
                await self._task_items(task, self.clock(), outcome, processing=False)
        return outcome

    async def _poll(self, task_uuid: str, outcome: Outcome) -> None:
        task = self.state.task(task_uuid)
        if task is None:
            add_unknown_task(
                outcome,
                task_uuid,
                self.config.unknown_task,
                self.config.poll_task_type,
            )
            return
        await self._task_items(task, self.clock(), outcome, processing=True)

    async def _task_items(
        self, task: SandboxTask, now: float, outcome: Outcome, *, processing: bool
    ) -> None:
        """Success items for finished images, a processing item while any remain.

        ``processing``: a getResponse answer (its items carry the dialect's taskType
        and failures its form), not a sync submit answer.
        """
        task_type = self.config.poll_task_type if processing else "imageInference"
        finished = task.finished(now)
        for slot in finished:
            item = await self._success_item(task, slot)
            if item is not None:
                outcome.data.append({**item, "taskType": task_type})
        if task.failed:
            if not task.is_done(now):
                if processing:
                    outcome.data.append(processing_item(task.task_uuid, task_type))
            elif processing:
                add_failure(outcome, task, task_type, self.config.failed_as)
            else:
                outcome.errors.append(failure_error(task))
        elif processing and len(finished) < len(task.images):
            outcome.data.append(processing_item(task.task_uuid, task_type))

    # -- tasks -----------------------------------------------------------------

    async def _accept(
        self, req: ImageInferenceRequest, raw_uuid: str, origin: str, now: float
    ) -> SandboxTask:
        reference = await self._resolve(
            req.inputs.reference_images[0], "inputs.referenceImages"
        )
        ideogram = req.provider_settings.ideogram if req.provider_settings else None
        style_refs: tuple[Source, ...] = ()
        palette: tuple[tuple[tuple[int, int, int], float], ...] = ()
        if ideogram is not None:
            if ideogram.style_reference_images:
                style_refs = tuple(
                    [
                        await self._resolve(
                            ref, "providerSettings.ideogram.styleReferenceImages"
                        )
                        for ref in ideogram.style_reference_images
                    ]
                )
            if ideogram.color_palette is not None:
                if ideogram.color_palette.name is not None:
                    palette = preset_palette(ideogram.color_palette.name)
                else:
                    palette = tuple(
                        (hex_to_rgb(m.color_hex), m.color_weight or 1.0)
                        for m in ideogram.color_palette.members or ()
                    )
        config = self.config
        first = now + config.latency_s + self.state.jitter(config.latency_jitter_s)
        slots = [
            ImageSlot(
                index=i,
                image_uuid=self.state.new_uuid(),
                seed=self.state.new_seed(),
                ready_at=first + i * config.result_stagger_s,
            )
            for i in range(req.images)
        ]
        task = SandboxTask(
            task_uuid=raw_uuid,
            request=req,
            content_key=content_key(req),
            submitted_at=now,
            done_at=max(slot.ready_at for slot in slots),
            images=slots,
            failed=self.faults.roll(Fault.TASK_FAIL),
            origin=origin,
            reference=reference,
            style_refs=style_refs,
            spec=RenderSpec(
                width=req.width,
                height=req.height,
                seed=0,
                style_type=_style_for(req),
                palette=palette,
                remix_strength=(ideogram.remix_strength if ideogram else None) or 50,
                output_format=req.output_format or "JPG",
                quality=req.output_quality or 95,
                scale=config.render_scale,
            ),
        )
        self.state.add_task(task, now)
        log.debug("accepted task %s (%d images)", raw_uuid, len(slots))
        return task

    async def _success_item(
        self, task: SandboxTask, slot: ImageSlot
    ) -> JsonObject | None:
        data = await self._ensure_image(task, slot)
        if data is None:
            return None
        req = task.request
        output_type = req.output_type or "URL"
        _, ext, mime = FORMATS[task.spec.output_format]
        payload: str
        match output_type:
            case "URL":
                payload = f"{task.origin}{IMAGES_PATH}/{slot.image_uuid}.{ext}"
            case "dataURI":
                payload = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            case "base64Data":
                payload = base64.b64encode(data).decode()
        result: JsonObject = {
            "taskType": "imageInference",
            "taskUUID": task.task_uuid,
            "imageUUID": slot.image_uuid,
            "status": "success",
            RESULT_KEYS[output_type]: payload,
            "seed": slot.seed,
        }
        if req.include_cost:
            result["cost"] = self._price(task)
        if req.safety is not None and req.safety.check_content:
            result["NSFWContent"] = False
        # Round-trip through the shared response model: what we send, the client reads.
        return ImageResult.model_validate(result).model_dump(
            mode="json", exclude_none=True
        )

    def _price(self, task: SandboxTask) -> Decimal:
        return self.config.price_for(_speed(task.request))

    async def _ensure_image(self, task: SandboxTask, slot: ImageSlot) -> bytes | None:
        """Render a finished image once, store it for download, and bill it."""
        if slot.data is not None:
            return slot.data
        async with task.lock:
            return await self._render_locked(task, slot)

    async def _prerender(self, task: SandboxTask, slot: ImageSlot) -> bytes | None:
        """Render ahead of ``ready_at`` so results are on time however many finish at
        once (the real API's latency is the latency; ours must not add render time)."""
        if slot.rendered is None and not task.failed:
            try:
                slot.rendered = await anyio.to_thread.run_sync(_render_slot, task, slot)
            except ValueError as exc:
                self._render_failed(task, exc)
        return slot.rendered

    async def _render_locked(self, task: SandboxTask, slot: ImageSlot) -> bytes | None:
        # Another caller may have published it while we waited for the lock.
        if slot.data is not None or task.failed:
            return slot.data
        data = await self._prerender(task, slot)
        if data is None:
            return None
        slot.sha256 = hashlib.sha256(data).hexdigest()
        slot.data = data
        _, ext, mime = FORMATS[task.spec.output_format]
        ttl_s = task.request.ttl or self.config.image_ttl_s
        self.state.images[slot.image_uuid] = StoredImage(
            data=data, ext=ext, content_type=mime, expires_at=slot.ready_at + ttl_s
        )
        self.state.bill(task, slot, self._price(task))
        return data

    def _start_completion(self, tasks: list[SandboxTask]) -> None:
        """Background jobs that finish, bill and deliver the tasks of one request:
        one for all those with nothing to deliver (a job per task woke hundreds at
        once when a cohort finished, just as the client's polls and next submit
        arrived), one per task with a webhook or an upload endpoint."""
        if self.jobs is None or not tasks:
            return
        quiet: list[SandboxTask] = []
        for task in tasks:
            if _delivers(task):
                self.jobs.send_nowait(functools.partial(self._complete, task))
            else:
                quiet.append(task)
        if quiet:
            self.jobs.send_nowait(functools.partial(self._complete_quietly, quiet))

    async def _complete_quietly(self, tasks: list[SandboxTask]) -> None:
        """Render ahead, then publish and bill each image at its ready time.

        The request's images render in one worker-thread hop, not a hop and a task
        per image, and halfway to their ready time, not at once: a submit comes
        just when a cohort finished and the client's polls and next submit arrive,
        and a render thread holds the GIL against the loop (at L = 5 s, a hop per
        image or 4 threads: 17-21 ms before the next submit was accepted, 12-15 ms
        with one hop at once, 5 with one hop midway; poll lag 18-20 -> 14-16 ms). A
        full-size render takes ~23 ms, so a 50-task submit takes ~1.2 s; a poll
        renders any image whose turn has not come (the same bytes: rendering is
        deterministic).
        """
        todo = sorted(
            ((task, slot) for task in tasks for slot in task.images),
            key=lambda pair: pair[1].ready_at,
        )
        if todo:  # render midway: the moment of a submit is a busy one
            now = self.clock()
            await self._sleep_until(now + (todo[0][1].ready_at - now) / 2)

        def render_each() -> list[bytes | ValueError]:
            out: list[bytes | ValueError] = []
            for task, slot in todo:
                try:
                    out.append(_render_slot(task, slot))
                except ValueError as exc:
                    out.append(exc)
            return out

        rendered = await anyio.to_thread.run_sync(render_each)
        for (task, slot), result in zip(todo, rendered, strict=True):
            if isinstance(result, ValueError):
                self._render_failed(task, result)
            elif slot.rendered is None:
                slot.rendered = result
        for task, slot in todo:
            await self._sleep_until(slot.ready_at)
            await self._ensure_image(task, slot)

    def _render_failed(self, task: SandboxTask, exc: ValueError) -> None:
        if not task.failed:
            log.info("task %s failed to render: %s", task.task_uuid, exc)
            task.failed = True
            task.failure = str(exc)
            self.state.refund(task)

    async def _prerender_all(self, task: SandboxTask) -> None:
        for slot in task.images:
            async with task.lock:
                await self._prerender(task, slot)

    async def _complete(self, task: SandboxTask) -> None:
        """Background job: finish, bill and deliver (webhook, upload endpoint) each
        image as it becomes ready."""
        req = task.request
        await self._prerender_all(task)
        for slot in task.images:
            await self._sleep_until(slot.ready_at)
            item = await self._success_item(task, slot)
            if item is None:
                break
            if req.webhook_url is not None:
                await self._send("POST", req.webhook_url, json_body={"data": [item]})
            if req.upload_endpoint is not None and slot.data is not None:
                await self._send("PUT", req.upload_endpoint, data=slot.data)
        if task.failed and req.webhook_url is not None:
            await self._sleep_until(task.done_at)
            await self._send(
                "POST", req.webhook_url, json_body={"errors": [failure_error(task)]}
            )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        json_body: JsonObject | None = None,
        data: bytes | None = None,
    ) -> None:
        if self.session is None:
            return
        host = URL(url).host  # never log the full URL: presigned ones carry credentials
        try:
            async with self.session.request(
                method, url, json=json_body, data=data
            ) as resp:
                await resp.read()
                if resp.status >= 300:
                    log.warning("%s to %s answered %d", method, host, resp.status)
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s to %s failed: %s", method, host, exc)
            return
        if method == "POST":
            self.state.webhooks_sent += 1
        else:
            self.state.upload_endpoint_puts += 1

    async def _sleep_until(self, deadline: float) -> None:
        # The deadline is on the injected clock, so there is no event to wait for.
        while (remaining := deadline - self.clock()) > 0:  # noqa: ASYNC110
            await anyio.sleep(remaining)

    # -- images ----------------------------------------------------------------

    async def _resolve(self, value: str, parameter: str) -> Source:
        """Turn a reference (UUID, URL, data URI, base64) into a render source.

        Never fetches a foreign URL: those get a placeholder derived from the URL.
        """
        match image_ref_kind(value):
            case "uuid":
                stored = self.state.images.get(value.lower())
                if stored is None:
                    raise _TaskError(
                        "invalidParameter",
                        f"image {value} is not known here; "
                        "upload it with imageUpload first",
                        parameter,
                    )
                return Source(key=value.lower(), data=stored.data)
            case "url":
                try:
                    path = URL(value).path
                except ValueError as exc:
                    raise _TaskError(
                        "invalidParameter", f"not a valid URL: {exc}", parameter
                    ) from exc
                own = _OWN_IMAGE.match(path)
                if own is not None and (
                    stored := self.state.images.get(own[1].lower())
                ):
                    return Source(key=own[1].lower(), data=stored.data)
                return Source(key=f"url:{value}")
            case "data_uri" | "base64":
                encoded = (
                    value.split(";base64,", 1)[1]
                    if value.startswith("data:")
                    else value
                )
                try:
                    data = base64.b64decode(encoded)
                    sniff(data)
                except (binascii.Error, ValueError) as exc:
                    raise _TaskError(
                        "invalidParameter",
                        f"the image could not be decoded: {exc}",
                        parameter,
                    ) from exc
                return Source(
                    key=f"sha256:{hashlib.sha256(data).hexdigest()}", data=data
                )
            case None:
                raise _TaskError(
                    "invalidParameter",
                    "must be an image UUID, an http(s) URL, a data URI or base64 data",
                    parameter,
                )

    async def _upload(
        self, req: ImageUploadRequest, raw_uuid: str, origin: str
    ) -> JsonObject:
        state = self.state
        state.uploads_in_progress += 1
        state.max_concurrent_uploads = max(
            state.max_concurrent_uploads, state.uploads_in_progress
        )
        try:
            if self.config.upload_latency_s > 0:
                await anyio.sleep(self.config.upload_latency_s)
        finally:
            state.uploads_in_progress -= 1
        source = await self._resolve(req.image, "image")
        data = source.data
        if data is None:
            data = await anyio.to_thread.run_sync(_placeholder_jpeg, source.key)
        ext, mime = sniff(data)
        image_uuid = self.state.new_uuid()
        self.state.images[image_uuid] = StoredImage(
            data=data, ext=ext, content_type=mime, expires_at=None
        )
        self.state.uploads += 1
        return UploadResult(
            task_uuid=raw_uuid,
            image_uuid=image_uuid,
            image_url=f"{origin}{IMAGES_PATH}/{image_uuid}.{ext}",
        ).model_dump(mode="json", exclude_none=True)


def _style_for(req: ImageInferenceRequest) -> str:
    ideogram = req.provider_settings.ideogram if req.provider_settings else None
    style = (ideogram.style_type if ideogram else None) or "AUTO"
    return auto_style(req.positive_prompt) if style == "AUTO" else style


def _placeholder_jpeg(key: str) -> bytes:
    buf = io.BytesIO()
    placeholder(key, _UPLOAD_PLACEHOLDER_SIZE).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Helpers


def _render_slot(task: SandboxTask, slot: ImageSlot) -> bytes:
    """The bytes of one image (blocking; in a worker thread).

    Raises:
        ValueError: the reference bytes are not an image.
    """
    spec = dataclasses.replace(task.spec, seed=slot.seed)
    return render(task.reference, spec, task.style_refs)


def _delivers(task: SandboxTask) -> bool:
    """Whether finished images go somewhere besides polls (a webhook, an upload)."""
    req = task.request
    return req.webhook_url is not None or req.upload_endpoint is not None


def _speed(req: ImageInferenceRequest) -> str | None:
    ideogram = req.provider_settings.ideogram if req.provider_settings else None
    return ideogram.rendering_speed if ideogram else None


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
        code = "missingApiKey" if key is None else "invalidApiKey"
        return web.json_response(
            error_body(
                code,
                "Invalid API key. Get one at https://my.runware.ai/signup"
                if key is not None
                else "No API key: send 'Authorization: Bearer <key>' "
                "or an authentication task",
                parameter="apiKey",
                task_type="authentication",
            ),
            status=401,
        )
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
    if not sandbox.authorised(_bearer(request)):
        return web.json_response(
            error_body("invalidApiKey", "send 'Authorization: Bearer <key>'"),
            status=401,
        )
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
