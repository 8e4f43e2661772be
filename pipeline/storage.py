"""Output paths (sanitised), atomic image writes and sidecar metadata in a run dir.

Every file lands atomically: the bytes go to ``<path>.part``, are fsynced, then
``os.replace``d into place and the directory is fsynced. A crash or a cancelled
task leaves at most a ``.part`` file, which :func:`clean_partials` removes when a
run resumes, never a half image under the real name.

A batch (:func:`write_atomic_many`) makes its contents durable with one Linux
``syncfs`` of the run dir's filesystem; where there is none, or it is refused, each
file is fsynced, the only way on macOS. ``REMIX_FSYNC=per-file`` (:data:`FSYNC_ENV`)
takes that way on Linux too (a filesystem where syncfs is slow, or a test of it).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import functools
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path, PurePath
from typing import Final, TypeVar, cast

import anyio
import anyio.to_thread
from pydantic import BaseModel

from pipeline.errors import StorageError

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
P = TypeVar("P", str, Path)

PART_SUFFIX: Final = ".part"
FSYNC_ENV: Final = "REMIX_FSYNC"
"""Set to ``per-file``: batches fsync each file instead of one syncfs (Linux)."""
PER_FILE: Final = "per-file"
MAX_PART_LEN: Final = 100
"""Longest path component we write; longer ones are cut and get a hash suffix."""

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._=,-]")
_HASH_LEN: Final = 8

_FORMAT_EXT: Final[Mapping[str, str]] = {
    "jpg": "jpg",
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
}


def _short_hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]


# Cached: every image's path is built from the same few references, variants and axis
# values, and three regex passes each were ~5 us of an image's CPU.
@functools.lru_cache(maxsize=1024)
def safe_part(s: str) -> str:
    """Sanitise ``s`` into one path component that is safe on any filesystem.

    Keeps ``[A-Za-z0-9._=,-]`` and replaces anything else with ``_``; a leading dot
    becomes ``_`` (no hidden files, never ``.`` or ``..``); the empty string
    becomes ``_``. When anything had to change, or the result is cut to
    :data:`MAX_PART_LEN`, a short hash of the original is appended so two
    different inputs never share a path. Already-safe input comes back unchanged.
    """
    out = _UNSAFE.sub("_", s)
    if out.startswith("."):
        out = "_" + out[1:]
    if out == s and 0 < len(out) <= MAX_PART_LEN:
        return out
    suffix = "-" + _short_hash(s)
    return (out or "_")[: MAX_PART_LEN - len(suffix)] + suffix


def ext_for_format(output_format: str) -> str:
    """The file extension for an ``outputFormat`` (JPG -> jpg, PNG -> png, ...).

    Raises:
        ValueError: not an image format remix stores.
    """
    try:
        return _FORMAT_EXT[output_format.strip().lower().lstrip(".")]
    except KeyError:
        raise ValueError(
            f"unknown image format {output_format!r}; expected JPG, PNG or WEBP"
        ) from None


def axes_part(axes: Sequence[tuple[str, str]]) -> str:
    """``axis=value,axis=value`` sanitised into one component; ``image`` if none."""
    if not axes:
        return "image"
    return safe_part(",".join(f"{name}={value}" for name, value in axes))


def image_relpath(
    reference_id: str,
    variant_id: str,
    axes: Sequence[tuple[str, str]],
    index: int,
    ext: str,
) -> str:
    """``images/<reference>/<variant>/<axes>-<n>.<ext>``, relative to the run dir
    (POSIX separators).

    Each of reference, variant and axes is a :func:`safe_part` (at most
    :data:`MAX_PART_LEN` characters), so the file name stays well under the
    255-byte limit of common filesystems.

    Args:
        index: the image's 0-based position among its task's results; the file
            name carries ``n = index + 1``.
        ext: an extension or an ``outputFormat`` (``jpg``, ``JPG``, ``jpeg``...).
    """
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    ref, variant = safe_part(reference_id), safe_part(variant_id)
    return f"images/{ref}/{variant}/{axes_part(axes)}-{index + 1}.{ext_for_format(ext)}"


def sidecar_path(image_path: P) -> P:
    """The metadata file next to an image: ``<stem>.json`` (a str for a str).

    One string rule for both types (pathlib's idea of a suffix differs between
    Python versions for names such as ``a.``).
    """
    text = os.fspath(image_path)
    name_at = max(text.rfind("/"), text.rfind(os.sep)) + 1
    dot = text.rfind(".", name_at)
    stem = text[:dot] if dot > name_at and dot < len(text) - 1 else text
    if isinstance(image_path, str):
        return stem + ".json"
    return Path(stem + ".json")


def part_path(path: P) -> P:
    """Where the atomic writes stage ``path``'s bytes (a str for a str)."""
    if isinstance(path, str):
        return path + PART_SUFFIX
    return path.with_name(path.name + PART_SUFFIX)


