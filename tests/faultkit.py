"""Test helpers for the fault, crash and run-fatal tests: servers, gates, invariants.

- :func:`served` serves an aiohttp app (the sandbox, or a gate in front of it) on a
  real ephemeral port and yields its base URL, so a ``remix run`` subprocess or an
  in-process ``pipeline.cli.main`` (in another thread's loop) can reach it.
- :class:`Gate` is a tiny proxy in front of the sandbox that starts refusing
  requests (401, 402, ...) or runs a side effect (filling a disk) once a condition
  holds, e.g. "three images are on disk".
- :func:`run_facts` gathers what a run dir says about itself (journal, files,
  ledger) so tests can compare it with the sandbox's own counters.

Run as ``python -m tests.faultkit run ...`` it is ``remix`` with a crash armed:
``REMIX_TEST_CRASH=before:N`` (or ``after:N``) SIGKILLs the process at the N-th
rename of an image ``.part`` file into place, before or after the rename.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from PIL import Image

from pipeline.journal import JOURNAL_NAME, ResumeState, load_state, read_journal
from pipeline.journal_events import CompletedEvent, SubmittedEvent
from pipeline.ledger import write_ledger
from pipeline.sandbox import SandboxState, serving

IMAGE_SUFFIXES: Final = frozenset({".png", ".jpg", ".webp"})
CRASH_ENV: Final = "REMIX_TEST_CRASH"

FAST_CONFIG: Final[dict[str, dict[str, Any]]] = {
    "poll": {
        "interval_s": 0.05,
        "min_interval_s": 0.005,
        "first_after_s": 0.0,
        "max_interval_s": 0.2,
        "not_found_grace_s": 0.1,
    },
    "retry": {"wait_initial_s": 0.0, "wait_max_s": 0.0, "attempts": 4},
    "limits": {"requests_per_s": 10_000.0, "burst": 1_000},
    "run": {"shutdown_grace_s": 1.0},
}
"""jobkit.fast_settings as a config.toml, for ``remix run --config``."""


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """A config.toml with quick polls and zero retry waits (plus ``sections``)."""
    merged = {name: dict(values) for name, values in FAST_CONFIG.items()}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    lines: list[str] = []
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- serving


served = serving
"""Serve an app (the sandbox, or a gate in front of it) on 127.0.0.1:<ephemeral>;
yields ``http://host:port/v1``."""


# ------------------------------------------------------------------- gate


def error_response(status: int, code: str, message: str) -> web.Response:
    """A Runware-shaped error answer."""
    body = {"errors": [{"code": code, "message": message}]}
    return web.json_response(body, status=status)


@dataclass(kw_only=True)
class Gate:
    """Forwards API POSTs to ``upstream`` until ``trip_when()`` holds at a submit.

    From then on it answers ``refusal()`` to submits (or to every request, with
    ``refuse_all``), or, with no refusal, runs ``on_trip`` once and keeps forwarding
    (to break something else, like the disk). Image URLs point at the upstream.
    """

    upstream: str
    trip_when: Callable[[], bool]
    refusal: Callable[[], web.Response] | None = None
    refuse_all: bool = False
    on_trip: Callable[[], None] | None = None
    tripped: bool = False
    forwarded: Counter[str] = field(default_factory=Counter)
    refused: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1", self._handle)
        app.cleanup_ctx.append(self._session_ctx)
        return app

    async def _session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            self._session = session
            yield

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            tasks = json.loads(body)
            types = {str(t.get("taskType")) for t in tasks if isinstance(t, dict)}
        except (ValueError, TypeError):
            types = set()
        submit = "imageInference" in types
        if submit and not self.tripped and self.trip_when():
            self.tripped = True
            if self.on_trip is not None:
                self.on_trip()
        if self.tripped and self.refusal is not None and (submit or self.refuse_all):
            self.refused += 1
            return self.refusal()
        self.forwarded.update(types)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in {"authorization", "content-type", "accept"}
        }
        async with self._session.post(self.upstream, data=body, headers=headers) as up:
            data = await up.read()
            retry_after = up.headers.get("Retry-After")
            return web.Response(
                status=up.status,
                body=data,
                content_type="application/json",
                headers={} if retry_after is None else {"Retry-After": retry_after},
            )

    _session: aiohttp.ClientSession = field(init=False, repr=False)


