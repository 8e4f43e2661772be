"""The sandbox's in-memory store: tasks, served images, uploads, and public counters.

Tests and benchmarks read the counters through ``app[STATE]`` rather than by patching.
Task progress is lazy: a task's images are finished once the clock passes their
``ready_at``; nothing here runs in the background.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import anyio

from pipeline.sandbox.render import RenderSpec, Source
from pipeline.wire import ImageInferenceRequest


@dataclass(frozen=True, kw_only=True)
class BilledImage:
    """One charge: what the client was billed for one finished image."""

    task_uuid: str
    image_uuid: str
    cost: Decimal
    sha256: str
    """Of the exact bytes the client receives (served file or decoded data)."""
    content_key: str
    """Hash of the request without its taskUUID: equal keys mean the same work."""


@dataclass(kw_only=True)
class ImageSlot:
    """One of a task's ``numberResults`` images."""

    index: int
    image_uuid: str
    seed: int
    ready_at: float
    rendered: bytes | None = field(default=None, repr=False)
    """Rendered ahead of ready_at; published (served and billed) only then."""
    data: bytes | None = field(default=None, repr=False)
    sha256: str | None = None


@dataclass(kw_only=True)
class SandboxTask:
    """An accepted imageInference task."""

    task_uuid: str
    request: ImageInferenceRequest
    content_key: str
    submitted_at: float
    done_at: float
    images: list[ImageSlot]
    failed: bool
    """Decided at submit (task_fail_rate), or set when the reference cannot be
    decoded: the task ends in an inferenceError."""
    origin: str
    """scheme://host[:port] the task arrived at: image URLs are built from it."""
    reference: Source
    style_refs: tuple[Source, ...]
    spec: RenderSpec
    """The render parameters; each slot renders with its own seed."""
    failure: str | None = None
    """Why the task failed, when a render error (not a fault) decided it."""
    lock: anyio.Lock = field(default_factory=anyio.Lock, repr=False)

    def finished(self, now: float) -> list[ImageSlot]:
        """The images ready at ``now`` (none when the task failed)."""
        if self.failed:
            return []
        return [slot for slot in self.images if slot.ready_at <= now]

    def is_done(self, now: float) -> bool:
        return now >= self.done_at


@dataclass(kw_only=True)
class StoredImage:
    """An image the sandbox serves under /images/: a result or an upload."""

    data: bytes = field(repr=False)
    ext: str
    content_type: str
    expires_at: float | None
    """Clock time after which GET answers 404; None for uploads."""


def content_key(request: ImageInferenceRequest) -> str:
    """Hash of all parameters except taskUUID, to spot the same work billed twice."""
    params = request.model_dump(mode="json", exclude={"task_uuid"}, exclude_none=True)
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class SandboxState:
    """Everything the sandbox remembers, plus the counters tests assert on."""

    def __init__(self, *, seed: int = 0, credit_usd: Decimal | None = None) -> None:
        self.credit_usd = credit_usd
        """The account's balance (None: unlimited); tasks are charged when accepted."""
        self._charged: dict[str, Decimal] = {}
        self.requests: Counter[str] = Counter()
        """Task objects received, by taskType (imageInference, getResponse, ...)."""
        self.http_requests = 0
        """POSTs to the API endpoint, whatever their fate."""
        self.submissions = 0
        """imageInference tasks accepted."""
        self.duplicate_task_uuids = 0
        """Tasks refused with conflictTaskUUID because their UUID was already used."""
        self.billed: dict[str, BilledImage] = {}
        """Charges by imageUUID."""
        self.content_billed_twice = 0
        """Tasks billed whose content was already billed under another taskUUID."""
        self.max_in_flight_seen = 0
        self.downloads = 0
        """Image GETs answered with the image."""
        self.uploads = 0
        """imageUpload tasks stored."""
        self.uploads_in_progress = 0
        self.max_concurrent_uploads = 0
        """Most imageUpload tasks being worked on at once."""
        self.webhooks_sent = 0
        self.upload_endpoint_puts = 0
        self.tasks: dict[str, SandboxTask] = {}
        self.images: dict[str, StoredImage] = {}
        self.used_task_uuids: set[str] = set()
        """Every taskUUID seen on an accepted task (lower case): reuse is a conflict."""
        self._rng = random.Random(seed)
        self._in_flight: list[tuple[float, str]] = []
        self._billed_by_content: dict[str, set[str]] = {}

    # -- lookups -------------------------------------------------------------

    def task(self, task_uuid: str) -> SandboxTask | None:
        """The accepted imageInference task with this UUID, if any."""
        return self.tasks.get(task_uuid.lower())

    @property
    def billed_total_usd(self) -> Decimal:
        return sum((b.cost for b in self.billed.values()), Decimal(0))

    def in_flight(self, now: float) -> int:
        """Tasks submitted and not yet finished at ``now``."""
        heap = self._in_flight
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)
        return len(heap)

    # -- identity --------------------------------------------------------------

    def new_seed(self) -> int:
        """A uint32 seed, deterministic from the sandbox seed and call order."""
        return self._rng.getrandbits(32)

    def new_uuid(self) -> str:
        """A fresh v4 UUID for an image or upload.

        Not from the seeded generator: like the real API's, UUIDs must never repeat
        across server restarts, or a client's cached upload from an earlier sandbox
        would look valid on the next one. Seeds and pixels stay reproducible.
        """
        return str(uuid.uuid4())

    def jitter(self, upper_s: float) -> float:
        return self._rng.uniform(0.0, upper_s) if upper_s > 0 else 0.0

    # -- credit ------------------------------------------------------------------

    def charge(self, task: SandboxTask, amount: Decimal) -> None:
        """Take a task's price from the balance when it is accepted."""
        if self.credit_usd is not None:
            self.credit_usd -= amount
            self._charged[task.task_uuid.lower()] = amount

    def refund(self, task: SandboxTask) -> None:
        """Give back what a failed task was charged."""
        amount = self._charged.pop(task.task_uuid.lower(), None)
        if amount is not None and self.credit_usd is not None:
            self.credit_usd += amount

    def top_up(self, usd: Decimal) -> None:
        """Add to the balance (an unlimited account stays unlimited)."""
        if self.credit_usd is not None:
            self.credit_usd += usd

    # -- mutations ---------------------------------------------------------------

    def add_task(self, task: SandboxTask, now: float) -> None:
        self.tasks[task.task_uuid.lower()] = task
        self.used_task_uuids.add(task.task_uuid.lower())
        self.submissions += 1
        heapq.heappush(self._in_flight, (task.done_at, task.task_uuid))
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight(now))

    def bill(self, task: SandboxTask, slot: ImageSlot, cost: Decimal) -> None:
        """Charge one finished image, once; note content already paid for."""
        if slot.image_uuid in self.billed or slot.sha256 is None:
            return
        payers = self._billed_by_content.setdefault(task.content_key, set())
        if payers and task.task_uuid not in payers:
            self.content_billed_twice += 1
        payers.add(task.task_uuid)
        self.billed[slot.image_uuid] = BilledImage(
            task_uuid=task.task_uuid,
            image_uuid=slot.image_uuid,
            cost=cost,
            sha256=slot.sha256,
            content_key=task.content_key,
        )
