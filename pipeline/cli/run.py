"""``remix plan`` and ``remix run``: a job's numbers before it spends, and the run
itself with the summary a person (or cron's mail) reads afterwards."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

from pipeline import runner
from pipeline.cli.sandboxed import with_sandbox
from pipeline.config import (
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    Settings,
    load_settings,
    loop_options,
)
from pipeline.errors import ConfigError
from pipeline.exit_codes import ExitCode
from pipeline.expand import expand
from pipeline.gallery import GALLERY_NAME
from pipeline.ledger import LEDGER_NAME
from pipeline.nightly import resolve_run_dir
from pipeline.progress import NullProgress, Progress, TqdmProgress
from pipeline.records import FAILURES_SHOWN, EngineOptions, RunDirCounts, RunSummary
from pipeline.runner import Job, load_job
from pipeline.shard import Shard
from pipeline.wire import ALLOWED_SIZES

log = logging.getLogger("pipeline")


def plan_of(job: Job, settings: Settings, shard: Shard | None = None) -> dict[str, Any]:
    """What ``remix plan`` shows: the counts, the estimate and the budget; of one
    shard's tasks when ``shard`` is given (its budget: the job's / N)."""
    by_speed: dict[str, int] = dict(job.report.images_by_speed)
    tasks, images = job.report.tasks, job.report.images
    estimate = job.totals(settings).estimate_usd
    if shard is not None:
        tasks = images = 0
        by_speed = {}
        for spec in expand(job.manifest):  # counted, never held
            if shard.contains(spec.key):
                tasks += 1
                images += spec.images
                speed = spec.rendering_speed or "DEFAULT"
                by_speed[speed] = by_speed.get(speed, 0) + spec.images
        estimate = sum(
            (settings.price_for(s) * n for s, n in by_speed.items()), Decimal(0)
        )
    budget = job.manifest.job.budget_usd
    share = None if budget is None or shard is None else shard.budget_share(budget)
    return {
        "job": job.manifest.job.name,
        "manifest": str(job.path),
        "shard": None if shard is None else shard.label,
        "tasks": tasks,
        "images": images,
        "images_by_rendering_speed": by_speed,
        "estimated_cost_usd": str(estimate),
        "budget_usd": None if budget is None else str(budget),
        "shard_budget_usd": None if share is None else str(share),
    }


def cmd_plan(args: argparse.Namespace) -> ExitCode:
    if args.sizes:
        print_sizes(args.format)
        return ExitCode.OK
    if args.manifest is None:
        raise ConfigError("plan needs a MANIFEST (or --sizes for the allowed sizes)")
    settings = load_settings(args.config)
    shard: Shard | None = args.shard
    plan = plan_of(load_job(args.manifest), settings, shard)
    if args.format == "json":
        print(json.dumps(plan, indent=2))
        return ExitCode.OK
    rows = [("job", plan["job"])]
    if shard is not None:
        rows.append(("shard", f"{shard.label} (these counts are this shard's)"))
    rows += [
        ("tasks", f"{plan['tasks']:,}"),
        ("images", f"{plan['images']:,}"),
    ]
    rows += [
        (f"  {speed or 'DEFAULT'} images", f"{count:,} x ${settings.price_for(speed)}")
        for speed, count in sorted(plan["images_by_rendering_speed"].items())
    ]
    rows.append(("estimated cost", f"${plan['estimated_cost_usd']}"))
    if shard is not None and plan["budget_usd"] is not None:
        rows.append(
            (
                "budget",
                f"${plan['shard_budget_usd']} for this shard: the job's "
                f"${plan['budget_usd']} split across {shard.count} shards "
                "(--budget sets a shard's own)",
            )
        )
    elif plan["budget_usd"] is not None:
        rows.append(
            (
                "budget",
                f"${plan['budget_usd']} (run with --shard I/N, each shard gets "
                "1/N of it unless --budget is given)",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("valid: nothing was submitted")
    return ExitCode.OK


def print_sizes(fmt: str) -> None:
    """The width x height pairs the API accepts, grouped by orientation."""
    sizes = sorted(ALLOWED_SIZES, key=lambda wh: (-wh[0], -wh[1]))
    if fmt == "json":
        print(json.dumps([{"width": w, "height": h} for w, h in sizes], indent=2))
        return
    groups = {
        "landscape": [(w, h) for w, h in sizes if w > h],
        "square": [(w, h) for w, h in sizes if w == h],
        "portrait": [(w, h) for w, h in sizes if w < h],
    }
    for shape, pairs in groups.items():
        text = ", ".join(f"{w}x{h}" for w, h in pairs)
        print(
            textwrap.fill(
                text,
                width=88,
                initial_indent=f"{shape:<10}  ",
                subsequent_indent=" " * 12,
            )
        )
    print(f"{len(sizes)} sizes: set width and height to one of these pairs")


def cmd_run(args: argparse.Namespace) -> ExitCode:
    overrides: dict[str, Any] = {}
    if args.concurrency is not None:
        overrides["limits"] = {"concurrency": args.concurrency}
    settings = load_settings(args.config, overrides=overrides)
    job = load_job(args.manifest)
    if not args.sandbox and settings.api_key is None:
        raise ConfigError(
            f"no API key: set {ENV_API_KEY} (from your Runware dashboard, API keys), "
            f"or {ENV_API_KEY_FILE} to a file holding it (mode 600; cron and systemd "
            "pass no login environment), to run against the real API, or add "
            "--sandbox to run against the local sandbox"
        )
    run_dir: Path = (
        resolve_run_dir(args.run_dir)
        if args.run_dir
        else runner.default_run_dir(settings, job.manifest, args.shard)
    )
    options = EngineOptions(
        concurrency=settings.limits.concurrency,
        budget_usd=args.budget,
        retry_failed=args.retry_failed,
        shard=args.shard,
        handle_signals=True,
    )
    progress: Progress = NullProgress() if args.quiet else TqdmProgress()

    async def run() -> RunSummary:
        async with contextlib.AsyncExitStack() as stack:
            run_settings = settings
            if args.sandbox:
                run_settings = await with_sandbox(stack, settings)
            return await runner.run_manifest(
                args.manifest,
                run_dir,
                run_settings,
                options,
                job=job,
                progress=progress,
                rerun_changed=args.rerun_changed,
            )

    backend_options = loop_options(settings.run.event_loop)
    log.debug("event loop: %s", "uvloop" if backend_options else "asyncio")
    summary = anyio.run(run, backend="asyncio", backend_options=backend_options)
    print_summary(summary, run_dir, args.argv, verbose=args.verbose)
    return summary.exit_code


def print_summary(
    summary: RunSummary, run_dir: Path, argv: list[str], *, verbose: int = 0
) -> None:
    """What a person (or cron's mail) reads after a run: where the run dir stands,
    what it cost, where the results are, and the next command; the request
    figures only with ``-v``."""
    print("\n".join(summary_lines(summary, run_dir, argv, verbose=verbose)))


def summary_lines(
    summary: RunSummary, run_dir: Path, argv: list[str], *, verbose: int = 0
) -> list[str]:
    after = summary.after or RunDirCounts(
        total=summary.tasks_total,
        done=summary.tasks_done_before + summary.tasks_done,
        failed=summary.tasks_failed + summary.tasks_skipped_failed,
        in_flight=summary.tasks_unfinished,
        not_sent=summary.tasks_unsubmitted,
        failures=tuple(summary.failures[:FAILURES_SHOWN]),
    )
    code = summary.exit_code
    command = shlex.join(["remix", *argv])
    if code == ExitCode.OK:
        headline = f"finished: all {after.total:,} tasks are done"
    elif code == ExitCode.FAILED:
        headline = (
            f"finished with failures: {after.failed:,} of {after.total:,} tasks "
            "failed for good"
        )
    else:
        headline = "stopped early, " + _why_stopped(summary, after)
    lines = [
        headline,
        f"run dir   {run_dir}",
        f"done      {after.done:,} of {after.total:,} tasks "
        f"({summary.tasks_done:,} new this run, {summary.tasks_done_before:,} "
        f"before); {summary.images_done:,} of {summary.images_total:,} images",
    ]
    if after.failed:
        lines.append(f"failed    {after.failed:,} for good, first reasons:")
        lines += [f"            {k}: {c}: {m}" for k, c, m in after.failures]
        if after.failed > len(after.failures):
            more = after.failed - len(after.failures)
            lines.append(f"            ... and {more:,} more (see the ledger)")
    else:
        lines.append("failed    0")
    if after.left:
        parts = [f"{after.in_flight:,} sent, to collect"] if after.in_flight else []
        parts += [f"{after.not_sent:,} not sent yet"] if after.not_sent else []
        lines.append(f"left      {after.left:,} ({', '.join(parts)})")
    lines.append(
        f"cost      ${summary.spent_this_run_usd} this run, ${summary.spent_usd} in all"
    )
    if summary.missing_cost_images:
        lines.append(
            f"          ({summary.missing_cost_images:,} image(s) came without a "
            "cost from the API and are not counted)"
        )
    if summary.outputs_error is None:
        lines.append(f"ledger    {run_dir / LEDGER_NAME}")
        lines.append(f"gallery   {run_dir / GALLERY_NAME}")
    if verbose:
        lines += _engineering_lines(summary)
    if code == ExitCode.STOPPED:
        budget = summary.stop_reason == "budget"
        first = " (after raising --budget)" if budget else ""
        lines.append(f"resume with{first}: {command}")
        if after.failed:
            lines.append(f"(then {after.failed:,} failed task(s) need --retry-failed)")
    elif code == ExitCode.FAILED:
        retry = command if "--retry-failed" in argv else f"{command} --retry-failed"
        lines.append(f"retry the failed with: {retry}")
    return lines


def _why_stopped(summary: RunSummary, after: RunDirCounts) -> str:
    if summary.outputs_error is not None and not after.left:
        return f"the ledger or gallery not written: {summary.outputs_error}"
    left = f"{after.left:,} of {after.total:,} tasks left"
    why = summary.stop_message or summary.stop_reason
    return left if why is None else f"{left}: {why}"


def _engineering_lines(summary: RunSummary) -> list[str]:
    """Per-request figures for whoever tunes the run (``-v``)."""
    rate = summary.images_new / summary.wall_s if summary.wall_s > 0 else 0.0
    lines = [
        f"wall time {summary.wall_s:.1f}s ({rate:.1f} new images/s)",
        f"requests  {summary.api_requests:,} api requests "
        f"({summary.api_requests / max(1, summary.images_new):.3f} per new image: "
        f"{summary.submit_requests:,} submits, {summary.poll_requests:,} polls, "
        f"{summary.uploads:,} uploads)",
        f"in flight up to {summary.max_in_flight:,} (concurrency floor "
        f"{summary.adaptive_floor:,}); resumed {summary.resumed:,}, resent "
        f"{summary.resent:,}, resubmitted {summary.resubmitted:,}, lost "
        f"{summary.lost:,}",
    ]
    if summary.latency_s is not None:
        lines.append(
            f"latency   {summary.latency_s:.2f}s per task (learnt this run; "
            "tasks/s cannot pass concurrency / latency)"
        )
    return lines
