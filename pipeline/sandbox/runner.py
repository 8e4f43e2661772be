"""Running the sandbox on a real socket: in-process (async) or as a blocking server."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from aiohttp import web

from pipeline.config import loop_options
from pipeline.sandbox.app import create_app
from pipeline.sandbox.config import API_PATH, SandboxConfig


@asynccontextmanager
async def serving(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``app`` (the sandbox, or a proxy in front of it) for the duration of
    the block; yields its API URL. ``port=0`` binds an ephemeral port; the URL
    names the real one."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{shown}:{bound_port}{API_PATH}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_sandbox(
    config: SandboxConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve a sandbox with ``config`` for the duration of the block; yields its
    base URL."""
    async with serving(create_app(config), host, port) as url:
        yield url


async def serve_until_signalled(host: str, port: int, config: SandboxConfig) -> None:
    """Serve until SIGINT or SIGTERM, announcing the base URL on stdout's first line."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running_sandbox(config, host, port) as base_url:
            # The CLI contract: a subprocess reads the bound URL from the first line.
            sys.stdout.write(base_url + "\n")
            sys.stdout.flush()
            async for _ in signals:
                break


def serve(host: str, port: int, config: SandboxConfig) -> None:
    """Blocking entry point for ``remix sandbox``: serve until SIGINT/SIGTERM."""
    anyio.run(
        serve_until_signalled,
        host,
        port,
        config,
        backend="asyncio",
        backend_options=loop_options("auto"),
    )
