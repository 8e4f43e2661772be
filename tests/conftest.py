"""Shared test fixtures: the anyio backend (asyncio, since aiohttp is asyncio-only)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
