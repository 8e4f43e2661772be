"""Gallery thumbnails: JPEGs made once with Pillow, kept while newer than their image.

``thumbs/`` mirrors the run dir (``images/x.png`` -> ``thumbs/images/x.jpg``); work
runs in a few threads (Pillow releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Final, TypeVar

from PIL import Image, ImageOps

log = logging.getLogger(__name__)

THUMBS_DIR: Final = "thumbs"
THUMB_WIDTH: Final = 320
"""Thumbnail width in pixels (2x the default cell width, for sharp HiDPI display)."""
_JPEG_QUALITY: Final = 85
_THUMB_CHUNK: Final = 64
"""Thumbnails per thread-pool work item, at most."""

_T = TypeVar("_T")
_R = TypeVar("_R")


def thumb_relpath(image_relpath: str) -> PurePosixPath:
    """Where the thumbnail of ``images/...`` goes: ``thumbs/images/....jpg``."""
    return PurePosixPath(THUMBS_DIR, image_relpath).with_suffix(".jpg")


def make_thumbnail(
    src: Path, dst: Path, *, width: int = THUMB_WIDTH
) -> tuple[int, int]:
    """Write a JPEG thumbnail of ``src`` (``width`` wide at most); return its size.

    Skipped when ``dst`` is at least as new as ``src``. The ICC profile is kept and
    transparency is laid on neutral grey, so colours are not shifted.

    Raises:
        OSError: ``src`` cannot be read or is not an image, or ``dst`` cannot be
            written.
    """
    try:
        if dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            with Image.open(dst) as done:
                return done.size
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.debug("thumbnail %s unreadable, rebuilding: %s", dst, exc)
    with Image.open(src) as opened:
        w, h = opened.size
        if w > width:
            # JPEG: decode at a reduced scale, far faster for big images.
            opened.draft("RGB", (width, max(1, h * width // w)))
        icc = opened.info.get("icc_profile")
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (128, 128, 128))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.thumbnail((width, width * 4), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True, icc_profile=icc)
        size = image.size
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Thumbnails are derived data: a rename keeps them whole, no fsync needed.
    tmp = dst.with_name(dst.name + ".part")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave a half thumbnail behind
        raise
    return size


def thumbnail_or_none(src: Path, dst: Path) -> tuple[int, int] | None:
    """:func:`make_thumbnail`, or None (logged) when ``src`` is unreadable."""
    try:
        return make_thumbnail(src, dst)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("no thumbnail for %s: %s", src, exc)
        return None


def in_threads(func: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``func`` over ``items`` in up to 8 threads, results in order.

    Work goes out in a few dozen chunks, not one future per item: a future costs a
    couple of KB, which a 2,000-image page would otherwise hold all at once.
    """
    if not items:
        return []
    workers = min(8, os.cpu_count() or 1, len(items))
    size = max(1, min(_THUMB_CHUNK, -(-len(items) // (workers * 4))))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    results: list[_R] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(lambda chunk: [func(item) for item in chunk], chunks):
            results.extend(done)
    return results


def make_thumbnails(pairs: Sequence[tuple[Path, Path]]) -> list[tuple[int, int] | None]:
    """Thumbnails for ``(src, dst)`` pairs, in parallel threads; None where unreadable.

    Pillow releases the GIL while decoding and resizing, so threads scale.
    """
    return in_threads(lambda pair: thumbnail_or_none(*pair), pairs)
