"""``--sandbox``: the commands' in-process sandbox, and settings that point at it."""

from __future__ import annotations

import contextlib
from typing import Final

from pydantic import SecretStr

from pipeline.config import Settings

SANDBOX_KEY: Final = "sandbox"
"""The in-process sandbox's key: a real key is never sent to it."""
SANDBOX_LATENCY_S: Final = 0.5
"""The demo's per-task latency: slow enough to show a run's progress."""


async def with_sandbox(
    stack: contextlib.AsyncExitStack, settings: Settings
) -> Settings:
    """Start the default sandbox for the life of ``stack``; ``settings`` pointing at
    it, with its own key."""
    # Imported here: serving is not every command's import cost.
    from pipeline.sandbox import SandboxConfig, running_sandbox

    base_url = await stack.enter_async_context(
        running_sandbox(SandboxConfig(api_key=SANDBOX_KEY, latency_s=SANDBOX_LATENCY_S))
    )
    return settings.model_copy(
        update={
            "api": settings.api.model_copy(update={"base_url": base_url}),
            "api_key": SecretStr(SANDBOX_KEY),
        }
    )
