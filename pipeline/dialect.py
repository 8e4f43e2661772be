"""What remix knows of how one API answers where Runware's docs are silent, and
where that knowledge is kept (runware-protocol.md §10).

Two unknowns change what remix does:

- **Batched getResponse** (several tasks in one request): every official client asks
  one taskUUID per request. A server may answer all, only the first, refuse the array
  or answer nothing. ``PollBatching`` trusts a batch only once one has answered every
  task it asked about, and falls back to one task per request on any other sign.
- **An unknown taskUUID**: a not-found code, no item at all, or "processing" forever.
  Only when it is known not to be "processing" does a "processing" answer prove that
  an ambiguous submit was accepted; otherwise the same taskUUID is sent again
  (``settle``).

``remix doctor`` measures both and writes them to a cache per base URL; ``remix run``
starts from the run dir's own record (what an earlier run learnt), else that cache,
else from nothing, and records what it learns in the run dir.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.answers import PollOutcome
from pipeline.errors import StorageError
from pipeline.storage import write_atomic_sync

__all__ = [
    "DIALECT_NAME",
    "Dialect",
    "PollBatching",
    "PollMode",
    "UnknownTask",
    "cache_path",
    "load_dialect",
    "save_dialect",
    "unknown_task_answer",
]

log = logging.getLogger(__name__)

DIALECT_NAME: Final = "dialect.json"
"""The run dir's record of what its API was found to do."""
CACHE_ENV: Final = "REMIX_CACHE_DIR"


class PollMode(StrEnum):
    UNKNOWN = "unknown"
    """Not yet seen: ask in batches, and judge each answer."""
    BATCHED = "batched"
    """A batch was seen answering every task it asked about."""
    SINGLE = "single"
    """Batches are ignored, cut short or refused: one taskUUID per request."""


class UnknownTask(StrEnum):
    UNKNOWN = "unknown"
    NOT_FOUND = "not_found"
    """An error code of the not-found family."""
    SILENT = "silent"
    """No item at all."""
    PROCESSING = "processing"
    """A "processing" item, as for a running task."""


class Dialect(BaseModel):
    """What is known of one API's answers; written as JSON."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    poll_mode: PollMode = PollMode.UNKNOWN
    unknown_task: UnknownTask = UnknownTask.UNKNOWN
    unknown_task_code: str | None = None
    """The not-found code seen, when ``unknown_task`` is NOT_FOUND."""
    checked_at: datetime | None = None
    source: str = "default"
    """Who found it out: "doctor", "run" or "default"."""

    @property
    def processing_proves_acceptance(self) -> bool:
        """Whether "processing" can only be said of a task the API accepted."""
        return self.unknown_task in (UnknownTask.NOT_FOUND, UnknownTask.SILENT)


def unknown_task_answer(outcome: PollOutcome) -> UnknownTask:
    """What a getResponse about a taskUUID nobody sent says of unknown tasks."""
    if outcome.not_found:
        return UnknownTask.NOT_FOUND
    if outcome.processing:
        return UnknownTask.PROCESSING
    if outcome.unanswered and not outcome.batch_refused and not outcome.failed:
        return UnknownTask.SILENT
    return UnknownTask.UNKNOWN


def cache_path(base_url: str, env: Mapping[str, str] | None = None) -> Path:
    """Where ``remix doctor``'s findings for ``base_url`` are kept:
    ``$REMIX_CACHE_DIR`` or ``$XDG_CACHE_HOME/remix`` or ``~/.cache/remix``, then
    ``dialects/<host>[_<port>].json``."""
    env = os.environ if env is None else env
    root = env.get(CACHE_ENV)
    if root:
        base = Path(root)
    else:
        xdg = env.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "remix"
    parts = urlsplit(base_url)
    name = parts.hostname or "unknown"
    if parts.port is not None:
        name += f"_{parts.port}"
    return base / "dialects" / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")


def _read(path: Path) -> Dialect | None:
    try:
        return Dialect.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        log.warning("ignoring %s (%s)", path, exc)
        return None


def load_dialect(run_dir: Path | None, base_url: str) -> Dialect:
    """The run dir's record, else the doctor's cache for ``base_url``, else nothing
    known."""
    if run_dir is not None and (found := _read(run_dir / DIALECT_NAME)) is not None:
        return found
    return _read(cache_path(base_url)) or Dialect()


def save_dialect(path: Path, dialect: Dialect) -> None:
    """Write ``dialect`` atomically (a run dir's record or the doctor's cache).

    Raises:
        StorageError: it could not be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
    write_atomic_sync(path, dialect.model_dump_json(indent=2).encode() + b"\n")


class PollBatching:
    """How many taskUUIDs one getResponse may ask about, learnt from the answers.

    Batches are sent while the mode is unknown, and each answer is judged on the tasks
    the API is known to hold (acked, or answered before): one that answers all of them
    (two or more) makes batches trusted; a refusal of the array makes them single at
    once; answers that leave known tasks out make them single after ``STRIKES`` in a
    row (an API that answers only the first, or nothing).
    """

    STRIKES: Final = 2

    def __init__(self, mode: PollMode, batch: int) -> None:
        self.mode = mode
        self._batch = batch
        self._strikes = 0

    @property
    def size(self) -> int:
        """Most taskUUIDs in one getResponse now."""
        return 1 if self.mode is PollMode.SINGLE else self._batch

    def judge(
        self,
        asked: Sequence[str],
        answered: Collection[str],
        known: Collection[str],
        *,
        refused: bool,
    ) -> bool:
        """One batched answer's verdict; returns whether the mode changed."""
        if len(asked) < 2 or self.mode is not PollMode.UNKNOWN:
            return False
        if refused:
            return self._set(PollMode.SINGLE, "refuses a getResponse of several tasks")
        held = [u for u in asked if u in known]
        if not held:
            return False  # nothing it must know of: no verdict
        missing = [u for u in held if u not in answered]
        if not missing:
            self._strikes = 0
            if len(held) >= 2:
                return self._set(PollMode.BATCHED, "")
            return False
        self._strikes += 1
        if self._strikes < self.STRIKES:
            return False
        how = "only the first task" if asked[0] in answered else "none of the tasks"
        return self._set(
            PollMode.SINGLE, f"answers {how} of a getResponse of several tasks"
        )

    def _set(self, mode: PollMode, why: str) -> bool:
        self.mode = mode
        if mode is PollMode.SINGLE:
            log.warning(
                "the API %s; asking about one task per request from now on", why
            )
        else:
            log.info("the API answers batched getResponse in full")
        return True
