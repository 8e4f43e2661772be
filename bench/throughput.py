"""Throughput benchmark: remix against the limit C / L, and against the official SDK.

A sandbox with a fixed latency L (no jitter) and tiny rendered images runs in its own
process. The same N tasks run first through remix (the ``remix run`` path, in this
process, with remix's shipped default settings except concurrency) and then through
the official ``runware`` SDK (REST transport, ``asyncio`` with a ``Semaphore(C)``, one
``imageInference`` with ``deliveryMethod="async"`` per task and the SDK's own polling,
each image downloaded and written to disk). Requests are counted by the sandbox.
Last, in a fresh sandbox, a zero-lag reference client (``deliveryMethod="sync"``, one
task per request, nothing stored): no poll lag at all, so what it misses of C / L is
what the round trips and the server cost on this machine, whatever the client.

    python bench/throughput.py                       # N=5000, C=256, L=0.5 s
    python bench/throughput.py --tasks 500 --concurrency 64 --latency 0.2
    python bench/throughput.py --profile 30 --no-sdk # cProfile of the remix client

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import functools
import io
import math
import os
import pstats
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the bench dir is on sys.path, not a package
    SANDBOX_KEY,
    JobShape,
    JsonObject,
    SandboxProcess,
    Usage,
    current_rss_mb,
    emit,
    emit_json,
    empty_config,
    sandbox_process,
    scratch_dir,
    write_job,
)

API_COUNTED = ("imageInference", "getResponse", "imageUpload")


def _api_requests(before: JsonObject, after: JsonObject) -> dict[str, int]:
    """HTTP POSTs to the API and downloads between two counter snapshots."""
    return {
        "posts": after["http_requests"] - before["http_requests"],
        "downloads": after["downloads"] - before["downloads"],
        "billed": after["billed_images"] - before["billed_images"],
        "duplicates": after["duplicate_task_uuids"] - before["duplicate_task_uuids"],
        "billed_twice": after["content_billed_twice"] - before["content_billed_twice"],
    }


# ---------------------------------------------------------------------------
# remix


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` flags into settings overrides: the value is read as TOML,
    and a bare word that is not TOML as a string (``run.event_loop=asyncio``)."""
    import tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        dotted, _, text = item.partition("=")
        section, _, key = dotted.partition(".")
        if not (section and key and text):
            raise SystemExit(f"--set takes section.key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out.setdefault(section, {})[key] = value
    return out


async def _remix_run(
    manifest_path: Path,
    run_dir: Path,
    base_url: str,
    concurrency: int,
    overrides: dict[str, dict[str, Any]],
) -> Any:
    """What ``remix run MANIFEST --concurrency C`` does after parsing its flags, up to
    the end of the run: the ledger and gallery written after it are not timed."""
    from pipeline.config import load_settings
    from pipeline.progress import NullProgress
    from pipeline.records import EngineOptions
    from pipeline.runner import run_manifest

    settings = load_settings(
        empty_config(run_dir.parent),
        env={"RUNWARE_API_KEY": SANDBOX_KEY, "REMIX_BASE_URL": base_url},
        overrides={
            **overrides,
            "limits": {**overrides.get("limits", {}), "concurrency": concurrency},
        },
    )
    return await run_manifest(
        manifest_path,
        run_dir,
        settings,
        EngineOptions(concurrency=concurrency),
        outputs=False,
        progress=NullProgress(),
    )


class CallTimer:
    """Diagnostics (--trace): count and time the engine's awaits on I/O and meters.

    Wraps a few methods of pipeline classes for the duration of one run; the pipeline
    code itself is unchanged. Times are per call (calls overlap), in seconds.
    """

    TARGETS: tuple[tuple[str, str, str], ...] = (
        ("pipeline.client", "RunwareClient", "submit"),
        ("pipeline.client", "RunwareClient", "poll"),
        ("pipeline.client", "RunwareClient", "fetch_image"),
        ("pipeline.client", "RunwareClient", "upload_image"),
        ("pipeline.journal", "JournalWriter", "append"),
        ("pipeline.limits", "AccountPacer", "before_request"),
        ("pipeline.collector", "", "write_atomic_many"),
    )

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        self._saved: list[tuple[object, str, Any]] = []
        # Per taskUUID, wall-clock (time.time, comparable with journal timestamps):
        self.submit_started: dict[str, float] = {}
        self.submit_returned: dict[str, float] = {}
        self.result_seen: dict[str, float] = {}
        self.polls_per_task: dict[str, int] = {}
        self.processing_answers = 0
        self.done_answers = 0
        self.latency_estimates: list[float] = []
        # The same moments on the monotonic clock, which the sandbox process shares.
        self.mono_sent: dict[str, float] = {}
        self.mono_answered: dict[str, float] = {}
        self.mono_seen: dict[str, float] = {}

    def _observe(
        self, name: str, args: tuple[Any, ...], t0: float, mono0: float, out: Any
    ) -> None:
        now, mono = time.time(), time.monotonic()
        if name == "RunwareClient.submit":
            for task in args[1]:
                self.submit_started.setdefault(str(task.task_uuid), t0)
                self.submit_returned.setdefault(str(task.task_uuid), now)
                self.mono_sent.setdefault(str(task.task_uuid), mono0)
                self.mono_answered.setdefault(str(task.task_uuid), mono)
        elif name == "RunwareClient.poll" and out is not None:
            for uuid in args[1]:
                self.polls_per_task[uuid] = self.polls_per_task.get(uuid, 0) + 1
            self.processing_answers += len(out.processing)
            for result in out.results:
                self.done_answers += 1
                self.result_seen.setdefault(result.task_uuid, now)
                self.mono_seen.setdefault(result.task_uuid, mono)

    def __enter__(self) -> CallTimer:
        import functools
        import importlib

        for module_name, cls_name, attr in self.TARGETS:
            owner: Any = importlib.import_module(module_name)
            if cls_name:
                owner = getattr(owner, cls_name, None)
            original = getattr(owner, attr, None) if owner is not None else None
            if original is None:
                continue
            name = f"{cls_name or module_name}.{attr}"
            samples = self.stats.setdefault(name, [])

            def wrap(fn: Any, name: str = name, samples: list[float] = samples) -> Any:
                @functools.wraps(fn)
                async def timed(*args: Any, **kwargs: Any) -> Any:
                    t0, wall0, mono0 = (
                        time.perf_counter(),
                        time.time(),
                        time.monotonic(),
                    )
                    out = None
                    try:
                        out = await fn(*args, **kwargs)
                        return out
                    finally:
                        samples.append(time.perf_counter() - t0)
                        self._observe(name, args, wall0, mono0, out)

                return timed

            self._saved.append((owner, attr, original))
            setattr(owner, attr, wrap(original))
        from pipeline import poller

        observe = getattr(poller.Poller, "observe_latency", None)
        if observe is not None:
            estimates = self.latency_estimates

            def observed(timing: Any, *args: Any) -> None:
                observe(timing, *args)
                estimates.append(timing.latency.value or 0.0)

            self._saved.append((poller.Poller, "observe_latency", observe))
            # setattr: a diagnostic patch that mypy must not type-check.
            setattr(poller.Poller, "observe_latency", observed)  # noqa: B010
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)

    def wire_phases(self, server_tasks: JsonObject, concurrency: int) -> list[str]:
        """A slot's hold split at the API's own clock (the sandbox's, same monotonic).

        ``server_tasks`` maps taskUUID -> [accepted_at, done_at] from the sandbox.
        The poll lag is also shown for the first C tasks sent alone: the engine
        knows nothing of the latency until they finish.
        """
        rows: dict[str, list[float]] = {
            "submit sent -> API accepted it (send, queueing, parsing)": [],
            "API accepted -> API done (the latency L)": [],
            "API done -> result seen by a poll (poll lag)": [],
            "API accepted -> submit answer received": [],
            "  poll lag of the first C tasks sent (learning)": [],
            "  poll lag of the others": [],
        }
        keys = list(rows)
        first_round = set(
            sorted(self.mono_sent, key=self.mono_sent.__getitem__)[:concurrency]
        )
        for uuid, (accepted, done) in server_tasks.items():
            try:
                sent, answered = self.mono_sent[uuid], self.mono_answered[uuid]
                seen = self.mono_seen[uuid]
            except KeyError:
                continue
            values = (
                accepted - sent,
                done - accepted,
                seen - done,
                answered - accepted,
            )
            for key, value in zip(keys[:4], values, strict=True):
                rows[key].append(value)
            rows[keys[4] if uuid in first_round else keys[5]].append(seen - done)
        out = []
        for key, samples in rows.items():
            if samples:
                ordered = sorted(samples)
                out.append(
                    f"  {key:<58} mean {1e3 * sum(samples) / len(samples):7.1f} ms  "
                    f"p90 {1e3 * ordered[int(0.9 * (len(ordered) - 1))]:7.1f} ms"
                )
        return out

    def phases(self, run_dir: Path, latency_s: float) -> list[str]:
        """Where a slot's hold time goes, per task, mean over tasks (seconds)."""
        from pipeline.journal import JOURNAL_NAME, read_journal
        from pipeline.journal_events import CompletedEvent, SubmittedEvent

        journaled: dict[str, float] = {}
        stored: dict[str, float] = {}
        for event in read_journal(run_dir / JOURNAL_NAME):
            if isinstance(event, SubmittedEvent):
                journaled[event.task_uuid] = event.ts.timestamp()
            elif isinstance(event, CompletedEvent):
                stored[event.task_uuid] = event.ts.timestamp()
        rows: dict[str, list[float]] = {
            "submitted event -> submit starts (fsync, rate meter)": [],
            "submit request (rate meter wait + HTTP)": [],
            "submit answered -> result seen by a poll": [],
            "  of which beyond L (poll lag)": [],
            "result seen -> image stored + journaled": [],
        }
        keys = list(rows)
        for uuid, t_done in stored.items():
            try:
                t_j, t_s = journaled[uuid], self.submit_started[uuid]
                t_a, t_r = self.submit_returned[uuid], self.result_seen[uuid]
            except KeyError:
                continue
            for key, value in zip(
                keys,
                (t_s - t_j, t_a - t_s, t_r - t_a, t_r - t_a - latency_s, t_done - t_r),
                strict=True,
            ):
                rows[key].append(value)
        polls = list(self.polls_per_task.values())
        lines = [
            f"  {key:<52} mean {sum(v) / len(v):7.3f}s" for key, v in rows.items() if v
        ]
        est = self.latency_estimates
        if est:
            picks = [est[int(q * (len(est) - 1))] for q in (0, 0.1, 0.25, 0.5, 0.75, 1)]
            lines.append(
                "  engine latency estimate after 0/10/25/50/75/100% of tasks: "
                + ", ".join(f"{v:.3f}" for v in picks)
                + "s"
            )
        if polls:
            lines.append(
                f"  polls per task: mean {sum(polls) / len(polls):.2f}, max "
                f"{max(polls)}; answers 'processing' {self.processing_answers}, "
                f"done {self.done_answers}"
            )
        return lines

    def report(self) -> list[str]:
        lines = []
        for name, samples in self.stats.items():
            if not samples:
                continue
            ordered = sorted(samples)
            lines.append(
                f"  {name:<34} {len(samples):>6} calls  mean "
                f"{1e3 * sum(samples) / len(samples):8.2f} ms  p90 "
                f"{1e3 * ordered[int(0.9 * (len(ordered) - 1))]:8.2f} ms  max "
                f"{1e3 * ordered[-1]:8.2f} ms"
            )
        return lines


