"""remix: batch image-to-image runs on Runware's Ideogram Remix API."""

from __future__ import annotations

__all__: list[str] = []
