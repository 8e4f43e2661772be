"""Storage: safe output paths, atomic writes, sidecars and partial-file cleanup."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import sys
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path, PurePosixPath

import anyio
import anyio.to_thread
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import StorageError
from pipeline.sandbox import SandboxConfig
from pipeline.storage import (
    FSYNC_ENV,
    MAX_PART_LEN,
    PER_FILE,
    clean_partials,
    detect_ext,
    ext_for_format,
    image_relpath,
    safe_part,
    sidecar_path,
    write_atomic,
    write_atomic_many,
    write_sidecar,
)
from tests.conftest import SandboxFactory
from tests.jobkit import base_url, fast_settings, run_manifest, write_job

_SAFE = re.compile(r"[A-Za-z0-9._=,-]+")


def assert_safe_component(part: str, max_len: int = MAX_PART_LEN) -> None:
    assert _SAFE.fullmatch(part), part
    assert part not in {"", ".", ".."}
    assert not part.startswith(".")
    assert len(part) <= max_len


def read(path: str | Path) -> bytes:
    """A file's bytes (sync: fine in a test)."""
    return Path(path).read_bytes()


def files_in(directory: Path) -> list[str]:
    """Every file under ``directory``, relative, sorted (sync: fine in a test)."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
    )


# ---------------------------------------------------------------------------
# Paths


@given(st.text())
def test_safe_part_is_one_safe_stable_component(s: str) -> None:
    """Any string becomes one non-empty, dot-safe, short component, stably."""
    part = safe_part(s)
    assert_safe_component(part)
    assert "/" not in part
    assert "\\" not in part
    assert safe_part(s) == part
    assert safe_part(part) == part  # already safe: unchanged


@given(st.text(), st.text())
def test_safe_part_keeps_distinct_inputs_apart(a: str, b: str) -> None:
    """Two different names never map to the same file."""
    if a != b:
        assert safe_part(a) != safe_part(b)


def test_safe_part_examples() -> None:
    """Safe names pass through; unsafe ones are replaced and tagged; long ones cut."""
    assert safe_part("remixStrength=30,styleType=DESIGN") == (
        "remixStrength=30,styleType=DESIGN"
    )
    assert safe_part("art-deco_v1.2") == "art-deco_v1.2"
    assert re.fullmatch(r"a_b-[0-9a-f]{8}", safe_part("a/b"))
    assert re.fullmatch(r"_\.-[0-9a-f]{8}", safe_part(".."))
    assert re.fullmatch(r"_-[0-9a-f]{8}", safe_part(""))
    assert re.fullmatch(r"_env-[0-9a-f]{8}", safe_part(".env"))
    long = safe_part("x" * 300)
    assert len(long) == MAX_PART_LEN
    assert long.startswith("x" * 80)
    assert long != safe_part("x" * 301)


def test_image_relpath_layout() -> None:
    """images/<reference>/<variant>/<axes>-<n>.<ext>, n 1-based, ext from format."""
    axes = [("remixStrength", "30"), ("styleType", "DESIGN")]
    assert (
        image_relpath("atrium", "art-deco", axes, 0, "JPG")
        == "images/atrium/art-deco/remixStrength=30,styleType=DESIGN-1.jpg"
    )
    assert (
        image_relpath("atrium", "art-deco", [], 2, "WEBP")
        == "images/atrium/art-deco/image-3.webp"
    )
    assert image_relpath("a", "b", [], 0, "png") == "images/a/b/image-1.png"
    with pytest.raises(ValueError, match="unknown image format 'GIF'"):
        image_relpath("a", "b", [], 0, "GIF")
    with pytest.raises(ValueError, match="index must be >= 0"):
        image_relpath("a", "b", [], -1, "JPG")


@given(
    ref=st.text(),
    variant=st.text(),
    axes=st.lists(st.tuples(st.text(), st.text()), max_size=4),
    index=st.integers(0, 1000),
    fmt=st.sampled_from(["JPG", "PNG", "WEBP", "jpeg"]),
)
def test_image_relpath_stays_inside_images(
    ref: str, variant: str, axes: list[tuple[str, str]], index: int, fmt: str
) -> None:
    """Whatever the ids and axis values, the path is four safe parts under images/."""
    path = PurePosixPath(image_relpath(ref, variant, axes, index, fmt))
    assert path.parts[0] == "images"
    assert len(path.parts) == 4
    for part in path.parts[1:3]:
        assert_safe_component(part)
    assert_safe_component(path.name, MAX_PART_LEN + len(f"-{index + 1}.webp"))
    assert path.name.endswith(f"-{index + 1}.{ext_for_format(fmt)}")
    assert str(path) == image_relpath(ref, variant, axes, index, fmt)


@pytest.mark.parametrize(
    ("fmt", "ext"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
)
def test_detect_ext_by_magic_bytes(fmt: str, ext: str) -> None:
    """Real Pillow-encoded images are recognised by their magic bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format=fmt)
    assert detect_ext(buf.getvalue()) == ext


