"""Scale benchmark: memory and speed of `remix plan` and `remix run` at 10k and 100k.

For each size, a manifest (references from a CSV x 4 variants x 5 strengths) is
generated; ``remix plan`` runs in a subprocess (wall time, tasks/s, peak RSS from
wait4); ``remix run`` runs in a subprocess against a sandbox in another process, with
tiny rendered images, capped by ``--max-run-tasks`` through ``--shard 0/K`` (the run
still validates and expands the whole manifest, so its memory reflects the full
size). Then a synthetic 100k-event journal is loaded with ``load_state``, as a resume
does.

    python bench/scale.py                          # 10k and 100k, runs capped at 20k
    python bench/scale.py --sizes 10000 --max-run-tasks 2000 --latency 0.1

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the bench dir is on sys.path, not a package
    SANDBOX_KEY,
    JobShape,
    JsonObject,
    emit,
    emit_json,
    empty_config,
    run_child,
    sandbox_process,
    scratch_dir,
    write_job,
)

RSS_TARGET_MB = 120.0
PLAN_NET_MIN_S = 0.05


def remix_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def bench_plan(
    manifest: Path, config: Path, tasks: int, startup_s: float
) -> JsonObject:
    result = run_child(
        remix_argv("plan", str(manifest), "--config", str(config), "--format", "json")
    )
    if result.returncode != 0:
        raise SystemExit(f"remix plan failed ({result.returncode}): {result.stderr}")
    # Below ~50 ms beyond an empty plan's start-up the difference is noise, not speed.
    net_s = result.wall_s - startup_s
    net_rate = round(tasks / net_s, 1) if net_s >= PLAN_NET_MIN_S else None
    emit(
        f"  plan: {tasks:,} tasks in {result.wall_s:.2f}s = "
        f"{tasks / result.wall_s:,.0f} tasks/s ("
        + (f"{net_rate:,.0f} tasks/s" if net_rate else "too fast to tell")
        + f" after start-up); peak RSS {result.peak_rss_mb:.1f} MB"
    )
    return {
        "plan_tasks_per_s_net": net_rate,
        "plan_wall_s": round(result.wall_s, 3),
        "plan_tasks_per_s": round(tasks / result.wall_s, 1),
        "plan_peak_rss_mb": round(result.peak_rss_mb, 1),
    }


def bench_run(
    manifest: Path,
    config: Path,
    run_dir: Path,
    tasks: int,
    *,
    max_run_tasks: int,
    concurrency: int,
    latency_s: float,
    render_scale: float,
) -> JsonObject:
    shards = max(1, math.ceil(tasks / max_run_tasks)) if max_run_tasks else 1
    argv = ["run", str(manifest), "--run-dir", str(run_dir), "--config", str(config)]
    argv += ["--concurrency", str(concurrency), "--quiet"]
    if shards > 1:
        argv += ["--shard", f"0/{shards}"]
    with sandbox_process(latency_s=latency_s, render_scale=render_scale) as sandbox:
        env = {
            **os.environ,
            "RUNWARE_API_KEY": SANDBOX_KEY,
            "REMIX_BASE_URL": sandbox.base_url,
        }
        before = sandbox.counters()
        result = run_child(remix_argv(*argv), env=env)
        after = sandbox.counters()
    if result.returncode != 0:
        raise SystemExit(f"remix run failed ({result.returncode}): {result.stderr}")
    images = after["billed_images"] - before["billed_images"]
    posts = after["http_requests"] - before["http_requests"]
    rate = images / result.wall_s
    emit(
        f"  run: {images:,} images ({'shard 0/' + str(shards) if shards > 1 else 'all'}"
        f") in {result.wall_s:.1f}s = {rate:,.0f}/s (limit C/L "
        f"{concurrency / latency_s:,.0f}/s); {posts / max(1, images):.3f} API "
        f"requests/image; peak RSS {result.peak_rss_mb:.1f} MB; CPU "
        f"{result.cpu_s / max(1, images) * 1e6:,.0f} us/image"
    )
    return {
        "run_tasks": images,
        "run_shards": shards,
        "run_wall_s": round(result.wall_s, 3),
        "run_images_per_s": round(rate, 1),
        "run_requests_per_image": round(posts / max(1, images), 4),
        "run_cpu_us_per_image": round(result.cpu_s / max(1, images) * 1e6, 1),
        "run_peak_rss_mb": round(result.peak_rss_mb, 1),
    }


def bench_journal(root: Path, events: int) -> JsonObject:
    """A journal of ``events`` events (half submitted, half completed), loaded."""
    from pipeline.journal import JOURNAL_NAME, load_state
    from pipeline.journal_events import (
        CompletedEvent,
        Event,
        RunStartedEvent,
        SubmittedEvent,
        encode_events,
    )

    root.mkdir(parents=True, exist_ok=True)
    path = root / JOURNAL_NAME
    tasks = events // 2
    ts = datetime.now(UTC)
    started = RunStartedEvent(
        ts=ts,
        run_id="bench",
        manifest_sha256="0" * 64,
        tasks=tasks,
        images=tasks,
        estimate_usd=Decimal("0.08") * tasks,
    )
    with path.open("wb") as fh:
        fh.write(encode_events([started]))
        for start in range(0, tasks, 1000):
            batch: list[Event] = []
            for i in range(start, min(tasks, start + 1000)):
                key = f"r{i // 20:06d}/v{i % 4}/remixStrength={10 + 15 * (i % 5)}"
                task_uuid = str(uuid.UUID(int=i + 1))
                batch.append(
                    SubmittedEvent(
                        ts=ts,
                        key=key,
                        task_uuid=task_uuid,
                        images=1,
                        estimate_usd=Decimal("0.08"),
                    )
                )
                batch.append(
                    CompletedEvent(
                        ts=ts,
                        key=key,
                        task_uuid=task_uuid,
                        image_uuid=str(uuid.UUID(int=10**9 + i)),
                        index=0,
                        seed=i,
                        cost_usd=Decimal("0.08"),
                        path=f"images/{key}/0.png",
                        sha256="f" * 64,
                        bytes=1234,
                        submitted_at=ts,
                    )
                )
            fh.write(encode_events(batch))
    size_mb = path.stat().st_size / 1024**2
    t0 = time.perf_counter()
    state = load_state(path)
    load_s = time.perf_counter() - t0
    assert state.images_done == tasks, (state.images_done, tasks)
    emit(
        f"journal: load_state of {2 * tasks + 1:,} events ({size_mb:.1f} MB) in "
        f"{load_s:.2f}s = {(2 * tasks + 1) / load_s:,.0f} events/s"
    )
    return {
        "journal_events": 2 * tasks + 1,
        "journal_mb": round(size_mb, 2),
        "journal_load_s": round(load_s, 3),
        "journal_events_per_s": round((2 * tasks + 1) / load_s, 1),
    }


def _measure(args: argparse.Namespace, work: Path, figures: JsonObject) -> None:
    """Plan, run and journal figures for each size, into ``figures``."""
    config = empty_config(work)
    emit(f"scale: sizes {args.sizes}, work dir {work}")
    # Interpreter start and imports, so plan throughput can be quoted without them.
    baseline = run_child(
        remix_argv(
            "plan",
            str(write_job(work / "tiny", JobShape(1, 4, 5))),
            "--config",
            str(config),
            "--format",
            "json",
        )
    )
    figures["plan_startup_s"] = round(baseline.wall_s, 3)
    emit(f"remix plan of a 20-task manifest (start-up cost): {baseline.wall_s:.2f}s")
    rss: list[float] = []
    for size in args.sizes:
        shape = JobShape.for_tasks(size)
        emit(
            f"{size:,} tasks ({shape.refs:,} refs from CSV x {shape.variants} variants"
            f" x {shape.matrix} strengths)"
        )
        manifest = write_job(work / f"job{size}", shape, name=f"scale{size}")
        row = bench_plan(manifest, config, size, baseline.wall_s)
        if not args.no_run:
            row |= bench_run(
                manifest,
                config,
                work / f"run{size}",
                size,
                max_run_tasks=args.max_run_tasks,
                concurrency=args.concurrency,
                latency_s=args.latency,
                render_scale=args.render_scale,
            )
        rss.append(max(row["plan_peak_rss_mb"], row.get("run_peak_rss_mb", 0.0)))
        figures |= {f"{k}_{size}": v for k, v in row.items()}
        shutil.rmtree(work / f"run{size}", ignore_errors=True)
    figures |= bench_journal(work / "journal", args.journal_events)
    figures["peak_rss_mb"] = max(rss)
    figures["peak_rss_growth_ratio"] = round(max(rss) / min(rss), 3)
    ok = max(rss) <= RSS_TARGET_MB
    emit(
        f"peak RSS across sizes: {', '.join(f'{r:.1f}' for r in rss)} MB "
        f"(largest / smallest = {max(rss) / min(rss):.2f}); target <= "
        f"{RSS_TARGET_MB:.0f} MB: {'met' if ok else 'MISSED'}"
    )
    figures["targets_met"] = ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], metavar="TASKS"
    )
    parser.add_argument(
        "--max-run-tasks",
        type=int,
        default=20_000,
        help="run at most about this many tasks per size (0: all); the rest of the "
        "manifest is still validated and expanded",
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--render-scale", type=float, default=1 / 64)
    parser.add_argument("--journal-events", type=int, default=100_000)
    parser.add_argument("--no-run", action="store_true", help="plan and journal only")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)

    figures: JsonObject = {
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "max_run_tasks": args.max_run_tasks,
    }
    with scratch_dir("remix-scale-", keep=args.keep) as work:
        _measure(args, work, figures)
    emit_json(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
