"""The fetch/store stage: result images are downloaded by a few fetchers and written,
with their sidecars, in batches by one collector, which journals their completions
and hands each image to the run's accounts. It is off the slots' path: a slot
is free once its result is seen."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.client import RunwareClient
from pipeline.errors import DownloadError
from pipeline.flow import UrgentRequests, cancel_at, receive, send
from pipeline.journal_events import CompletedEvent, Event, utc_now
from pipeline.records import Downloaded, Fetch, FetchFailed, Stored
from pipeline.storage import (
    detect_ext,
    encode_sidecar,
    image_relpath,
    sidecar_path,
    write_atomic_many,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_EXT_BY_FORMAT: Final = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}
_DOWNLOAD_DEFER_MAX_S: Final = 0.05
"""Longest a download waits for the submits and polls on their way (see
UrgentRequests): long enough to let a cohort's requests through, short enough that
results still go to disk at once."""
_STORE_BATCH: Final = 128
"""Most images written (and journaled) in one go by the collector."""
_STORE_GATHER_S: Final = 0.02
"""How long the collector waits for more images while downloads are still out,
before writing what it has: a batch costs two worker-thread hops whatever its size,
and results that trickle in made batches of one or two. Storing is off the slots'
path, so waiting only delays the write, never a submit."""


async def gather_batch(
    first: T,
    stream: MemoryObjectReceiveStream[T],
    *,
    more_coming: Callable[[], bool],
    most: int = _STORE_BATCH,
    window_s: float = _STORE_GATHER_S,
) -> list[T]:
    """``first`` and what follows it: all that is queued and, while ``more_coming()``,
    what arrives within ``window_s`` of the call; at most ``most`` items."""
    batch = [first]
    deadline = anyio.current_time() + window_s
    while len(batch) < most:
        try:
            batch.append(stream.receive_nowait())
            continue
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            break
        if not more_coming():
            break
        with cancel_at(deadline):
            try:
                batch.append(await stream.receive())
            except anyio.EndOfStream:
                break
            continue
        break  # the window is over
    return batch


class AppendEvents(Protocol):
    """Appends events to the run's journal (durably, under the engine's lock)."""

    async def __call__(self, *events: Event) -> None: ...


class Collector:
    """Downloads result images and writes them; the engine builds it per run, starts
    it in its task group and hands it each answer's images with ``fetch``.

    What each stored image or failed download means for the run (the summary, the
    budget, the slot, a rerun) is the accounts': ``on_stored`` and
    ``on_fetch_failed`` are called from the collector alone, and ``on_batch`` after
    each batch.
    """

    def __init__(
        self,
        *,
        client: RunwareClient,
        urgent: UrgentRequests,
        run_dir: Path,
        downloads: int,
        append: AppendEvents,
        on_stored: Callable[[Stored], None],
        on_fetch_failed: Callable[[FetchFailed], None],
        on_batch: Callable[[], None],
    ) -> None:
        self._client = client
        self._urgent = urgent
        self._run_dir_prefix = os.path.join(run_dir, "")
        """The run dir as a string ending in a separator: image paths are built by
        concatenation, not pathlib, whose parsing is dear per image (bench/README)."""
        self._downloads = downloads
        self._append = append
        self._on_stored = on_stored
        self._on_fetch_failed = on_fetch_failed
        self._on_batch = on_batch
        self._fetch_send, self._fetch_recv = anyio.create_memory_object_stream[Fetch](
            max_buffer_size=max(16, 2 * downloads)
        )
        self._done_send, self._done_recv = anyio.create_memory_object_stream[
            Downloaded | FetchFailed
        ](max_buffer_size=_STORE_BATCH)
        self._fetches_out = 0
        """Images queued for download or downloading, not yet handed to the
        collector."""

    def start(self, tg: TaskGroup) -> None:
        """Start the fetchers and the collector in ``tg``."""
        for _ in range(self._downloads):
            tg.start_soon(
                self._fetcher, self._fetch_recv.clone(), self._done_send.clone()
            )
        tg.start_soon(self._collect, self._done_recv)
        self._fetch_recv.close()
        self._done_send.close()

    def close(self) -> None:
        """No more images to fetch (the run is over)."""
        self._fetch_send.close()

    async def fetch(self, fetches: list[Fetch]) -> None:
        """Queue images for download; waits while the download queue is full."""
        self._fetches_out += len(fetches)
        try:
            for fetch in fetches:
                await send(self._fetch_send, fetch)
        except anyio.BrokenResourceError:
            return  # the fetchers stopped: the run is ending with the collector's error

    async def _fetcher(
        self,
        fetches: MemoryObjectReceiveStream[Fetch],
        done: MemoryObjectSendStream[Downloaded | FetchFailed],
    ) -> None:
        """Download (or decode) result images; the collector writes them in batches.

        If the collector has stopped (its write failed: the run is ending with that
        error), a fetcher stops too instead of adding an error of its own.
        """
        async with fetches, done:
            while True:
                try:
                    job = await receive(fetches)
                except anyio.EndOfStream:
                    return
                await self._urgent.wait_none_out(_DOWNLOAD_DEFER_MAX_S)
                try:
                    data = await self._client.fetch_image(job.result)
                except DownloadError as exc:
                    item: Downloaded | FetchFailed = FetchFailed(
                        job.flight, job.result, str(exc)
                    )
                else:
                    item = Downloaded(job, data)
                self._fetches_out -= 1
                try:
                    await send(done, item)
                except anyio.BrokenResourceError:
                    return

    def _image_path(self, job: Fetch, data: bytes) -> str:
        spec = job.flight.spec
        wanted = _EXT_BY_FORMAT.get(str(spec.params.get("outputFormat", "JPG")), "jpg")
        ext = detect_ext(data) or wanted
        return image_relpath(
            spec.reference_id, spec.variant_id, spec.axes, job.index, ext
        )

    def _sidecar(self, job: Fetch, relpath: str) -> dict[str, Any]:
        spec = job.flight.spec
        result = job.result
        return {
            "key": spec.key,
            "reference": spec.reference_id,
            "variant": spec.variant_id,
            "axes": dict(spec.axes),
            "index": job.index,
            "prompt": spec.params.get("positivePrompt"),
            "negative_prompt": spec.params.get("negativePrompt"),
            "params": job.flight.wire or dict(spec.params),
            "task_uuid": job.flight.task_uuid,
            "image_uuid": result.image_uuid,
            "seed": result.seed,
            "cost_usd": result.cost,
            "nsfw_content": result.nsfw_content,
            "path": relpath,
        }

    async def _collect(
        self, done: MemoryObjectReceiveStream[Downloaded | FetchFailed]
    ) -> None:
        """The single writer of images; the accounts count each one.

        Images are written in batches: one worker-thread hop for the files, one
        fsync'd journal append for their ``completed`` events. A batch takes what
        has arrived and, while downloads are still out, what arrives within
        _STORE_GATHER_S.
        """
        async with done:
            async for first in done:
                batch = await gather_batch(
                    first, done, more_coming=lambda: self._fetches_out > 0
                )
                downloaded = [i for i in batch if isinstance(i, Downloaded)]
                for stored in await self._store(downloaded):
                    flight = stored.flight
                    log.info(
                        "done %s image %d/%d seed=%s cost=%s",
                        flight.spec.key,
                        stored.index + 1,
                        flight.spec.images,
                        stored.result.seed,
                        stored.result.cost,
                    )
                    self._on_stored(stored)
                for item in batch:
                    if isinstance(item, FetchFailed):
                        log.warning(
                            "image %s of %s not downloaded (%s); rerun to fetch it",
                            item.result.image_uuid,
                            item.flight.spec.key,
                            item.error,
                        )
                        self._on_fetch_failed(item)
                self._on_batch()

    async def _store(self, items: list[Downloaded]) -> list[Stored]:
        """Images and sidecars durably on disk, then their completions journaled."""
        if not items:
            return []
        files: list[tuple[str, bytes]] = []
        relpaths: list[str] = []
        for item in items:
            relpath = self._image_path(item.job, item.data)
            relpaths.append(relpath)
            path = self._run_dir_prefix + relpath
            meta = encode_sidecar(self._sidecar(item.job, relpath))
            files += [(path, item.data), (sidecar_path(path), meta)]
        digests = await write_atomic_many(files)
        stored = [
            Stored(i.job.flight, i.job.result, i.job.index, rel, sha, len(i.data))
            for i, rel, sha in zip(items, relpaths, digests[::2], strict=True)
        ]
        wall = utc_now()  # stored together, journaled together
        await self._append(
            *(
                CompletedEvent(
                    ts=wall,
                    key=s.flight.spec.key,
                    task_uuid=s.flight.task_uuid,
                    image_uuid=s.result.image_uuid,
                    index=s.index,
                    seed=s.result.seed,
                    cost_usd=s.result.cost,
                    path=s.relpath,
                    sha256=s.sha256,
                    bytes=s.size,
                    submitted_at=s.flight.submitted_wall,
                )
                for s in stored
            )
        )
        return stored
