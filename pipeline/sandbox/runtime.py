"""What every part of the sandbox shares: its runtime (config, state, faults,
clock, the background job sink) and the per-task error."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

import aiohttp
import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.faults import FaultInjector
from pipeline.sandbox.state import SandboxState, SandboxTask
from pipeline.wire import ImageInferenceRequest

Clock = Callable[[], float]
Job = Callable[[], Coroutine[Any, Any, None]]
JsonObject = dict[str, Any]


class TaskError(Exception):
    """A per-task problem that becomes one item of the response's ``errors``."""

    def __init__(self, code: str, message: str, parameter: str | list[str]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.parameter = parameter


class SandboxRuntime:
    """The app's runtime: config, state, faults, clock and the background job sink."""

    def __init__(self, config: SandboxConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.state = SandboxState(seed=config.seed, credit_usd=config.credit_usd)
        self.faults = FaultInjector(
            config.fault_rates(), seed=config.seed, task_types=config.fault_task_types
        )
        self.session: aiohttp.ClientSession | None = None
        self.jobs: MemoryObjectSendStream[Job] | None = None

    def authorised(self, key: str | None) -> bool:
        expected = self.config.api_key
        if expected is None:
            return True
        return key is not None and hmac.compare_digest(key.encode(), expected.encode())

    def _price(self, task: SandboxTask) -> Decimal:
        return self.config.price_for(rendering_speed(task.request))

    async def _sleep_until(self, deadline: float) -> None:
        # The deadline is on the injected clock, so there is no event to wait for.
        while (remaining := deadline - self.clock()) > 0:  # noqa: ASYNC110
            await anyio.sleep(remaining)


def rendering_speed(req: ImageInferenceRequest) -> str | None:
    """The task's renderingSpeed (None: the API's default, DEFAULT)."""
    ideogram = req.provider_settings.ideogram if req.provider_settings else None
    return ideogram.rendering_speed if ideogram else None
