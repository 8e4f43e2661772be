"""Seeded fault injection: decides, per request or download, which failure to simulate.

Each fault kind draws from its own ``random.Random`` derived from the sandbox seed, so
turning one rate up never changes the sequence another kind sees, and a rate of 0 never
draws at all. A rate of 1.0 always fires, which is what the tests use.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum


class Fault(StrEnum):
    """The failure scenarios the sandbox can play, chosen by configuration."""

    SERVER_ERROR = "server_error"
    """503 (or 500) before anything is accepted."""
    RATE_LIMIT = "rate_limit"
    """429 with Retry-After before anything is accepted."""
    DROP_AFTER_ACCEPT = "drop_after_accept"
    """The tasks are stored, then the connection closes with no response."""
    MALFORMED = "malformed"
    """200 with a body that is not the JSON envelope."""
    DOWNLOAD_FAILURE = "download_failure"
    """An image GET answers 500."""
    TASK_FAIL = "task_fail"
    """The task ends in an ``inferenceError`` item instead of images."""


@dataclass(frozen=True, kw_only=True)
class FaultRates:
    """Probability of each fault, 0..1."""

    server_error: float = 0.0
    rate_limit: float = 0.0
    drop_after_accept: float = 0.0
    malformed: float = 0.0
    download_failure: float = 0.0
    task_fail: float = 0.0

    def __post_init__(self) -> None:
        for fault in Fault:
            rate = self.rate(fault)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{fault.value} rate must be within 0..1, got {rate}")

    def rate(self, fault: Fault) -> float:
        return float(getattr(self, fault.value))


class FaultInjector:
    """Rolls the dice for each fault kind from independent seeded streams."""

    def __init__(
        self,
        rates: FaultRates,
        *,
        seed: int = 0,
        task_types: Collection[str] | None = None,
    ) -> None:
        self._rates = rates
        self._task_types = frozenset(task_types) if task_types is not None else None
        self._rngs = {fault: random.Random(f"{seed}:{fault.value}") for fault in Fault}
        self.fired: dict[Fault, int] = dict.fromkeys(Fault, 0)
        """How often each fault fired: tests and benchmarks read it."""

    def applies_to(self, task_types: Collection[str]) -> bool:
        """Whether a request holding these task types is subject to request faults."""
        if self._task_types is None:
            return True
        return not self._task_types.isdisjoint(task_types)

    def roll(self, fault: Fault) -> bool:
        """True when this fault should happen now (never draws at rate 0)."""
        rate = self._rates.rate(fault)
        if rate <= 0.0:
            return False
        hit = rate >= 1.0 or self._rngs[fault].random() < rate
        if hit:
            self.fired[fault] += 1
        return hit

    def choice(self, fault: Fault, options: int) -> int:
        """A seeded pick among ``options`` variants of a fault (e.g. 500 vs 503)."""
        return self._rngs[fault].randrange(options)