def makespan_bound(tasks: int, concurrency: int) -> float:
    """The best efficiency any client can reach for N tasks at concurrency C.

    Each task occupies one of C slots for at least L, so some slot runs at least
    ceil(N / C) tasks one after another: the run takes at least ceil(N / C) x L,
    and achieved / (C / L) is at most N / (ceil(N / C) x C); 0.977 for N = 5,000
    and C = 256 (19 full rounds and a last one of 136 tasks).
    """
    return tasks / (math.ceil(tasks / concurrency) * concurrency)


class SlotMeter:
    """Time-weighted count of the engine's concurrency slots in use (Little's law).

    Wraps the slot gate's acquire/release for one run. ``mean_in_flight / C`` is the
    share of the concurrency the run used; ``slot_seconds`` / tasks sent is a slot's
    mean hold time per task, whose excess over L is the per-task overhead to cut.
    A freed slot's wait until it is taken again (slots matched first-freed,
    first-taken) is the other overhead: time between a slot's tasks.
    """

    def __init__(self) -> None:
        self.slot_seconds = 0.0
        self.idle_gaps: list[float] = []
        self._freed: deque[float] = deque()
        self._in_use = 0
        self._since = 0.0
        self._first: float | None = None
        self._last = 0.0
        self._saved: list[tuple[str, Any]] = []

    def tick(self, delta: int) -> None:
        """Slots taken (delta > 0) or handed back (delta < 0) now."""
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        self.slot_seconds += self._in_use * (now - self._since)
        self._since = self._last = now
        self._in_use += delta
        if delta < 0:
            self._freed.extend([now] * -delta)
        for _ in range(min(delta, len(self._freed))):
            self.idle_gaps.append(now - self._freed.popleft())

    def __enter__(self) -> SlotMeter:
        from pipeline import flow

        gate: Any = getattr(flow, "SlotGate", None)
        if gate is None:
            return self
        meter = self
        acquire, release = gate.force_acquire, gate.release

        def force_acquire(g: Any, n: int = 1) -> None:
            meter.tick(n)
            acquire(g, n)

        def released(g: Any, n: int = 1) -> None:
            meter.tick(-n)
            release(g, n)

        self._saved = [("force_acquire", acquire), ("release", release)]
        gate.force_acquire, gate.release = force_acquire, released
        return self

    def __exit__(self, *exc: object) -> None:
        from pipeline import flow

        for attr, original in self._saved:
            setattr(flow.SlotGate, attr, original)

    def figures(self, concurrency: int, tasks_sent: int) -> JsonObject:
        """Per task sent: a slot taken and handed back unused holds ~0 seconds."""
        if not tasks_sent or self._first is None:
            return {}
        span = self._last - self._first
        gaps = sorted(self.idle_gaps) or [0.0]
        return {
            "slot_hold_mean_s": self.slot_seconds / tasks_sent,
            "slot_idle_between_tasks_mean_ms": 1e3 * sum(gaps) / len(gaps),
            "slot_idle_between_tasks_p90_ms": 1e3 * gaps[int(0.9 * (len(gaps) - 1))],
            "mean_in_flight": self.slot_seconds / span if span else 0.0,
            "slot_utilisation": self.slot_seconds / (concurrency * span) if span else 0,
        }


