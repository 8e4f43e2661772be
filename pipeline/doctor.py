"""``remix doctor``: what an account and its API are found to do, without spending.

Each free check is one getResponse request (runware-protocol.md §3, §10):

1. **Key**: a getResponse about a random taskUUID. A refusal (401/403 or a key code)
   or no answer at all makes the account unusable.
2. **Unknown taskUUID**: that same answer, read as ``remix run`` reads it: a code of
   the not-found family, no item, or "processing" (``UnknownTask``).
3. **Batched getResponse**: two random taskUUIDs in one request: both answered, only
   the first, refused, or nothing (``PollMode``).
4. **Round trip**: the median and max time of these requests.

``spend_one`` adds one real task end to end (``pipeline.spend_one``: the cheapest
rendering speed at the smallest size), announced with its price before it is sent.

The findings are a ``Dialect`` written to ``cache_path(base_url)``, where ``remix
run`` finds it (``load_dialect``). Nothing here prints: the CLI renders ``Findings``.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from pipeline import spend_one as paid
from pipeline.answers import PollOutcome, describe
from pipeline.client import RunwareClient
from pipeline.config import ENV_API_KEY, Settings
from pipeline.dialect import (
    Dialect,
    PollMode,
    UnknownTask,
    cache_path,
    save_dialect,
    unknown_task_answer,
)
from pipeline.errors import (
    ApiError,
    AuthError,
    InsufficientCreditError,
    ProtocolError,
    RateLimitedError,
    RequestTimeoutError,
    ServerError,
)
from pipeline.exit_codes import ExitCode
from pipeline.spend_one import Spend
from pipeline.unreachable import connection_cause, host_of
from pipeline.wire import (
    Envelope,
)

__all__ = [
    "Check",
    "Findings",
    "RoundTrip",
    "Spend",
    "examine",
]

log = logging.getLogger(__name__)

ROUND_TRIP_SAMPLES: Final = 3
"""At least this many timed requests, when the checks themselves made fewer."""
DOCTOR_ATTEMPTS: Final = 3
DOCTOR_RETRY_TOTAL_S: Final = 15.0
"""The doctor answers in seconds: a host that refuses three attempts is reported,
not retried for ``retry.total_s``."""


@dataclass(frozen=True, slots=True)
class Check:
    """One row of the doctor's table."""

    name: str
    """What was checked."""
    found: str
    """What the API did."""
    action: str
    """What remix will do about it."""
    ok: bool = True


@dataclass(frozen=True, slots=True)
class RoundTrip:
    median_ms: float
    max_ms: float
    samples: int


@dataclass(slots=True)
class Findings:
    base_url: str
    """The API examined, without any credentials in the URL."""
    checks: list[Check] = field(default_factory=list)
    usable: bool = False
    """The key was accepted and every free check was answered."""
    dialect: Dialect | None = None
    round_trip: RoundTrip | None = None
    spend: Spend | None = None
    cache: Path | None = None
    """Where the dialect was written; None when it was not."""
    cache_note: str = ""
    """Why it was not written, when it was not."""

    @property
    def exit_code(self) -> ExitCode:
        """STOPPED unusable or unable to pay (as ``run``); FAILED the paid task
        failed; else OK."""
        if not self.usable:
            return ExitCode.STOPPED
        if self.spend is not None:
            if self.spend.credit_refused:
                return ExitCode.STOPPED
            if self.spend.error is not None:
                return ExitCode.FAILED
        return ExitCode.OK

    @property
    def problem(self) -> str | None:
        """What made the account unusable, in one line."""
        if self.usable:
            return None
        failed = [c.found for c in self.checks if not c.ok]
        return failed[0] if failed else "not checked"

    def as_json(self) -> dict[str, Any]:
        spend = self.spend
        return {
            "base_url": self.base_url,
            "usable": self.usable,
            "exit_code": self.exit_code,
            "checks": [
                {"check": c.name, "found": c.found, "action": c.action, "ok": c.ok}
                for c in self.checks
            ],
            "dialect": None
            if self.dialect is None
            else self.dialect.model_dump(mode="json"),
            "round_trip_ms": None
            if self.round_trip is None
            else {
                "median": round(self.round_trip.median_ms, 1),
                "max": round(self.round_trip.max_ms, 1),
                "samples": self.round_trip.samples,
            },
            "spend": None
            if spend is None
            else {
                "task_uuid": spend.task_uuid,
                "rendering_speed": spend.rendering_speed,
                "width": spend.width,
                "height": spend.height,
                "price_usd": str(spend.price_usd),
                "seconds": None if spend.seconds is None else round(spend.seconds, 3),
                "cost_usd": None if spend.cost_usd is None else str(spend.cost_usd),
                "image_bytes": spend.image_bytes,
                "error": spend.error,
            },
            "cache": None if self.cache is None else str(self.cache),
            "cache_note": self.cache_note or None,
        }


