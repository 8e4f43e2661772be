"""The run directory's lifecycle: identity (run.json), an exclusive lock, leftovers.

Two processes running into one directory could submit the same task twice, so a run
holds an exclusive lock on ``RUN_DIR/.lock`` for its whole life. A directory belongs to
one API (:func:`api_identity`: sandbox pictures and dollars must never count as real
ones) and to one job: the manifest's expanded tasks, each remembered by a fingerprint of
its wire parameters (``pipeline.task_prints``), not the manifest's bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, StorageError
from pipeline.journal import JOURNAL_NAME
from pipeline.journal_offsets import JournalOffsets
from pipeline.storage import clean_partials
from pipeline.task_prints import ManifestChanges, compare_prints, read_prints

log = logging.getLogger(__name__)

RUN_INFO_NAME = "run.json"
LOCK_NAME = ".lock"
"""Held (flock) by the one run using the directory."""

SANDBOX_API: Final = "sandbox"
"""run.json's ``api`` for a run against a local sandbox (its images and costs are not
real ones)."""
SANDBOX_API_KEY: Final = "sandbox"
"""The sandbox's key (``--sandbox``, ``remix sandbox``'s default): the real API never
accepts it, so a run sending it talks to a sandbox wherever that runs."""


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_host(base_url: str) -> str:
    """The base URL's host, lower-cased; ``sandbox`` for a loopback host (this
    machine's sandbox, whatever port it took)."""
    host = (urlsplit(base_url).hostname or "").lower()
    return SANDBOX_API if _is_loopback(host) else host


def api_identity(base_url: str, api_key: str | None) -> str:
    """Which API a run dir belongs to: ``sandbox`` for a loopback host or the sandbox
    key, otherwise the base URL's host (``api.runware.ai`` for the real one)."""
    return SANDBOX_API if api_key == SANDBOX_API_KEY else api_host(base_url)


def recorded_api(info: dict[str, Any] | None) -> str | None:
    """The API a run.json says its run dir belongs to: ``api``, or for an older one
    ``sandbox`` when its base URL was loopback; None when unknown."""
    if info is None:
        return None
    api = info.get("api")
    if isinstance(api, str):
        return api
    base = _recorded_base_url(info)
    if base is not None and api_host(base) == SANDBOX_API:
        return SANDBOX_API
    return None


def _recorded_base_url(info: dict[str, Any]) -> str | None:
    """The base URL in run.json's settings (every run.json has recorded them)."""
    settings = info.get("settings")
    api_settings = settings.get("api") if isinstance(settings, dict) else None
    base = api_settings.get("base_url") if isinstance(api_settings, dict) else None
    return base if isinstance(base, str) else None


def _api_name(api: str) -> str:
    return "the local sandbox" if api == SANDBOX_API else f"the API at {api}"


def _recorded_api(run_dir: Path, info: dict[str, Any], api: str, base_url: str) -> str:
    """run.json's API. An older run.json has none: the API its recorded base URL
    names when that is another one, else ``api``, adopted with a warning."""
    recorded = info.get("api")
    if isinstance(recorded, str):
        return recorded
    base = _recorded_base_url(info)
    if base is not None and api_host(base) not in (api, api_host(base_url)):
        return api_host(base)  # its settings say it ran elsewhere
    log.warning(
        "%s: run.json names no API (made by an older remix); adopting %s",
        run_dir,
        _api_name(api),
    )
    return api


def _check_api(recorded: str, api: str, run_dir: Path) -> None:
    """Refuse a run against another API than the run dir's.

    Raises:
        ConfigError: naming both APIs and the ways on.
    """
    if recorded == api:
        return
    if recorded == SANDBOX_API:
        way = (
            "its images and dollars are not real ones: use a new --run-dir for "
            f"{api}, or add --sandbox to resume it against the sandbox"
        )
    elif api == SANDBOX_API:
        way = (
            "sandbox results must not mix with real ones: use a new --run-dir for "
            f"the sandbox, or resume it without --sandbox against {recorded}"
        )
    else:
        way = "use a new --run-dir for this API"
    raise ConfigError(
        f"{run_dir}: holds a run against {_api_name(recorded)}, but this run would "
        f"use {_api_name(api)}; {way}"
    )


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


_LISTED: Final = 10
"""Task keys named in a refusal; the rest are counted."""


def _listed(keys: Iterable[str]) -> str:
    names = sorted(keys)
    shown = ", ".join(names[:_LISTED])
    more = len(names) - _LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