def detect_ext(data: bytes) -> str | None:
    """The real extension of image ``data`` by its magic bytes, or None if unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# ---------------------------------------------------------------------------
# Atomic writes


def _write_part(part: Path, data: bytes) -> str:
    part.parent.mkdir(parents=True, exist_ok=True)
    _write_file(str(part), data, sync=True)
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: StrPath) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some filesystems refuse dir fsync
        log.debug("fsync of directory %s failed: %s", directory, exc)
    finally:
        os.close(fd)


def _commit(part: Path, path: Path) -> None:
    os.replace(part, path)
    _fsync_dir(path.parent)


def _remove_part(part: Path) -> None:
    try:
        part.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove partial file %s: %s", part, exc)


def _storage_error(path: Path, exc: OSError) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return StorageError(
            f"cannot write {path}: the disk is full ({reason}); free some space "
            "and rerun the same command: the run is resumable"
        )
    return StorageError(
        f"cannot write {path}: {reason}; check the run directory is writable, "
        "then rerun the same command to resume"
    )


async def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably; return its sha256 hex.

    On any failure, cancellation included, the ``.part`` file is removed.

    Raises:
        StorageError: the write failed (disk full, permissions, I/O error).
    """
    part = part_path(path)
    try:
        digest = await anyio.to_thread.run_sync(_write_part, part, data)
        await anyio.to_thread.run_sync(_commit, part, path)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_part, part)
        if isinstance(exc, OSError):
            raise _storage_error(path, exc) from exc
        raise
    return digest


