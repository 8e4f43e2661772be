"""The sandbox's switches: latency, limits, prices, faults and dialects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Final, get_args

from pipeline.sandbox.answers import (
    DIALECTS,
    Ack,
    FailedAs,
    PollBatch,
    PollTaskType,
    ReuseCode,
    UnknownTask,
)
from pipeline.sandbox.faults import FaultRates
from pipeline.wire import DEFAULT_PRICE_USD

API_PATH: Final = "/v1"
IMAGES_PATH: Final = "/images"
CREDIT_PATH: Final = "/sandbox/credit"


def _default_prices() -> Mapping[str, Decimal]:
    return MappingProxyType(
        dict.fromkeys(("TURBO", "DEFAULT", "QUALITY"), DEFAULT_PRICE_USD)
    )


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """How the sandbox behaves: latency, limits, prices and which faults to play."""

    seed: int = 0
    api_key: str | None = field(default="sandbox", repr=False)
    """The key clients must send; None accepts any key (or none)."""
    latency_s: float = 0.3
    latency_jitter_s: float = 0.0
    result_stagger_s: float = 0.05
    """With numberResults > 1, image i finishes i * this after the first."""
    max_in_flight: int | None = None
    """Queue capacity in tasks; a submit beyond it gets 429 and nothing is accepted."""
    server_error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_s: float = 1.0
    drop_after_accept_rate: float = 0.0
    malformed_rate: float = 0.0
    download_failure_rate: float = 0.0
    slow_response_s: float = 0.0
    slow_download_s: float = 0.0
    """Extra delay before an image download is answered (a slow CDN)."""
    upload_latency_s: float = 0.0
    """How long one imageUpload takes (a big reference on a slow uplink)."""
    task_fail_rate: float = 0.0
    prices_usd: Mapping[str, Decimal] = field(
        default_factory=_default_prices, hash=False
    )
    """Price per image by renderingSpeed."""
    image_ttl_s: int = 3600
    """How long result URLs live when the request sets no ttl."""
    render_scale: float = 1.0
    """Render images this much smaller (benchmarks); reported sizes are unchanged."""
    fault_task_types: frozenset[str] | None = None
    """Only requests holding one of these task types get request faults (None: all)."""

    # -- dialects: how the undocumented parts are answered (runware-protocol.md §10).
    # The defaults are the sandbox's original answers; answers.py words each one.
    poll_task_type: PollTaskType = "imageInference"
    """The taskType of the items of a getResponse answer: processing, success and
    failure items (an unknown task's error item always says "getResponse"). Submit
    answers (acks, sync results) keep "imageInference"."""
    unknown_task: UnknownTask = "taskFailedOrNotFound"
    """How getResponse answers a taskUUID it does not know (never accepted, or
    expired): an ``errors`` item with that code, no item at all ("silent"), or a
    processing item forever ("processing")."""
    poll_batch: PollBatch = "all"
    """A request holding more than one getResponse task: each answered ("all"), only
    the first ("first"), the whole request refused with 400 ("reject"), or answered
    200 ``{"data": []}`` ("empty"); the last two process nothing of it."""
    failed_as: FailedAs = "errors"
    """A failed generation in a getResponse answer: an ``errors`` item, or a ``data``
    item with status "error" and a nested ``error`` (then HTTP 200)."""
    reuse_code: ReuseCode = "conflictTaskUUID"
    """The code refusing an imageInference whose taskUUID was accepted before."""
    ack: Ack = "processing"
    """An accepted async task is acknowledged with a processing item, or with nothing
    (``{"data": []}`` when the answer holds nothing else)."""
    credit_usd: Decimal | None = None
    """The account's balance in USD (None: unlimited). Each imageInference is
    charged ``price * numberResults`` when accepted, in array order, and refunded if
    it fails. One the balance does not cover is refused with insufficientCredits
    and not accepted (its taskUUID stays unused); HTTP 402 when every imageInference
    of the request was refused so. Top up with ``SandboxState.top_up`` or
    ``POST /sandbox/credit``."""

    def __post_init__(self) -> None:
        if self.render_scale <= 0:
            raise ValueError("render_scale must be positive")
        self.fault_rates()  # validates the rates
        for name, kind in DIALECTS.items():
            if getattr(self, name) not in get_args(kind):
                raise ValueError(
                    f"{name} must be one of {', '.join(get_args(kind))}, "
                    f"not {getattr(self, name)!r}"
                )
        credit = self.credit_usd
        # At run time too: a float here would make every charge inexact.
        if credit is not None and not (
            isinstance(credit, Decimal)  # type: ignore[redundant-expr]
            and credit.is_finite()
            and credit >= 0
        ):
            raise ValueError(
                f"credit_usd must be a non-negative Decimal or None, not {credit!r}"
            )

    def price_for(self, rendering_speed: str | None) -> Decimal:
        """USD per image for a renderingSpeed (None means DEFAULT)."""
        speed = rendering_speed or "DEFAULT"
        return self.prices_usd.get(speed, DEFAULT_PRICE_USD)

    def fault_rates(self) -> FaultRates:
        return FaultRates(
            server_error=self.server_error_rate,
            rate_limit=self.rate_limit_rate,
            drop_after_accept=self.drop_after_accept_rate,
            malformed=self.malformed_rate,
            download_failure=self.download_failure_rate,
            task_fail=self.task_fail_rate,
        )
