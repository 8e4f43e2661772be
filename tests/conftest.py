"""Shared test fixtures: the anyio backend, and sandbox servers on ephemeral ports.

``sandbox`` is a started ``TestServer`` running ``SandboxConfig(seed=0, latency_s=0)``
(API key ``"sandbox"``); ``make_sandbox`` builds more, with any config and clock:

    server = await make_sandbox(SandboxConfig(latency_s=0, rate_limit_rate=1.0))
    base_url = str(server.make_url("/v1"))
    state = server.app[STATE]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import settings

from pipeline.sandbox import SandboxConfig, create_app

# The default run times nothing (timing goals are marked perf): no per-example
# deadline, which a loaded machine misses without anything being wrong.
settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SandboxFactory(Protocol):
    async def __call__(
        self,
        config: SandboxConfig | None = None,
        *,
        clock: Callable[[], float] = ...,
    ) -> TestServer: ...


@pytest.fixture
async def make_sandbox() -> AsyncIterator[SandboxFactory]:
    """Start sandbox servers on demand; all are closed when the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            config: SandboxConfig | None = None,
            *,
            clock: Callable[[], float] = time.monotonic,
        ) -> TestServer:
            app = create_app(config or SandboxConfig(seed=0, latency_s=0), clock=clock)
            server = TestServer(app)
            await stack.enter_async_context(server)
            return server

        yield make


@pytest.fixture
async def sandbox(make_sandbox: SandboxFactory) -> TestServer:
    """A started sandbox with zero latency and the default key ``"sandbox"``."""
    return await make_sandbox()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that sends the sandbox's key."""
    async with aiohttp.ClientSession(
        headers={"Authorization": "Bearer sandbox"}
    ) as session:
        yield session
