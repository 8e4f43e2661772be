"""The progress protocol: a tqdm bar in a terminal, nothing in tests or CI logs."""

from __future__ import annotations

from decimal import Decimal
from typing import Never, Protocol

from tqdm import tqdm


class Progress(Protocol):
    """What the engine reports as a run goes; one writer (the run's accounts)."""

    def start(self, total_images: int, done_images: int) -> None: ...

    def update(
        self, *, done: int, failed: int, in_flight: int, spent_usd: Decimal
    ) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing (tests, --quiet, scripts)."""

    def start(self, total_images: int, done_images: int) -> None:
        return None

    def update(
        self, *, done: int, failed: int, in_flight: int, spent_usd: Decimal
    ) -> None:
        return None

    def close(self) -> None:
        return None


class TqdmProgress:
    """images done / total, failed, in flight, $ spent and ETA on one line.

    ``disable=None`` turns the bar off when stderr is not a TTY, so CI logs stay clean.
    """

    def __init__(self) -> None:
        self._bar: tqdm[Never] | None = None
        self._done = 0

    def start(self, total_images: int, done_images: int) -> None:
        self._bar = tqdm(
            total=total_images,
            initial=done_images,
            unit="img",
            disable=None,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._done = done_images

    def update(
        self, *, done: int, failed: int, in_flight: int, spent_usd: Decimal
    ) -> None:
        if self._bar is None:
            return
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        self._bar.set_postfix_str(
            f"failed={failed} in_flight={in_flight} spent=${spent_usd:.2f}",
            refresh=False,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
