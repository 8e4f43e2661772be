"""What a run sends, in order: the job's tasks (or its shard's) that are not done,
pending or failed, with the references of the next ones uploading ahead of them."""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

import anyio
from anyio.abc import TaskGroup

from pipeline.expand import TaskSpec
from pipeline.journal import ResumeState
from pipeline.references import ReferenceUploader
from pipeline.shard import Shard
from pipeline.wire import ImageInferenceRequest

_UPLOADS_AHEAD: Final = 8
"""Reference uploads that may run at once ahead of the tasks that need them."""


def selected(
    specs: Callable[[], Iterator[TaskSpec]], shard: Shard | None
) -> Iterator[TaskSpec]:
    """The run's tasks: the job's, or those of its shard."""
    if shard is None:
        yield from specs()
        return
    for spec in specs():
        if shard.contains(spec.key):
            yield spec


def to_send(
    specs: Iterator[TaskSpec], state: ResumeState, *, retry_failed: bool
) -> Iterator[TaskSpec]:
    """The tasks to submit: neither done, nor pending (those are asked about), nor
    failed before unless retried."""
    for spec in specs:
        key = spec.key
        if state.is_complete(key) or key in state.pending:
            continue
        if key in state.failed and not retry_failed:
            continue
        yield spec


class UploadsAhead:
    """Starts the upload of each new local reference once, a few at a time."""

    def __init__(self, group: TaskGroup, uploader: ReferenceUploader) -> None:
        self._group = group
        self._uploader = uploader
        self._started: set[Path] = set()
        self._limiter = anyio.CapacityLimiter(_UPLOADS_AHEAD)

    def start(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if path not in self._started:
                self._started.add(path)
                self._group.start_soon(self._upload, path)

    async def _upload(self, path: Path) -> None:
        async with self._limiter:
            await self._uploader.resolve(path)


def window(
    specs: Iterator[TaskSpec], ahead: UploadsAhead, size: int
) -> Iterator[TaskSpec]:
    """The tasks in order, with the references of the next ``size`` uploading.

    Uploading a new reference takes a round trip (and a big file much longer);
    done one at a time when a task first needs it, every new reference would
    stall the submits behind it and leave slots idle.
    """
    queued: deque[TaskSpec] = deque()
    for spec in specs:
        ahead.start(spec.local_files)
        queued.append(spec)
        if len(queued) >= size:
            yield queued.popleft()
    yield from queued


async def prepare(spec: TaskSpec, uploader: ReferenceUploader) -> ImageInferenceRequest:
    """``spec``'s request under a new taskUUID, its local references uploaded."""
    uploaded = await uploader.resolve_all(spec.local_files)
    return spec.request(uuid.uuid4(), uploaded)


def inherited_uploads(
    uploader: ReferenceUploader, request: ImageInferenceRequest
) -> tuple[str, ...]:
    """The image UUIDs in ``request`` that an earlier run uploaded (they may have
    expired: the API then refuses the task, and it goes again with fresh ones)."""
    used = list(request.inputs.reference_images)
    if request.provider_settings is not None:
        used += request.provider_settings.ideogram.style_reference_images or []
    return tuple(uploader.inherited(used))
