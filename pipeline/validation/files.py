"""Local image files: the only check that opens files, once per distinct path."""

from __future__ import annotations

import struct
from pathlib import Path

from PIL import Image


def image_problem(path: Path) -> str | None:
    """Why a local image cannot be used as a reference, or None when it can."""
    if not path.is_file():
        return f"file not found: {path}"
    try:
        with Image.open(path) as image:
            kind = image.format
            image.verify()
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        Image.DecompressionBombError,
    ) as exc:
        return f"not a readable image: {path} ({exc})"
    if kind not in ("PNG", "JPEG", "WEBP"):
        return f"{path} is {kind}; the API takes PNG, JPG or WEBP"
    return None


class ImageFiles:
    """`image_problem` of each distinct path, computed on first use and remembered:
    a file shared by many references and tasks is opened once."""

    def __init__(self) -> None:
        self._checked: dict[Path, str | None] = {}

    def problem(self, path: Path) -> str | None:
        if path not in self._checked:
            self._checked[path] = image_problem(path)
        return self._checked[path]

    def __len__(self) -> int:
        """Distinct local files seen (each will be uploaded once)."""
        return len(self._checked)
