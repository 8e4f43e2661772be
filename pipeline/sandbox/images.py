"""Images: references, uploads, and rendering, publishing and billing results."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import logging
import re
from typing import Final

import anyio
import anyio.to_thread
from yarl import URL

from pipeline.sandbox.config import IMAGES_PATH
from pipeline.sandbox.render import FORMATS, Source, placeholder, render, sniff
from pipeline.sandbox.runtime import JsonObject, SandboxRuntime, TaskError
from pipeline.sandbox.state import ImageSlot, SandboxTask, StoredImage
from pipeline.wire import (
    RESULT_KEYS,
    ImageResult,
    ImageUploadRequest,
    UploadResult,
    image_ref_kind,
)

log = logging.getLogger(__name__)


_OWN_IMAGE = re.compile(r"^/images/([0-9a-fA-F-]{36})\.[A-Za-z0-9]+$")
_UPLOAD_PLACEHOLDER_SIZE: Final = (1024, 576)


class Images(SandboxRuntime):
    """Images in and out: references resolved, uploads stored, results rendered once,
    published for download and billed, and worded as success items."""

    async def _resolve(self, value: str, parameter: str) -> Source:
        """Turn a reference (UUID, URL, data URI, base64) into a render source.

        Never fetches a foreign URL: those get a placeholder derived from the URL.
        """
        match image_ref_kind(value):
            case "uuid":
                stored = self.state.images.get(value.lower())
                if stored is None:
                    raise TaskError(
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
                    raise TaskError(
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
                    raise TaskError(
                        "invalidParameter",
                        f"the image could not be decoded: {exc}",
                        parameter,
                    ) from exc
                return Source(
                    key=f"sha256:{hashlib.sha256(data).hexdigest()}", data=data
                )
            case None:
                raise TaskError(
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
                slot.rendered = await anyio.to_thread.run_sync(render_slot, task, slot)
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

    def _render_failed(self, task: SandboxTask, exc: ValueError) -> None:
        if not task.failed:
            log.info("task %s failed to render: %s", task.task_uuid, exc)
            task.failed = True
            task.failure = str(exc)


def _placeholder_jpeg(key: str) -> bytes:
    buf = io.BytesIO()
    placeholder(key, _UPLOAD_PLACEHOLDER_SIZE).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def render_slot(task: SandboxTask, slot: ImageSlot) -> bytes:
    """The bytes of one image (blocking; in a worker thread).

    Raises:
        ValueError: the reference bytes are not an image.
    """
    spec = dataclasses.replace(task.spec, seed=slot.seed)
    return render(task.reference, spec, task.style_refs)
