"""What a run dir is of: each task's fingerprint, and superseding changed tasks.

A task's fingerprint hashes its wire request minus taskUUID (the constant fields left
out too): the manifest's parsed content, not its bytes. A local image counts by its
path relative to the manifest's directory, so moving the whole job elsewhere changes
nothing (and replacing a picture's bytes under the same name is not a change: give it
a new name). ``--rerun-changed`` moves the images of each changed task aside under
``superseded/`` and journals a ``rerun``: the ledger keeps them as superseded, and
the task is sent again with its new parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

import anyio.to_thread

from pipeline.errors import StorageError
from pipeline.expand import TaskSpec
from pipeline.journal import JOURNAL_NAME, JournalWriter, load_state
from pipeline.journal_events import RerunEvent
from pipeline.plan import substitute_images
from pipeline.storage import sidecar_path

log = logging.getLogger(__name__)

SUPERSEDED_DIR: Final = "superseded"
"""``superseded/<task UUID>/<the image's old path>``: where a rerun moves old images."""
_LOCAL: Final = "file:"
"""Marks a local image in a fingerprint (a path is never a UUID, URL or data)."""


def task_fingerprint(
    spec: TaskSpec, base_dir: Path, local: dict[Path, str] | None = None
) -> bytes:
    """16 bytes of sha256 over the task's canonical wire parameters.

    Args:
        base_dir: local images count by their path relative to it.
        local: a cache of those relative names, shared across tasks.
    """
    local = {} if local is None else local
    swap: dict[str, str] = {}
    for path in spec.local_files:
        name = local.get(path)
        if name is None:
            name = Path(os.path.relpath(path, base_dir)).as_posix()
            name = local[path] = _LOCAL + name
        swap[str(path)] = name
    body = substitute_images(spec.params, swap) if swap else spec.params
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).digest()[:16]


def task_fingerprints(
    specs: Iterable[TaskSpec], base_dir: Path
) -> Iterator[tuple[str, bytes]]:
    """``(key, fingerprint)`` of each task, lazily (a 100k-task job: about a second)."""
    local: dict[Path, str] = {}
    base = base_dir.resolve()
    for spec in specs:
        yield spec.key, task_fingerprint(spec, base, local)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_aside(run_dir: Path, relpath: str, task_uuid: str) -> str | None:
    """Move an image and its sidecar to ``superseded/``; its new relative path, or
    None when it is not on disk. Never overwrites: a taken name gets a number."""
    src = run_dir / relpath
    base = f"{SUPERSEDED_DIR}/{task_uuid}/{relpath}"
    dst_rel, n = base, 1
    while (run_dir / dst_rel).exists():
        if not src.exists():
            return dst_rel  # moved by an attempt that crashed before journaling it
        n += 1
        stem, dot, ext = base.rpartition(".")
        dst_rel = f"{stem}~{n}{dot}{ext}" if dot else f"{base}~{n}"
    if not src.exists():
        return None
    dst = run_dir / dst_rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    if sidecar_path(src).exists():
        os.rename(sidecar_path(src), sidecar_path(dst))
    _fsync_dir(dst.parent)
    _fsync_dir(src.parent)
    return dst_rel


def _rerun_events(run_dir: Path, rerun: Mapping[str, str]) -> list[RerunEvent]:
    state = load_state(run_dir / JOURNAL_NAME)
    events: list[RerunEvent] = []
    for key, fingerprint in rerun.items():
        moved: list[tuple[str, int, str]] = []
        for index, done in sorted(state.completed_images.get(key, {}).items()):
            new = _move_aside(run_dir, done.path, done.task_uuid)
            if new is not None:
                moved.append((done.task_uuid, index, new))
        events.append(RerunEvent(key=key, fingerprint=fingerprint, moved=moved))
    return events


async def supersede(run_dir: Path, rerun: Mapping[str, str]) -> None:
    """Supersede the tasks of ``rerun`` (key -> new fingerprint) before a run sends
    them again: their images are moved aside (a crash leaves them there, and a retry
    finds them), then one ``rerun`` event per task is journaled.

    Raises:
        StorageError: an image cannot be moved, or the journal written.
    """
    try:
        events = await anyio.to_thread.run_sync(_rerun_events, run_dir, rerun)
    except OSError as exc:
        raise StorageError(
            f"{run_dir}: cannot move a changed task's images aside: {exc}; "
            "nothing was sent, rerun to try again"
        ) from exc
    async with JournalWriter.open(run_dir / JOURNAL_NAME) as journal:
        await journal.append(*events)
    moved = sum(len(e.moved) for e in events)
    log.warning(
        "rerunning %d changed task(s); %d earlier image(s) moved to %s/ and kept in "
        "the ledger as superseded",
        len(events),
        moved,
        run_dir / SUPERSEDED_DIR,
    )