# ---------------------------------------------------------------------- examine


async def examine(
    settings: Settings,
    *,
    spend_one: bool = False,
    announce: Callable[[str], None] | None = None,
    out: Path | None = None,
    save: bool = True,
) -> Findings:
    """Check ``settings``' key and API, and record what its answers say.

    Args:
        spend_one: also run one real task end to end (costs one image).
        announce: told the price before that task is sent.
        out: where to write that task's image (otherwise it is only counted).
        save: write the findings to ``cache_path(settings.api.base_url)`` when the
            free checks all ran.
    """
    base_url = settings.api.base_url
    findings = Findings(base_url=_shown_url(base_url))
    key = settings.api_key
    if key is None or not key.get_secret_value():
        findings.checks.append(
            Check(
                "API key",
                "no API key configured",
                f"set {ENV_API_KEY} to a key from https://my.runware.ai/keys "
                "(or try the doctor with --sandbox)",
                ok=False,
            )
        )
        findings.cache_note = "not written: nothing was checked"
        return findings
    retry = settings.retry.model_copy(
        update={
            "attempts": min(settings.retry.attempts, DOCTOR_ATTEMPTS),
            "total_s": min(settings.retry.total_s, DOCTOR_RETRY_TOTAL_S),
        }
    )
    settings = settings.model_copy(update={"retry": retry})
    async with RunwareClient(settings) as client:
        probe = _Probe(client)
        try:
            await _free_checks(probe, findings, settings)
        except AuthError as exc:
            findings.checks.append(
                Check(
                    "API key",
                    f"key refused (HTTP {exc.status or '?'}"
                    + (f", {exc.code})" if exc.code else ")"),
                    f"nothing can run: set {ENV_API_KEY} to a valid key "
                    "(https://my.runware.ai/keys)",
                    ok=False,
                )
            )
        except InsufficientCreditError as exc:
            findings.checks.append(
                Check(
                    "API key",
                    f"accepted, but the account cannot pay (HTTP "
                    f"{exc.status or '?'}" + (f", {exc.code})" if exc.code else ")"),
                    "nothing can run: top up the account",
                    ok=False,
                )
            )
        except ApiError as exc:
            findings.checks.append(
                Check(
                    "API reachable",
                    f"unreachable: {host_of(base_url)} ({_cause(exc, settings)})",
                    "nothing can run: check the network, api.base_url or "
                    "REMIX_BASE_URL",
                    ok=False,
                )
            )
        else:
            findings.usable = True
        if not findings.usable:
            findings.cache_note = "not written: the checks did not finish"
            return findings
        # Kept before anything is spent: an interrupted --spend-one loses nothing.
        if save:
            assert findings.dialect is not None
            findings.cache = cache_path(base_url)
            save_dialect(findings.cache, findings.dialect)
        else:
            findings.cache_note = "not written"
        if spend_one:
            findings.spend = await paid.spend_one(client, settings, announce, out)
            findings.checks.append(_spend_check(findings.spend))
    return findings


class _Probe:
    """getResponse about random taskUUIDs, each request timed."""

    def __init__(self, client: RunwareClient) -> None:
        self.client = client
        self.times_ms: list[float] = []

    async def ask(self, count: int) -> tuple[list[str], PollOutcome, Envelope]:
        uuids = [str(uuid.uuid4()) for _ in range(count)]
        retries = self.client.retries
        started = time.perf_counter()
        outcome, envelope = await self.client.poll_answer(uuids)
        if self.client.retries == retries:  # a retried call times its waits too
            self.times_ms.append((time.perf_counter() - started) * 1000)
        return uuids, outcome, envelope


async def _free_checks(probe: _Probe, findings: Findings, settings: Settings) -> None:
    """Checks 1-4; the API errors of any request propagate."""
    (asked,), outcome, envelope = await probe.ask(1)
    findings.checks.append(
        Check(
            "API key",
            "accepted (a getResponse was answered)",
            "runs use it",
        )
    )
    unknown, code, check = _unknown_task(asked, outcome, envelope)
    findings.checks.append(check)

    _, batch, _ = await probe.ask(2)
    mode, check = _batching(batch, unknown, settings)
    findings.checks.append(check)

    extra = 0
    while len(probe.times_ms) < ROUND_TRIP_SAMPLES and extra < 2:
        await probe.ask(1)
        extra += 1
    times = probe.times_ms
    if times:
        findings.round_trip = RoundTrip(
            statistics.median(times), max(times), len(times)
        )
        findings.checks.append(
            Check(
                "round trip",
                f"median {statistics.median(times):.0f} ms, max {max(times):.0f} ms "
                f"({len(times)} requests)",
                "nothing to set: each answer takes at least this long; remix learns "
                "task latency while it runs",
            )
        )
    findings.dialect = Dialect(
        poll_mode=mode,
        unknown_task=unknown,
        unknown_task_code=code,
        checked_at=datetime.now(UTC),
        source="doctor",
    )