def turnaround(run_dir: Path, concurrency: int, engine_wall_s: float) -> JsonObject:
    """From the journal: each task's turnaround (submitted -> last image stored).

    ``turnaround_share`` = sum(turnaround) / (C x wall): above 1 because a slot
    is given back when the API is done, before the images are stored.
    """
    from pipeline.journal import JOURNAL_NAME, read_journal
    from pipeline.journal_events import CompletedEvent, SubmittedEvent

    submitted: dict[str, float] = {}
    done: dict[str, float] = {}
    for event in read_journal(run_dir / JOURNAL_NAME):
        if isinstance(event, SubmittedEvent):
            submitted[event.task_uuid] = event.ts.timestamp()
        elif isinstance(event, CompletedEvent):
            done[event.task_uuid] = max(
                done.get(event.task_uuid, 0.0), event.ts.timestamp()
            )
    holds = sorted(done[u] - submitted[u] for u in done if u in submitted)
    if not holds:
        return {}

    def pct(q: float) -> float:
        return holds[min(len(holds) - 1, int(q * len(holds)))]

    first, last = min(submitted.values()), max(done.values())
    return {
        "hold_mean_s": sum(holds) / len(holds),
        "hold_p50_s": pct(0.5),
        "hold_p90_s": pct(0.9),
        "hold_max_s": holds[-1],
        "turnaround_share": sum(holds) / (concurrency * engine_wall_s),
        "first_submit_to_last_done_s": last - first,
    }