def test_detect_ext_unknown() -> None:
    """Bytes that are no image we store give None."""
    assert detect_ext(b"") is None
    assert detect_ext(b"GIF89a....") is None
    assert detect_ext(b"RIFF\0\0\0\0WAVE") is None


# ---------------------------------------------------------------------------
# Atomic writes


async def test_write_atomic_writes_and_leaves_no_part(tmp_path: Path) -> None:
    """The bytes land under the real name, the sha256 is returned, no .part stays."""
    target = tmp_path / "images" / "a" / "b" / "image-1.jpg"
    data = b"\xff\xd8\xff" + os.urandom(1000)
    digest = await write_atomic(target, data)
    assert target.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert files_in(tmp_path) == ["images/a/b/image-1.jpg"]
    await write_atomic(target, b"second")
    assert target.read_bytes() == b"second"


async def test_failed_replace_leaves_no_part_and_says_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC at the rename: StorageError says the disk is full and resumable."""

    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    target = tmp_path / "image-1.jpg"
    with pytest.raises(
        StorageError, match=r"image-1\.jpg: the disk is full.*resumable"
    ):
        await write_atomic(target, b"data")
    assert files_in(tmp_path) == []


async def test_unwritable_target_is_a_storage_error(tmp_path: Path) -> None:
    """A path that cannot be created raises StorageError, leaving nothing behind."""
    blocker = tmp_path / "images"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="check the run directory is writable"):
        await write_atomic(blocker / "a" / "image-1.jpg", b"data")
    assert files_in(tmp_path) == ["images"]


async def test_cancel_mid_write_leaves_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the bytes are being synced: no .part and no image remain."""
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    target = tmp_path / "image-1.jpg"
    scope = anyio.CancelScope()
    finished = False

    async def writer() -> None:
        nonlocal finished
        with scope:
            await write_atomic(target, b"x" * 100_000)
            finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        assert await anyio.to_thread.run_sync(entered.wait, 5)
        scope.cancel()
        release.set()
    assert scope.cancelled_caught
    assert not finished
    assert files_in(tmp_path) == []


async def test_write_atomic_many_lands_a_batch_across_directories(
    tmp_path: Path,
) -> None:
    """Str and Path targets in several (new) directories: bytes in place, sha256 in
    order, no .part left; a second batch replaces files whole."""
    batch: list[tuple[str | Path, bytes]] = [
        (f"{tmp_path}/images/a/x/s-1.png", b"\x89PNG" + os.urandom(70_000)),
        (f"{tmp_path}/images/a/x/s-1.json", b'{"seed": 1}\n'),
        (tmp_path / "images" / "b" / "y" / "s-2.png", b""),
    ]
    digests = await write_atomic_many(batch)
    assert digests == [hashlib.sha256(data).hexdigest() for _, data in batch]
    for path, data in batch:
        assert read(path) == data
    assert files_in(tmp_path) == [
        "images/a/x/s-1.json",
        "images/a/x/s-1.png",
        "images/b/y/s-2.png",
    ]
    await write_atomic_many([(batch[0][0], b"again")])
    assert read(batch[0][0]) == b"again"


Identity = tuple[int, int]