@dataclass
class OpenedRunDir:
    """A locked run dir: whether this is a resume, and the tasks a
    ``--rerun-changed`` must supersede before anything is sent."""

    resuming: bool
    rerun: dict[str, str] = field(default_factory=dict)
    """key -> new fingerprint: journal a rerun of each, then :meth:`commit`."""
    _changes: ManifestChanges | None = field(default=None, repr=False)
    _keep: list[str] = field(default_factory=list, repr=False)

    def commit(self) -> None:
        """Make the manifest's task fingerprints the run dir's (idempotent)."""
        if self._changes is not None:
            self._changes.commit(self._keep)
            self._changes = None


def _judge_changes(
    run_dir: Path, changes: ManifestChanges, *, rerun_changed: bool
) -> tuple[dict[str, str], list[str]]:
    """The tasks to rerun and the removed ones to keep, once the changes are allowed.

    Only tasks with images need the flag: a changed or removed task that has none
    (never sent, failed, or already rerun by an attempt that crashed before its
    fingerprints were kept) loses nothing, and passes. A failed one keeps its failure
    (``--retry-failed`` sends it again, with its new parameters).

    Raises:
        ConfigError: a changed or removed task has images (without
            ``rerun_changed``), or is in flight at the API.
    """
    if not changes.changed and not changes.removed:
        return {}, []
    fold = JournalOffsets.of_file(run_dir / JOURNAL_NAME)
    has_images = fold.completed_images
    rerun = {k: d.hex() for k, d in changes.changed.items() if k in has_images}
    keep = [key for key in changes.removed if key in has_images]
    touched = (*changes.changed, *changes.removed)
    in_flight = [key for key in touched if key in fold.pending]
    if in_flight:
        raise ConfigError(
            f"{run_dir}: {len(in_flight)} task(s) the manifest changed or dropped are "
            f"still in flight from the earlier manifest: {_listed(in_flight)}; resume "
            "once with the earlier manifest to collect them, or use a new --run-dir"
        )
    if (rerun or keep) and not rerun_changed:
        what = []
        if rerun:
            what.append(
                f"changed the parameters of {len(rerun)} task(s) that have images "
                f"here: {_listed(rerun)}"
            )
        if keep:
            what.append(
                f"dropped {len(keep)} task(s) that have images here: {_listed(keep)}"
            )
        raise ConfigError(
            f"{run_dir}: the manifest {'; and '.join(what)}. Nothing was sent. Add "
            "--rerun-changed to run exactly the changed tasks again (their earlier "
            "images stay in the ledger as superseded; dropped tasks keep their "
            "results), or use a new --run-dir"
        )
    return rerun, keep


@contextmanager
def open_run_dir(
    run_dir: Path,
    *,
    manifest_path: Path,
    settings_public: dict[str, Any],
    shard: str | None,
    api: str,
    task_prints: Iterable[tuple[str, bytes]],
    rerun_changed: bool = False,
) -> Iterator[OpenedRunDir]:
    """Create or reopen a run dir, locked for this process, for this API and these
    tasks.

    Args:
        api: :func:`api_identity` of the run's settings.
        task_prints: ``(key, fingerprint)`` of every task the run covers (its shard's).
        rerun_changed: allow tasks that already ran to have changed (the caller
            reruns ``rerun``) or to have left the manifest (their results stay).

    Raises:
        ConfigError: the dir belongs to another API, shard or job (the changed task
            keys named), or another run holds it.
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
        if info is not None:
            base_url = str(settings_public.get("api", {}).get("base_url", ""))
            _check_api(_recorded_api(run_dir, info, api, base_url), api, run_dir)
        if info is not None and info.get("shard") != shard:
            raise ConfigError(
                f"{run_dir}: holds shard {info.get('shard')}, not {shard}; "
                "use one run dir per shard"
            )
        stored = read_prints(run_dir)
        if (
            info is not None
            and stored is None
            and info.get("manifest_sha256") != manifest_hash
        ):
            raise ConfigError(
                f"{run_dir}: holds a run of a different manifest "
                f"({info.get('manifest')}, sha256 "
                f"{str(info.get('manifest_sha256'))[:12]}), made by an older remix "
                "that did not remember its tasks; resume it once with that manifest, "
                "or use a new --run-dir for the changed one"
            )
        clean_partials(run_dir)
        changes = compare_prints(run_dir, stored, task_prints)
        try:
            rerun, keep = _judge_changes(run_dir, changes, rerun_changed=rerun_changed)
        except ConfigError:
            changes.discard()
            raise
        if keep:
            log.warning(
                "%d task(s) left the manifest; their results stay in %s: %s",
                len(keep),
                run_dir,
                _listed(keep),
            )
        opened = OpenedRunDir(info is not None, rerun, changes, keep)
        if not rerun:
            opened.commit()
        now = datetime.now(UTC).isoformat()
        new_info: dict[str, Any] = {
            "api": api,
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
            yield opened
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
