"""The run directory's lifecycle: identity (run.json), an exclusive lock, leftovers.

Two processes running into one directory could submit the same task twice, so a run
holds an exclusive lock on ``RUN_DIR/.lock`` for its whole life. A directory belongs to
one manifest: resuming it with a different manifest would mix two jobs' keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, StorageError
from pipeline.storage import clean_partials

RUN_INFO_NAME = "run.json"
LOCK_NAME = ".lock"
"""Held (flock) by the one run using the directory."""


def remix_version() -> str:
    try:
        return version("pipeline")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_INFO_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable run info: {exc}") from exc
    return data if isinstance(data, dict) else None


@contextmanager
def open_run_dir(
    run_dir: Path,
    *,
    manifest_path: Path,
    settings_public: dict[str, Any],
    shard: str | None,
) -> Iterator[bool]:
    """Create or reopen a run dir, locked for this process; yields True on a resume.

    Raises:
        ConfigError: the dir belongs to another manifest, or another run holds it.
        StorageError: the dir cannot be created or written.
    """
    manifest_hash = file_sha256(manifest_path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_file = (run_dir / LOCK_NAME).open("a+")
    except OSError as exc:
        raise StorageError(
            f"{run_dir}: cannot create the run directory: {exc}"
        ) from exc
    with lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir}: another remix run is using this run directory; wait for "
                "it to finish or choose another --run-dir"
            ) from None
        info = read_run_info(run_dir)
        resuming = info is not None
        if info is not None and info.get("manifest_sha256") != manifest_hash:
            raise ConfigError(
                f"{run_dir}: holds a run of a different manifest "
                f"({info.get('manifest')}, "
                f"sha256 {str(info.get('manifest_sha256'))[:12]}); "
                "use a new --run-dir for the changed manifest"
            )
        if info is not None and info.get("shard") != shard:
            raise ConfigError(
                f"{run_dir}: holds shard {info.get('shard')}, not {shard}; "
                "use one run dir per shard"
            )
        clean_partials(run_dir)
        now = datetime.now(UTC).isoformat()
        new_info: dict[str, Any] = {
            "manifest": str(manifest_path.resolve()),
            "manifest_sha256": manifest_hash,
            "shard": shard,
            "remix_version": remix_version(),
            "started_at": info.get("started_at", now) if info else now,
            "last_started_at": now,
            "settings": settings_public,
        }
        tmp = run_dir / (RUN_INFO_NAME + ".part")
        try:
            tmp.write_text(json.dumps(new_info, indent=2, sort_keys=True), "utf-8")
            os.replace(tmp, run_dir / RUN_INFO_NAME)
        except OSError as exc:
            raise StorageError(f"{run_dir}: cannot write run.json: {exc}") from exc
        try:
            yield resuming
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