def _unknown_task(
    asked: str, outcome: PollOutcome, envelope: Envelope
) -> tuple[UnknownTask, str | None, Check]:
    code: str | None = None
    kind = unknown_task_answer(outcome)  # what remix run reads from the same answer
    match kind:
        case UnknownTask.NOT_FOUND:
            code = next(
                (e.code for e in envelope.errors if e.task_uuid == asked),
                envelope.errors[0].code if envelope.errors else "unknown",
            )
            found = f"answered {code}"
        case UnknownTask.SILENT:
            found = "no item at all (nothing said about it)"
        case UnknownTask.PROCESSING:
            found = 'answered "processing", as for a running task'
        case UnknownTask.UNKNOWN if (error := outcome.failed.get(asked)) is not None:
            found = f"answered {describe([error])}"
        case UnknownTask.UNKNOWN:
            found = "answered with a result: a task never sent"
    if Dialect(unknown_task=kind).processing_proves_acceptance:
        action = (
            'an ambiguous submit is settled by asking ("processing" proves it was '
            "accepted), then by sending the same taskUUID again"
        )
    else:
        action = (
            '"processing" proves nothing: an ambiguous submit is sent again under '
            "the same taskUUID after poll.not_found_grace_s (a conflict answer "
            "means it was accepted)"
        )
    ok = kind is not UnknownTask.UNKNOWN
    return kind, code, Check("unknown taskUUID", found, action, ok=ok)


def _batching(
    outcome: PollOutcome, unknown: UnknownTask, settings: Settings
) -> tuple[PollMode, Check]:
    name = "batched getResponse"
    single = "one taskUUID per request"
    answered = outcome.answered
    if outcome.batch_refused:
        return PollMode.SINGLE, Check(
            name, "a getResponse of 2 tasks was refused", single
        )
    if len(answered) >= 2:
        return PollMode.BATCHED, Check(
            name,
            "2 tasks in one request answered in full",
            f"up to limits.poll_batch ({settings.limits.poll_batch}) taskUUIDs "
            "per request",
        )
    if answered:
        return PollMode.SINGLE, Check(
            name, "only the first of 2 tasks answered", single
        )
    if unknown is UnknownTask.SILENT:
        return PollMode.UNKNOWN, Check(
            name,
            "nothing answered, as for one unknown task: this probe cannot tell",
            "remix will judge batches on live tasks",
        )
    return PollMode.SINGLE, Check(name, "nothing answered for 2 tasks", single)


def _spend_check(spend: Spend) -> Check:
    name = "one real task"
    what = f"{spend.rendering_speed} {spend.width}x{spend.height}"
    if spend.error is not None:
        action = (
            "runs stop at once until the account is topped up"
            if spend.credit_refused
            else "look at the error before a large run"
        )
        return Check(name, f"{what}: {spend.error}", action, ok=False)
    cost = "no cost reported" if spend.cost_usd is None else f"cost ${spend.cost_usd}"
    seconds = spend.seconds or 0.0
    size = spend.image_bytes or 0
    return Check(
        name,
        f"{what} done in {seconds:.1f}s, {cost} (expected ${spend.price_usd}), "
        f"image {size:,} bytes",
        "submit, poll and download work end to end",
    )


# ---------------------------------------------------------------------- helpers


def _shown_url(base_url: str) -> str:
    """The URL without user info, query or fragment (never a credential)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _cause(exc: ApiError, settings: Settings) -> str:
    """Why a request got no usable answer, in a few plain words."""
    if isinstance(exc, RequestTimeoutError):
        return f"no answer within {settings.api.request_timeout_s:g}s"
    if isinstance(exc, ServerError | RateLimitedError):
        return f"HTTP {exc.status}, {DOCTOR_ATTEMPTS} attempts"
    if isinstance(exc, ProtocolError):
        return f"HTTP {exc.status}: not a Runware answer"
    if exc.__cause__ is not None:
        return connection_cause(exc.__cause__)
    return " ".join(str(exc).split()) or type(exc).__name__
