"""The task API's work: each task of a request accepted, refused or answered."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from pipeline.sandbox.answers import (
    Outcome,
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
from pipeline.sandbox.delivery import Delivery
from pipeline.sandbox.faults import Fault
from pipeline.sandbox.render import (
    RenderSpec,
    Source,
    auto_style,
    hex_to_rgb,
    preset_palette,
)
from pipeline.sandbox.runtime import JsonObject, TaskError, rendering_speed
from pipeline.sandbox.state import ImageSlot, SandboxTask, content_key
from pipeline.wire import (
    REQUEST_ADAPTER,
    AuthenticationRequest,
    ErrorItem,
    GetResponseRequest,
    ImageInferenceRequest,
    ImageUploadRequest,
)

log = logging.getLogger(__name__)


class Sandbox(Delivery):
    """The sandbox: one request's tasks answered (submits accepted or refused, polls
    and uploads answered), on top of its images and their background completion."""

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

        # Counted as sent (an invalid getResponse is one too), as a server would.
        polls = [i for i, t in enumerate(tasks) if t.get("taskType") == "getResponse"]
        unanswered: set[int] = set()
        if len(polls) > 1:
            match self.config.poll_batch:
                case "reject":
                    return poll_batch_refusal()
                case "empty":
                    return Outcome()
                case "first":
                    unanswered = set(polls[1:])
                case "all":
                    pass

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
            if i in unanswered:
                continue
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
                    charge = self.config.price_for(rendering_speed(req)) * req.images
                    balance = self.state.credit_usd
                    if balance is not None and charge > balance:
                        credit_refused += 1
                        outcome.errors.append(credit_refusal(raw_uuid, balance, charge))
                        continue
                    try:
                        task = await self._accept(req, raw_uuid, origin, now)
                    except TaskError as exc:
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
                    accepted.append(task)
                    if req.delivery_method != "async":
                        sync_tasks.append(task)
                    elif self.config.ack == "processing":
                        outcome.data.append(processing_item(task.task_uuid))
                    else:
                        outcome.unacked += 1
                case GetResponseRequest():
                    await self._poll(str(obj.get("taskUUID")), outcome)
                case ImageUploadRequest():
                    try:
                        outcome.data.append(
                            await self._upload(req, str(obj.get("taskUUID")), origin)
                        )
                    except TaskError as exc:
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
        inferences = sum(t.get("taskType") == "imageInference" for t in tasks)
        outcome.payment_required = credit_refused > 0 and credit_refused == inferences
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


def _style_for(req: ImageInferenceRequest) -> str:
    ideogram = req.provider_settings.ideogram if req.provider_settings else None
    style = (ideogram.style_type if ideogram else None) or "AUTO"
    return auto_style(req.positive_prompt) if style == "AUTO" else style