def _identity(path: str | os.PathLike[str]) -> Identity:
    """A file's or directory's (device, inode): a rename keeps it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> set[Identity]:
    """Every file and directory os.fsync is called on from now (it still syncs)."""
    real = os.fsync
    seen: set[Identity] = set()

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        seen.add((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _batch(root: Path) -> list[tuple[str | Path, bytes]]:
    return [
        (f"{root}/images/a/x/s-1.png", b"\x89PNG" + os.urandom(5000)),
        (f"{root}/images/a/x/s-1.json", b'{"seed": 1}\n'),
        (root / "images" / "b" / "y" / "s-2.png", b"\x89PNG"),
    ]


async def test_per_file_sync_fsyncs_every_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsynced: set[Identity]
) -> None:
    """REMIX_FSYNC=per-file (the only way without Linux's syncfs, as on macOS):
    each file of a batch is fsynced before its rename, then each directory."""
    monkeypatch.setenv(FSYNC_ENV, PER_FILE)
    batch = _batch(tmp_path)
    await write_atomic_many(batch)
    for path, data in batch:
        assert read(path) == data
        assert _identity(path) in fsynced, path
        assert _identity(os.path.dirname(path)) in fsynced, path
    assert len(fsynced) == 5  # 3 files, 2 directories
    assert not [name for name in files_in(tmp_path) if name.endswith(".part")]


@pytest.mark.skipif(sys.platform != "linux", reason="syncfs is Linux's")
async def test_a_batch_on_linux_syncs_its_filesystem_once(
    tmp_path: Path, fsynced: set[Identity]
) -> None:
    """Without the switch a batch's contents go out with one syncfs: fsync is
    called on its directories only."""
    batch = _batch(tmp_path)
    await write_atomic_many(batch)
    assert fsynced == {_identity(os.path.dirname(path)) for path, _ in batch}


async def test_a_job_stores_every_file_fsynced_one_by_one(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fsynced: set[Identity],
    make_sandbox: SandboxFactory,
) -> None:
    """A small real run with REMIX_FSYNC=per-file: every image and sidecar it
    stores, and every directory holding them, was fsynced."""
    monkeypatch.setenv(FSYNC_ENV, PER_FILE)
    server = await make_sandbox(SandboxConfig(latency_s=0.02, render_scale=0.05))
    job = write_job(tmp_path, refs=2)
    run_dir = tmp_path / "run"
    summary = await run_manifest(
        job, run_dir, fast_settings(tmp_path, base_url(server))
    )
    assert summary.exit_code == 0
    stored = [p for p in (run_dir / "images").rglob("*") if p.is_file()]
    assert len([p for p in stored if p.suffix == ".json"]) == summary.images_done > 0
    for path in stored:
        assert _identity(path) in fsynced, path
        assert _identity(path.parent) in fsynced, path.parent


@pytest.mark.parametrize("failing_call", ["write", "replace"])
async def test_write_atomic_many_failure_leaves_whole_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: str
) -> None:
    """ENOSPC on the third file's write, or on its rename: a StorageError saying the
    disk is full; no .part stays; what was renamed before is whole, the rest absent."""
    real = getattr(os, failing_call)
    calls = 0

    def third_fails(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, failing_call, third_fails)
    batch = [(f"{tmp_path}/d/image-{n}.png", bytes([n]) * 5000) for n in range(4)]
    with pytest.raises(StorageError, match=r"the disk is full.*resumable"):
        await write_atomic_many(batch)
    left = files_in(tmp_path)
    assert not [name for name in left if name.endswith(".part")]
    committed = ["d/image-0.png", "d/image-1.png"] if failing_call == "replace" else []
    assert left == committed
    for name in committed:
        assert read(tmp_path / name) == bytes([int(name[-5])]) * 5000


@given(
    stem=st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1),
    ext=st.sampled_from(["", ".png", ".jpg", ".webp", ".tar.gz"]),
)
def test_sidecar_path_is_one_name_for_str_and_path(stem: str, ext: str) -> None:
    """The engine names sidecars from strings, the gallery from Paths: one name, the
    image's with its extension (if any) replaced by .json."""
    assume(stem + ext not in {".", ".."})  # a directory, not a file name
    image = f"images/a.b/{stem}{ext}"
    sidecar = sidecar_path(image)
    assert sidecar_path(Path(image)) == Path(sidecar)
    assert sidecar.startswith("images/a.b/")
    assert sidecar.endswith(".json")
    if ext:
        assert sidecar == f"images/a.b/{stem}{ext.rsplit('.', 1)[0]}.json"


# ---------------------------------------------------------------------------
# Sidecars and cleanup


async def test_sidecar_is_sorted_json_with_exact_decimals(tmp_path: Path) -> None:
    """The sidecar sits next to the image, with sorted keys and decimal strings."""
    image = tmp_path / "remixStrength=0.5-1.jpg"
    meta = {
        "seed": 7,
        "cost_usd": Decimal("0.1") * 3,
        "completed_at": datetime(2026, 1, 2, tzinfo=UTC),
        "path": PurePosixPath("images/a/b/remixStrength=0.5-1.jpg"),
        "prompt": "a café ✨",
    }
    written = await write_sidecar(image, meta)
    assert written == sidecar_path(image) == tmp_path / "remixStrength=0.5-1.json"
    text = written.read_text(encoding="utf-8")
    loaded = json.loads(text)
    assert list(loaded) == sorted(meta)
    assert loaded["cost_usd"] == "0.3"
    assert Decimal(loaded["cost_usd"]) == Decimal("0.3")
    assert loaded["completed_at"] == "2026-01-02T00:00:00+00:00"
    assert loaded["path"] == "images/a/b/remixStrength=0.5-1.jpg"
    assert loaded["prompt"] == "a café ✨"
    assert files_in(tmp_path) == ["remixStrength=0.5-1.json"]


async def test_sidecar_rejects_unknown_types(tmp_path: Path) -> None:
    """A value JSON cannot hold is a bug: TypeError, and no file written."""
    with pytest.raises(TypeError, match="cannot store object in a sidecar"):
        await write_sidecar(tmp_path / "i.jpg", {"x": object()})
    assert files_in(tmp_path) == []


def test_clean_partials_removes_only_part_files(tmp_path: Path) -> None:
    """Leftover .part files anywhere in the run dir go; real files stay."""
    deep = tmp_path / "images" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "image-1.jpg").write_bytes(b"ok")
    (deep / "image-2.jpg.part").write_bytes(b"half")
    (tmp_path / "ledger.csv.part").write_bytes(b"half")
    assert clean_partials(tmp_path) == 2
    assert files_in(tmp_path) == ["images/a/b/image-1.jpg"]
    assert clean_partials(tmp_path) == 0
    assert clean_partials(tmp_path / "missing") == 0