# ------------------------------------------------------------ run facts


def completed_count(run_dir: Path) -> int:
    """``completed`` lines in the journal now (cheap enough to call per request)."""
    try:
        return (run_dir / JOURNAL_NAME).read_bytes().count(b'"event":"completed"')
    except FileNotFoundError:
        return 0


def image_files(run_dir: Path) -> list[Path]:
    root = run_dir / "images"
    return sorted(p for p in root.rglob("*") if p.suffix in IMAGE_SUFFIXES)


def part_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.part"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def undecodable(paths: list[Path]) -> list[str]:
    """Images Pillow cannot fully decode (a torn or truncated write)."""
    bad: list[str] = []
    for path in paths:
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                img.load()
        except Exception as exc:  # noqa: BLE001 - any decode failure is the finding
            bad.append(f"{path.name}: {exc}")
    return bad


def ledger_total(run_dir: Path) -> Decimal:
    """The sum of ledger.csv's cost column, rebuilt from the journal now."""
    with write_ledger(run_dir).open(newline="", encoding="utf-8") as fh:
        return sum(
            (Decimal(r["cost_usd"]) for r in csv.DictReader(fh) if r["cost_usd"]),
            Decimal(0),
        )


@dataclass(frozen=True)
class RunFacts:
    """What a run dir says about itself, for comparing with the sandbox."""

    state: ResumeState
    submitted_uuids: list[str]
    completed: list[CompletedEvent]
    disk_digests: Counter[str]
    mismatched: list[str]
    """Journaled images whose file is missing or differs from its sha256."""
    parts: list[Path]
    corrupt: list[str]
    ledger_usd: Decimal


def run_facts(run_dir: Path) -> RunFacts:
    """Load the journal, hash every image and rebuild the ledger."""
    journal = run_dir / JOURNAL_NAME
    events = list(read_journal(journal))
    submitted = [e.task_uuid for e in events if isinstance(e, SubmittedEvent)]
    completed = [e for e in events if isinstance(e, CompletedEvent)]
    files = image_files(run_dir)
    mismatched = []
    state = load_state(journal)
    for images in state.completed_images.values():
        for event in images.values():
            path = run_dir / event.path
            if not path.is_file() or sha256_file(path) != event.sha256:
                mismatched.append(event.path)
    return RunFacts(
        state=state,
        submitted_uuids=submitted,
        completed=completed,
        disk_digests=Counter(sha256_file(p) for p in files),
        mismatched=mismatched,
        parts=part_files(run_dir),
        corrupt=undecodable(files),
        ledger_usd=ledger_total(run_dir),
    )


def billed_digests(state: SandboxState) -> Counter[str]:
    return Counter(b.sha256 for b in state.billed.values())


def expected_keys(facts: RunFacts) -> set[str]:
    """Every task key the journal ever submitted."""
    return set(facts.state.images_expected)


# ----------------------------------------------------------- crash wrapper


def _arm_crash(spec: str) -> None:
    """SIGKILL this process at the N-th image rename (``before:N`` / ``after:N``)."""
    when, _, nth = spec.partition(":")
    target = int(nth)
    real_replace = os.replace
    seen = 0

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        nonlocal seen
        is_image = str(src).endswith(".part") and Path(str(dst)).suffix in (
            IMAGE_SUFFIXES
        )
        if is_image:
            seen += 1
        if is_image and seen == target and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, **kw)
        if is_image and seen == target and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


if __name__ == "__main__":
    if spec := os.environ.get(CRASH_ENV):
        _arm_crash(spec)
    from pipeline.cli import main

    raise SystemExit(main())
