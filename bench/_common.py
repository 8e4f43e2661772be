"""Shared benchmark plumbing: a sandbox in its own process, job generation, meters.

The sandbox runs in a separate process (``python bench/_common.py serve ...``) so the
client under test does not share its event loop or core with the server. The launcher
adds read-only routes to the sandbox app, ``GET /bench/counters`` (the sandbox's
public counters), ``GET /bench/rusage`` (the server's CPU time) and ``GET /bench/tasks``
(when each task was accepted and done, on the monotonic clock both processes share),
so a benchmark can count every request a client made, whichever client it is, without
patching it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_DIR: Final = BENCH_DIR.parent
SANDBOX_KEY: Final = "sandbox"
JsonObject = dict[str, Any]


# ---------------------------------------------------------------------------
# Meters


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and peak RSS of this process at one moment."""

    cpu_s: float
    peak_rss_mb: float
    sys_s: float = 0.0
    """The kernel's share of ``cpu_s`` (system calls: sockets, files, fsync)."""

    @classmethod
    def now(cls) -> Usage:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            cpu_s=ru.ru_utime + ru.ru_stime,
            peak_rss_mb=ru.ru_maxrss / 1024,
            sys_s=ru.ru_stime,
        )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def scratch_dir(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A work dir under TMPDIR, removed afterwards unless ``keep``: also when the
    benchmark fails, is interrupted or is terminated (each left ~45 MB behind, in
    RAM when TMPDIR is a tmpfs)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield work
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def current_rss_mb() -> float:
    """Resident set size right now (Linux /proc), for 'before' baselines."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2
    return float("nan")


@dataclass(frozen=True)
class ChildResult:
    """How a child process ended and what it cost (from wait4, so only this child)."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run_child(argv: list[str], *, env: dict[str, str] | None = None) -> ChildResult:
    """Run a command to completion; its own rusage, not the sum over all children."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    # communicate() reaps nothing on Linux until wait(); read the pipes, then wait4
    # so the rusage is this child's alone.
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.perf_counter() - started
    return ChildResult(
        returncode=proc.returncode,
        wall_s=wall_s,
        cpu_s=ru.ru_utime + ru.ru_stime,
        peak_rss_mb=ru.ru_maxrss / 1024,
        stdout=out,
        stderr=err,
    )


def emit(line: str) -> None:
    """A human-readable progress line (stdout; the JSON object comes last)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def emit_json(figures: JsonObject) -> None:
    """The benchmark's figures as one JSON object on the last stdout line."""
    sys.stdout.write(json.dumps(figures, sort_keys=True) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Jobs


def make_ref_png(path: Path, seed: int) -> Path:
    """A tiny photo-like PNG (sky, ground, sun) so the sandbox has pixels to remix."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (48, 32), (40 + seed * 37 % 200, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 21, 48, 32), fill=(60, 120 + seed * 13 % 100, 40))
    draw.ellipse((12, 6, 24, 16), fill=(250, 220, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@dataclass(frozen=True)
class JobShape:
    """refs (from CSV) x variants x matrix values = tasks."""

    refs: int
    variants: int
    matrix: int

    @property
    def tasks(self) -> int:
        return self.refs * self.variants * self.matrix

    @classmethod
    def for_tasks(cls, tasks: int) -> JobShape:
        """The widest shape of 4 variants x 5 strengths that gives exactly ``tasks``."""
        for variants, matrix in ((4, 5), (4, 1), (1, 5), (1, 1)):
            if tasks % (variants * matrix) == 0:
                return cls(tasks // (variants * matrix), variants, matrix)
        raise AssertionError("unreachable")


def write_job(
    root: Path,
    shape: JobShape,
    *,
    name: str = "bench",
    ref_files: int = 8,
    size: tuple[int, int] = (1024, 1024),
    output_format: str = "PNG",
) -> Path:
    """refs/*.png, refs.csv and job.toml under ``root``; returns the manifest path.

    The CSV's rows share ``ref_files`` distinct images, so remix uploads each content
    once (as it would for a real nightly list with repeated photos).
    """
    root.mkdir(parents=True, exist_ok=True)
    files = [make_ref_png(root / "refs" / f"p{i}.png", i) for i in range(ref_files)]
    with (root / "refs.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "subject"])
        for i in range(shape.refs):
            image = files[i % ref_files].relative_to(root).as_posix()
            writer.writerow([f"r{i:06d}", image, f"scene number {i}"])
    lines = [
        "[job]",
        f'name = "{name}"',
        "",
        "[defaults]",
        f"width = {size[0]}",
        f"height = {size[1]}",
        f'outputFormat = "{output_format}"',
        "numberResults = 1",
        "",
        "[references_from]",
        'csv = "refs.csv"',
    ]
    styles = ["GENERAL", "DESIGN", "FICTION", "REALISTIC"]
    for v in range(shape.variants):
        lines += [
            "",
            "[[variants]]",
            f'id = "v{v}"',
            f'positivePrompt = "The {{subject}} as style {v}, bold shapes"',
            f'providerSettings = {{ ideogram = {{ styleType = "{styles[v % 4]}" }} }}',
        ]
    if shape.matrix > 1:
        strengths = ", ".join(str(10 + 15 * i) for i in range(shape.matrix))
        lines += [
            "",
            "[matrix]",
            f'"providerSettings.ideogram.remixStrength" = [{strengths}]',
        ]
    path = root / "job.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def empty_config(root: Path) -> Path:
    """A config file with no settings: the run uses remix's shipped defaults."""
    path = root / "bench-config.toml"
    path.write_text("", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# The sandbox in its own process


@dataclass
class SandboxProcess:
    """A running sandbox subprocess and how to read its counters."""

    proc: subprocess.Popen[str]
    base_url: str

    @property
    def origin(self) -> str:
        return self.base_url.rsplit("/", 1)[0]

    def _get(self, path: str) -> JsonObject:
        import urllib.request

        with urllib.request.urlopen(self.origin + path, timeout=30) as resp:
            data: JsonObject = json.loads(resp.read())
        return data

    def counters(self) -> JsonObject:
        return self._get("/bench/counters")

    def task_times(self) -> JsonObject:
        return self._get("/bench/tasks")

    def cpu_s(self) -> float:
        return float(self._get("/bench/rusage")["cpu_s"])


@contextlib.contextmanager
def sandbox_process(
    *, latency_s: float, render_scale: float, seed: int = 0, jitter_s: float = 0.0
) -> Iterator[SandboxProcess]:
    """Start the sandbox in a child process; yields once it is listening."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve",
        "--latency",
        str(latency_s),
        "--jitter",
        str(jitter_s),
        "--render-scale",
        str(render_scale),
        "--seed",
        str(seed),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the sandbox did not start (first line: {url!r})")
        yield SandboxProcess(proc, url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(args: argparse.Namespace) -> None:
    """The child side: the sandbox app plus the two read-only bench routes."""
    import anyio
    from aiohttp import web

    from pipeline.config import loop_options
    from pipeline.sandbox import STATE, SandboxConfig, create_app

    config = SandboxConfig(
        seed=args.seed,
        api_key=SANDBOX_KEY,
        latency_s=args.latency,
        latency_jitter_s=args.jitter,
        result_stagger_s=0.0,
        render_scale=args.render_scale,
    )
    app = create_app(config)

    async def counters(request: web.Request) -> web.Response:
        state = request.app[STATE]
        return web.json_response(
            {
                "http_requests": state.http_requests,
                "tasks_by_type": dict(state.requests),
                "submissions": state.submissions,
                "uploads": state.uploads,
                "downloads": state.downloads,
                "billed_images": len(state.billed),
                "duplicate_task_uuids": state.duplicate_task_uuids,
                "content_billed_twice": state.content_billed_twice,
                "max_in_flight_seen": state.max_in_flight_seen,
            }
        )

    async def rusage(request: web.Request) -> web.Response:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return web.json_response(
            {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}
        )

    async def task_times(request: web.Request) -> web.Response:
        """taskUUID -> [accepted_at, done_at] on the monotonic clock (for --trace)."""
        tasks = request.app[STATE].tasks
        return web.json_response(
            {uuid: [t.submitted_at, t.done_at] for uuid, t in tasks.items()}
        )

    app.router.add_get("/bench/counters", counters)
    app.router.add_get("/bench/tasks", task_times)
    app.router.add_get("/bench/rusage", rusage)

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
                await site.start()
                host, port = runner.addresses[0][:2]
                sys.stdout.write(f"http://{host}:{port}/v1\n")
                sys.stdout.flush()
                async for _ in signals:
                    break
            finally:
                await runner.cleanup()

    # The stand-in for a remote API: as fast a loop as it can have, so less of its
    # own queueing shows up in the client's figures.
    anyio.run(main, backend="asyncio", backend_options=loop_options("auto"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bench helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sandbox with bench counters")
    serve.add_argument("--latency", type=float, default=0.5)
    serve.add_argument(
        "--jitter", type=float, default=0.0, help="each task takes 0..this longer"
    )
    serve.add_argument("--render-scale", type=float, default=1 / 64)
    serve.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args)


if __name__ == "__main__":
    main()