def bench_remix(
    sandbox: SandboxProcess,
    manifest_path: Path,
    work: Path,
    concurrency: int,
    profile_top: int,
    overrides: dict[str, dict[str, Any]],
    trace: bool = False,
    latency_s: float = 0.0,
) -> JsonObject:
    import anyio

    from pipeline.config import loop_options

    run_dir = work / "remix-run"
    # as `remix run` does: the shipped settings plus --set, e.g. run.event_loop=asyncio
    event_loop = overrides.get("run", {}).get("event_loop", "auto")
    backend_options = loop_options(event_loop)
    loop_kind = "uvloop" if backend_options else "asyncio"
    before, server_cpu0 = sandbox.counters(), sandbox.cpu_s()
    rss_before = current_rss_mb()
    usage0 = Usage.now()
    profiler = cProfile.Profile() if profile_top else None
    started = time.perf_counter()
    timer = CallTimer()
    slots = SlotMeter()
    if profiler is not None:
        profiler.enable()
    with slots, timer if trace else contextlib.nullcontext():
        summary = anyio.run(
            _remix_run,
            manifest_path,
            run_dir,
            sandbox.base_url,
            concurrency,
            overrides,
            backend="asyncio",
            backend_options=backend_options,
        )
    if profiler is not None:
        profiler.disable()
    wall_s = time.perf_counter() - started
    usage1 = Usage.now()
    after, server_cpu1 = sandbox.counters(), sandbox.cpu_s()
    seen = _api_requests(before, after)
    images = summary.images_new
    if trace:
        emit("remix call timings (--trace):")
        for line in timer.report():
            emit(line)
        emit("remix turnaround, by phase (--trace):")
        for line in timer.phases(run_dir, latency_s):
            emit(line)
        emit("remix slot hold, split at the API's clock (--trace):")
        for line in timer.wire_phases(sandbox.task_times(), concurrency):
            emit(line)
    if profiler is not None:
        if dump := os.environ.get("BENCH_DUMP"):
            profiler.dump_stats(dump)  # the whole profile, for pstats or snakeviz
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(os.environ.get("BENCH_SORT", "tottime"))
        only = os.environ.get("BENCH_FILTER")  # a regex on file:line(function)
        stats.print_stats(*([only] if only else []), profile_top)
        emit("remix cProfile, top by tottime:")
        for line in out.getvalue().splitlines():
            if line.strip():
                emit("  " + line)
    holds = turnaround(run_dir, concurrency, summary.wall_s)
    return {
        **holds,
        **slots.figures(concurrency, summary.submitted),
        "event_loop": loop_kind,
        "images": images,
        "tasks_done": summary.tasks_done,
        "tasks_failed": summary.tasks_failed,
        "wall_s": wall_s,
        "engine_wall_s": summary.wall_s,
        "submit_requests": summary.submit_requests,
        "poll_requests": summary.poll_requests,
        "uploads": summary.uploads,
        "api_requests": summary.api_requests,
        "server_api_posts": seen["posts"],
        "downloads": seen["downloads"],
        "billed": seen["billed"],
        "duplicates": seen["duplicates"],
        "billed_twice": seen["billed_twice"],
        "max_in_flight": summary.max_in_flight,
        "cpu_s": usage1.cpu_s - usage0.cpu_s,
        "cpu_sys_s": usage1.sys_s - usage0.sys_s,
        "server_cpu_s": server_cpu1 - server_cpu0,
        "peak_rss_mb": usage1.peak_rss_mb,
        "rss_before_mb": rss_before,
        "spent_usd": str(summary.spent_this_run_usd),
        "stop_reason": summary.stop_reason,
    }