def write_atomic_sync(path: Path, data: bytes) -> str:
    """Blocking :func:`write_atomic`, for callers outside the event loop (reports).

    Raises:
        StorageError: the write failed; no ``.part`` file is left behind.
    """
    part = part_path(path)
    try:
        digest = _write_part(part, data)
        _commit(part, path)
    except BaseException as exc:
        _remove_part(part)
        if isinstance(exc, OSError):
            raise _storage_error(path, exc) from exc
        raise
    return digest


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2): flush one filesystem in one call (None elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to ask
        return None
    func = getattr(libc, "syncfs", None)
    if func is None:  # pragma: no cover - not Linux
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return cast("Callable[[int], int]", func)


_SYNCFS: Final = _load_syncfs()


def _sync_filesystem(anywhere: str, paths: Sequence[str]) -> None:
    """Make the given files durable: one syncfs of the filesystem holding
    ``anywhere``, or an fsync each without it (or with ``REMIX_FSYNC=per-file``)."""
    if _SYNCFS is not None and os.environ.get(FSYNC_ENV) != PER_FILE:
        fd = os.open(anywhere, os.O_RDONLY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:  # syncfs missing (macOS), refused, or not wanted
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: str, data: bytes, *, sync: bool = False) -> None:
    """``data`` into a new file at ``path`` with bare system calls (no buffered
    file object: it cost ~15 us more per file, twice per image); fsync'd if
    ``sync`` (a batch syncs its whole filesystem once instead)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_many_sync(files: Sequence[tuple[StrPath, bytes]]) -> list[str]:
    # Plain strings throughout: pathlib's parsing was ~40% of a batch's CPU.
    paths = [os.fspath(path) for path, _ in files]
    parts = [part_path(path) for path in paths]
    directories = {os.path.dirname(path) for path in paths}
    committed = 0
    try:
        digests = []
        for directory in directories:
            os.makedirs(directory, exist_ok=True)
        for part, (_, data) in zip(parts, files, strict=True):
            _write_file(part, data)
            digests.append(hashlib.sha256(data).hexdigest())
        _sync_filesystem(os.path.dirname(parts[0]), parts)  # contents durable first
        for part, path in zip(parts, paths, strict=True):
            os.replace(part, path)
            committed += 1
        for directory in directories:
            _fsync_dir(directory)  # the renames durable
    except BaseException:
        for part in parts[committed:]:
            _remove_part(Path(part))
        raise
    return digests


async def write_atomic_many(files: Sequence[tuple[StrPath, bytes]]) -> list[str]:
    """:func:`write_atomic` for a batch, in one worker-thread hop; sha256 of each.

    At hundreds of images a second, a thread hop and an fsync per file cost more
    than the writes: the batch's contents are flushed with one syncfs (Linux) before
    any file is renamed into place, then each directory is fsync'd once.

    Raises:
        StorageError: a write failed; no ``.part`` file of the batch is left.
    """
    if not files:
        return []
    try:
        return await anyio.to_thread.run_sync(_write_many_sync, files)
    except OSError as exc:
        raise _storage_error(Path(files[0][0]).parent, exc) from exc


def write_atomic_text_stream(path: Path, chunks: Iterable[str]) -> None:
    """Write text ``chunks`` (UTF-8) to ``path`` via a fsynced ``.part`` and a rename.

    For outputs too big to hold as one string (a 100k-row ledger); readers see the
    old file or the new one, never half of it.

    Raises:
        StorageError: the write failed; no ``.part`` file is left behind.
    """
    part = part_path(path)
    try:
        with part.open("w", encoding="utf-8", newline="") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        _commit(part, path)
    except BaseException as exc:
        _remove_part(part)
        if isinstance(exc, OSError):
            raise _storage_error(path, exc) from exc
        raise


def _json_default(value: object) -> object:
    match value:
        case Decimal():
            return str(value)
        case dt.datetime() | dt.date() | dt.time():
            return value.isoformat()
        case PurePath():
            return value.as_posix()
        case uuid.UUID():
            return str(value)
        case BaseModel():
            return value.model_dump(mode="json")
        case set() | frozenset():
            return sorted(value, key=str)
        case _:
            pass
    raise TypeError(f"cannot store {type(value).__name__} in a sidecar")


def encode_sidecar(meta: Mapping[str, object]) -> bytes:
    """Sidecar JSON: sorted keys, Decimals as exact strings, UTF-8."""
    # No indent: an indented dump bypasses the C encoder (~10x the CPU per image).
    text = json.dumps(
        meta,
        sort_keys=True,
        separators=(",", ": "),
        ensure_ascii=False,
        default=_json_default,
    )
    return (text + "\n").encode()


async def write_sidecar(path: Path, meta: Mapping[str, object]) -> Path:
    """Write ``meta`` next to the image at ``path`` (atomically); return its path.

    Raises:
        StorageError: the write failed.
    """
    target = sidecar_path(path)
    await write_atomic(target, encode_sidecar(meta))
    return target


def clean_partials(run_dir: Path) -> int:
    """Remove leftover ``*.part`` files under ``run_dir``; return how many.

    Called when a run resumes: a ``.part`` is only ever an interrupted write.
    """
    removed = 0
    if not run_dir.is_dir():
        return 0
    for part in run_dir.rglob("*" + PART_SUFFIX):
        if part.is_file():
            _remove_part(part)
            removed += 1
    if removed:
        log.info("removed %d partial file(s) left by an interrupted run", removed)
    return removed
