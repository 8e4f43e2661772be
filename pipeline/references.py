"""Local reference files → one imageUpload per content hash, remembered in the journal.

URLs, image UUIDs and data URIs need no upload: the manifest passes them through.
A local file is read, shrunk to the API's 2048 px storage cap if larger, uploaded once
per sha256 of its bytes, and the returned image UUID is reused by every task (and by a
resumed run, through the journal's ``uploaded`` events).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Final, Protocol

import anyio
from PIL import Image

from pipeline.errors import ManifestError

log = logging.getLogger(__name__)

MAX_SIDE_PX: Final = 2048
"""Runware stores uploaded images at most this large per side."""

_MIME: Final = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


class Uploader(Protocol):
    async def upload_image(self, image: str) -> str: ...


def encode_for_upload(data: bytes, source: Path) -> str:
    """A data URI of the image, re-encoded only when needed (size cap, odd format)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            if fmt in _MIME and max(img.size) <= MAX_SIDE_PX:
                return f"data:{_MIME[fmt]};base64,{base64.b64encode(data).decode()}"
            img.thumbnail((MAX_SIDE_PX, MAX_SIDE_PX))
            out = io.BytesIO()
            if img.mode in ("RGBA", "LA", "P"):
                img.save(out, "PNG")
                mime = "image/png"
            else:
                img.convert("RGB").save(out, "JPEG", quality=95)
                mime = "image/jpeg"
    except (OSError, ValueError) as exc:
        raise ManifestError([f"{source}: not a readable image: {exc}"]) from exc
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode()}"


class ReferenceUploader:
    """Uploads each distinct local image once and remembers its image UUID."""

    def __init__(
        self,
        client: Uploader,
        known: MutableMapping[str, str],
        on_uploaded: Callable[[str, str, Path], Awaitable[None]],
    ) -> None:
        """
        Args:
            client: anything with ``upload_image(data_uri) -> image UUID``.
            known: sha256 → image UUID from earlier runs (the journal); updated here.
            on_uploaded: journals a new upload before its UUID is used.
        """
        self._client = client
        self._known = known
        self._on_uploaded = on_uploaded
        self._by_path: dict[Path, str] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._fresh: set[str] = set()
        self._inherited: set[str] = set(known.values())
        self.uploads = 0

    async def resolve(self, path: Path) -> str:
        """The image UUID for a local file, uploading it on first use."""
        if (cached := self._by_path.get(path)) is not None:
            return cached
        data = await anyio.Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        lock = self._locks.setdefault(digest, anyio.Lock())
        async with lock:  # two tasks sharing a new file upload it once
            image_uuid = self._known.get(digest)
            if image_uuid is None:
                data_uri = await anyio.to_thread.run_sync(encode_for_upload, data, path)
                image_uuid = await self._client.upload_image(data_uri)
                await self._on_uploaded(digest, image_uuid, path)
                self._known[digest] = image_uuid
                self._fresh.add(image_uuid)
                self.uploads += 1
                log.info("uploaded reference %s as %s", path.name, image_uuid)
        self._by_path[path] = image_uuid
        return image_uuid

    def inherited(self, image_uuids: Iterable[str]) -> list[str]:
        """Those of ``image_uuids`` that an earlier run uploaded (not this one)."""
        return [u for u in image_uuids if u in self._inherited and u not in self._fresh]

    def forget(self, image_uuid: str) -> None:
        """Never use this upload again: the API refused it (uploads expire 30 days
        after last use); the next resolve uploads the file anew. It stays counted
        as inherited, so tasks already prepared with it are recognised too."""
        for path in [p for p, u in self._by_path.items() if u == image_uuid]:
            del self._by_path[path]
        for digest in [d for d, u in self._known.items() if u == image_uuid]:
            del self._known[digest]

    async def resolve_all(self, paths: tuple[Path, ...]) -> dict[Path, str]:
        by_path = self._by_path  # every task asks; almost always already known
        return {path: by_path.get(path) or await self.resolve(path) for path in paths}