# ---------------------------------------------------------------------------
# the official SDK


async def _sdk_run(
    base_url: str, manifest_path: Path, concurrency: int, out_dir: Path
) -> tuple[int, int]:
    """The manifest's tasks through the SDK, C at a time; returns (images, failures).

    Each distinct local reference is uploaded once with the SDK's ``image_upload``
    (as remix does), then every task is one ``client.run`` (submit, then the SDK's
    own getResponse polling) followed by a download of each image to disk.
    """
    import uuid

    import aiohttp
    import anyio
    import runware
    from runware.errors import RunwareError

    from pipeline.expand import expand
    from pipeline.manifest import load_manifest

    specs = list(expand(load_manifest(manifest_path)))
    client = runware.Runware(
        api_key=SANDBOX_KEY,
        transport="rest",
        http_base_url=base_url,
        validate=False,
        max_retries=0,
    )
    await anyio.Path(out_dir).mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(concurrency)
    images = failures = 0

    async with client, aiohttp.ClientSession() as http:
        uploaded: dict[Path, str] = {}
        for path in sorted({p for spec in specs for p in spec.local_files}):
            data = base64.b64encode(path.read_bytes()).decode()
            result = await client.image_upload(
                {"image": f"data:image/png;base64,{data}"}
            )
            uploaded[path] = str(result[0]["imageUUID"])

        async def one(index: int, spec: Any) -> None:
            nonlocal images, failures
            async with semaphore:
                body = spec.request(uuid.uuid4(), uploaded).model_dump(
                    mode="json", exclude_none=True
                )
                # The SDK sets these itself.
                for key in ("taskUUID", "deliveryMethod"):
                    body.pop(key, None)
                body["deliveryMethod"] = "async"
                try:
                    results = await client.run(body)
                    for n, result in enumerate(results):
                        async with http.get(result["imageURL"]) as resp:
                            resp.raise_for_status()
                            data = await resp.read()
                        (out_dir / f"{index:06d}-{n}.png").write_bytes(data)
                        images += 1
                except (RunwareError, aiohttp.ClientError):
                    failures += 1

        await asyncio.gather(*(one(i, spec) for i, spec in enumerate(specs)))
    return images, failures


# ---------------------------------------------------------------------------
# the zero-lag reference client


async def _ideal_run(
    base_url: str, manifest_path: Path, concurrency: int
) -> tuple[int, float]:
    """The manifest's tasks with no poll lag at all; returns (answered, seconds).

    A reference for what a client can reach on this machine and sandbox, below the
    makespan bound: C workers each send one task with ``deliveryMethod="sync"``, so
    the sandbox answers the moment the task is done, and the next goes out as soon as
    that answer is in. No journal, no downloads, no files; references are uploaded
    before the clock starts. Its figure says how much of remix's gap to C / L is the
    client's (polling, bookkeeping) and how much is the round trips and the server's
    own handling, which no client can remove.
    """
    import uuid

    import aiohttp

    from pipeline.expand import expand
    from pipeline.manifest import load_manifest

    specs = list(expand(load_manifest(manifest_path)))
    headers = {"Authorization": f"Bearer {SANDBOX_KEY}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        uploaded: dict[Path, str] = {}
        for path in sorted({p for spec in specs for p in spec.local_files}):
            data = base64.b64encode(path.read_bytes()).decode()
            upload = {
                "taskType": "imageUpload",
                "taskUUID": str(uuid.uuid4()),
                "image": f"data:image/png;base64,{data}",
            }
            async with http.post(base_url, json=[upload]) as resp:
                uploaded[path] = (await resp.json())["data"][0]["imageUUID"]
        bodies = []
        for spec in specs:
            body = spec.request(uuid.uuid4(), uploaded).model_dump(
                mode="json", exclude_none=True, by_alias=True
            )
            body["deliveryMethod"] = "sync"
            bodies.append([body])
        pending = iter(bodies)
        answered = 0

        async def worker() -> None:
            nonlocal answered
            for request in pending:
                async with http.post(base_url, json=request) as resp:
                    answer = await resp.json()
                answered += bool(answer.get("data"))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return answered, time.perf_counter() - started


def bench_ideal(
    sandbox: SandboxProcess, manifest_path: Path, concurrency: int
) -> JsonObject:
    import anyio

    from pipeline.config import loop_options

    answered, wall_s = anyio.run(
        _ideal_run,
        sandbox.base_url,
        manifest_path,
        concurrency,
        backend="asyncio",
        backend_options=loop_options("auto"),  # the loop remix runs on
    )
    return {"answered": answered, "wall_s": wall_s}


def warm_imports() -> None:
    """Import both clients before any timing: start-up is not throughput."""
    import importlib

    for name in ("pipeline.engine", "pipeline.cli", "runware", "aiohttp"):
        # the SDK is optional (the dev extra installs it)
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def bench_sdk(
    sandbox: SandboxProcess, manifest_path: Path, work: Path, concurrency: int
) -> JsonObject:
    before, server_cpu0 = sandbox.counters(), sandbox.cpu_s()
    usage0 = Usage.now()
    started = time.perf_counter()
    images, failures = asyncio.run(
        _sdk_run(sandbox.base_url, manifest_path, concurrency, work / "sdk-images")
    )
    wall_s = time.perf_counter() - started
    usage1 = Usage.now()
    after, server_cpu1 = sandbox.counters(), sandbox.cpu_s()
    seen = _api_requests(before, after)
    return {
        "images": images,
        "failures": failures,
        "wall_s": wall_s,
        "api_requests": seen["posts"],
        "downloads": seen["downloads"],
        "billed": seen["billed"],
        "cpu_s": usage1.cpu_s - usage0.cpu_s,
        "cpu_sys_s": usage1.sys_s - usage0.sys_s,
        "server_cpu_s": server_cpu1 - server_cpu0,
        "peak_rss_mb": usage1.peak_rss_mb,
    }


# ---------------------------------------------------------------------------


def _measure(args: argparse.Namespace, work: Path, figures: JsonObject) -> None:
    """Both runs, their figures and the targets, into ``figures``."""
    n, c = args.tasks, args.concurrency
    latency_s = figures["latency_s"]
    limit = figures["limit_images_per_s"]
    warm_imports()
    shape = JobShape.for_tasks(n)
    manifest_path = write_job(work / "job", shape)
    emit(
        f"throughput: N={n} tasks ({shape.refs} refs x {shape.variants} variants x "
        f"{shape.matrix} strengths), C={c}, L={latency_s}s, limit C/L={limit:.0f}/s"
    )
    emit(f"work dir {work}")
    # One sandbox for remix and the SDK; the zero-lag client gets a fresh one.
    fresh_sandbox = functools.partial(
        sandbox_process,
        latency_s=args.latency,
        render_scale=args.render_scale,
        jitter_s=args.jitter,
    )
    with fresh_sandbox() as sb:
        emit(f"sandbox {sb.base_url} (pid {sb.proc.pid})")
        remix = bench_remix(
            sb,
            manifest_path,
            work,
            c,
            args.profile,
            parse_overrides(args.set),
            args.trace,
            latency_s,
        )
        images = max(1, remix["images"])
        rate = remix["images"] / remix["wall_s"]
        figures.update(
            images=remix["images"],
            event_loop=remix["event_loop"],
            failed_tasks=remix["tasks_failed"],
            wall_s=round(remix["wall_s"], 3),
            images_per_s=round(rate, 2),
            efficiency=round(rate / limit, 4),
            efficiency_bound=round(makespan_bound(n, c), 4),
            efficiency_of_bound=round(rate / limit / makespan_bound(n, c), 4),
            requests_per_image=round(remix["api_requests"] / images, 4),
            server_requests_per_image=round(remix["server_api_posts"] / images, 4),
            submit_requests=remix["submit_requests"],
            poll_requests=remix["poll_requests"],
            upload_requests=remix["uploads"],
            downloads=remix["downloads"],
            cpu_us_per_image=round(remix["cpu_s"] / images * 1e6, 1),
            cpu_sys_us_per_image=round(remix["cpu_sys_s"] / images * 1e6, 1),
            server_cpu_us_per_image=round(remix["server_cpu_s"] / images * 1e6, 1),
            peak_rss_mb=round(remix["peak_rss_mb"], 1),
            max_in_flight=remix["max_in_flight"],
            duplicate_task_uuids=remix["duplicates"],
            content_billed_twice=remix["billed_twice"],
        )
        emit(
            f"remix: {remix['images']} images in {remix['wall_s']:.2f}s "
            f"= {rate:.1f}/s, efficiency {rate / limit:.3f}; "
            f"{remix['api_requests']} API requests "
            f"({remix['submit_requests']} submits, "
            f"{remix['poll_requests']} polls, {remix['uploads']} uploads; sandbox saw "
            f"{remix['server_api_posts']} POSTs) = "
            f"{remix['api_requests'] / images:.3f}/image; "
            f"CPU {remix['cpu_s']:.2f}s = "
            f"{remix['cpu_s'] / images * 1e6:.0f} us/image "
            f"({remix['cpu_sys_s'] / images * 1e6:.0f} in the kernel); "
            f"peak RSS {remix['peak_rss_mb']:.1f} MB "
            f"(before the run {remix['rss_before_mb']:.1f} MB); "
            f"max in flight {remix['max_in_flight']}; "
            f"sandbox CPU {remix['server_cpu_s']:.2f}s"
        )
        emit(
            f"remix: efficiency {rate / limit:.3f} of a bound of "
            f"{makespan_bound(n, c):.3f} for N={n}, C={c} (= "
            f"{rate / limit / makespan_bound(n, c):.3f} of what any client can reach)"
        )
        if "hold_mean_s" in remix:
            figures.update(
                engine_wall_s=round(remix["engine_wall_s"], 3),
                turnaround_mean_s=round(remix["hold_mean_s"], 4),
                turnaround_p50_s=round(remix["hold_p50_s"], 4),
                turnaround_p90_s=round(remix["hold_p90_s"], 4),
                turnaround_max_s=round(remix["hold_max_s"], 4),
            )
            emit(
                f"remix turnaround (submitted -> stored): {remix['hold_mean_s']:.3f}s "
                f"mean (p50 {remix['hold_p50_s']:.3f}, p90 "
                f"{remix['hold_p90_s']:.3f}, max {remix['hold_max_s']:.3f}; L = "
                f"{latency_s}s); first submit to last "
                f"image {remix['first_submit_to_last_done_s']:.2f}s"
            )
        if "slot_hold_mean_s" in remix:
            figures.update(
                slot_hold_mean_s=round(remix["slot_hold_mean_s"], 4),
                mean_in_flight=round(remix["mean_in_flight"], 1),
                slot_utilisation=round(remix["slot_utilisation"], 4),
                slot_idle_between_tasks_mean_ms=round(
                    remix["slot_idle_between_tasks_mean_ms"], 1
                ),
            )
            emit(
                f"remix slots: a slot is held {remix['slot_hold_mean_s']:.4f}s per "
                f"task (L = {latency_s}s); {remix['mean_in_flight']:.1f} of {c} in "
                f"use on average ({remix['slot_utilisation']:.1%}) from the first "
                "submit to the last answer; a freed slot is taken again after "
                f"{remix['slot_idle_between_tasks_mean_ms']:.1f} ms (p90 "
                f"{remix['slot_idle_between_tasks_p90_ms']:.1f})"
            )
        if remix["server_api_posts"] != remix["api_requests"]:
            emit(
                f"note: RunSummary counts {remix['api_requests']} API requests, "
                f"the sandbox saw {remix['server_api_posts']} POSTs"
            )
        if not args.no_sdk:
            sdk = bench_sdk(sb, manifest_path, work, c)
            sdk_images = max(1, sdk["images"])
            sdk_rate = sdk["images"] / sdk["wall_s"]
            sdk_rpi = sdk["api_requests"] / sdk_images
            sdk_cpu = sdk["cpu_s"] / sdk_images * 1e6
            figures.update(
                sdk_images=sdk["images"],
                sdk_failed_tasks=sdk["failures"],
                sdk_wall_s=round(sdk["wall_s"], 3),
                sdk_images_per_s=round(sdk_rate, 2),
                sdk_efficiency=round(sdk_rate / limit, 4),
                sdk_requests_per_image=round(sdk_rpi, 4),
                sdk_cpu_us_per_image=round(sdk_cpu, 1),
                sdk_cpu_sys_us_per_image=round(sdk["cpu_sys_s"] / sdk_images * 1e6, 1),
                sdk_server_cpu_us_per_image=round(
                    sdk["server_cpu_s"] / sdk_images * 1e6, 1
                ),
                sdk_wall_ratio=round(remix["wall_s"] / sdk["wall_s"], 4),
                sdk_requests_ratio=round(figures["requests_per_image"] / sdk_rpi, 4),
                sdk_cpu_ratio=round(figures["cpu_us_per_image"] / sdk_cpu, 4),
            )
            emit(
                f"sdk:   {sdk['images']} images in {sdk['wall_s']:.2f}s "
                f"= {sdk_rate:.1f}/s; {sdk['api_requests']} API requests = "
                f"{sdk_rpi:.3f}/image; CPU {sdk['cpu_s']:.2f}s = {sdk_cpu:.0f} us/image"
                f" ({sdk['cpu_sys_s'] / sdk_images * 1e6:.0f} in the kernel)"
                f"; sandbox CPU {sdk['server_cpu_s']:.2f}s"
            )
            emit(
                f"remix / sdk: wall {figures['sdk_wall_ratio']:.3f}, requests per "
                f"image {figures['sdk_requests_ratio']:.3f}, CPU per image "
                f"{figures['sdk_cpu_ratio']:.3f}"
            )
    if not args.no_ideal:
        with fresh_sandbox() as sb:  # as fresh as the one remix ran against
            ideal = bench_ideal(sb, manifest_path, c)
            ideal_efficiency = ideal["answered"] / ideal["wall_s"] / limit
            figures.update(
                ideal_answered=ideal["answered"],
                ideal_wall_s=round(ideal["wall_s"], 3),
                ideal_efficiency=round(ideal_efficiency, 4),
                efficiency_of_ideal=round(figures["efficiency"] / ideal_efficiency, 4),
            )
            emit(
                f"ideal: a client with no poll lag (sync delivery, one task per "
                f"request, no downloads or files): {ideal['answered']} answers in "
                f"{ideal['wall_s']:.2f}s, efficiency {ideal_efficiency:.3f} (= "
                f"{ideal_efficiency / makespan_bound(n, c):.3f} of the bound); remix "
                f"reaches {figures['efficiency_of_ideal']:.3f} of it"
            )
    targets = {
        "efficiency >= 0.97": figures["efficiency"] >= 0.97,
        "requests_per_image <= 0.25": figures["requests_per_image"] <= 0.25,
    }
    if "sdk_requests_ratio" in figures:
        targets["sdk_requests_ratio <= 0.25"] = figures["sdk_requests_ratio"] <= 0.25
        targets["sdk_cpu_ratio <= 0.5"] = figures["sdk_cpu_ratio"] <= 0.5
    for name, ok in targets.items():
        emit(f"target {name}: {'met' if ok else 'MISSED'}")
    figures["targets_met"] = all(targets.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per task")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="each task takes up to this many seconds longer, uniformly (a real "
        "API's latency varies); efficiency is then against C / mean latency",
    )
    parser.add_argument("--render-scale", type=float, default=1 / 64)
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK peer run")
    parser.add_argument(
        "--no-ideal",
        action="store_true",
        help="skip the zero-lag reference client (a client with no poll lag)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="TOP",
        help="cProfile the remix run and print the TOP functions by tottime",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a remix setting (e.g. limits.requests_per_s=100); "
        "default: remix's shipped settings",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="time the engine's submits, polls, downloads, journal appends, "
        "file writes and rate-meter waits (diagnostics)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)

    n, c = args.tasks, args.concurrency
    latency_s = args.latency + args.jitter / 2  # the mean: what C / L is about
    limit = c / latency_s
    figures: JsonObject = {
        "tasks": n,
        "concurrency": c,
        "latency_s": latency_s,
        "jitter_s": args.jitter,
        "limit_images_per_s": limit,
        "settings_overrides": args.set,
    }
    with scratch_dir("remix-bench-", keep=args.keep) as work:
        _measure(args, work, figures)
    emit_json(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
