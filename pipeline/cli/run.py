"""``remix plan`` and ``remix run``: a job's numbers before it spends, and the run
itself with the summary a person (or cron's mail) reads afterwards."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

from pipeline import runner
from pipeline.cli.sandboxed import with_sandbox
from pipeline.config import ENV_API_KEY, Settings, load_settings, loop_options
from pipeline.errors import ConfigError
from pipeline.exit_codes import ExitCode
from pipeline.expand import expand
from pipeline.progress import NullProgress, Progress, TqdmProgress
from pipeline.records import EngineOptions, RunSummary
from pipeline.runner import Job, load_job
from pipeline.shard import Shard

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


def cmd_run(args: argparse.Namespace) -> ExitCode:
    overrides: dict[str, Any] = {}
    if args.concurrency is not None:
        overrides["limits"] = {"concurrency": args.concurrency}
    settings = load_settings(args.config, overrides=overrides)
    job = load_job(args.manifest)
    if not args.sandbox and settings.api_key is None:
        raise ConfigError(
            f"no API key: set {ENV_API_KEY} (from your Runware dashboard, API keys) "
            "to run against the real API, or add --sandbox to run against the "
            "local sandbox"
        )
    run_dir: Path = args.run_dir or runner.default_run_dir(
        settings, job.manifest, args.shard
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
            )

    backend_options = loop_options(settings.run.event_loop)
    log.debug("event loop: %s", "uvloop" if backend_options else "asyncio")
    summary = anyio.run(run, backend="asyncio", backend_options=backend_options)
    print_summary(summary, run_dir, args.argv)
    return summary.exit_code


def print_summary(summary: RunSummary, run_dir: Path, argv: list[str]) -> None:
    """The run's numbers; how to resume when it stopped early."""
    rate = summary.images_new / summary.wall_s if summary.wall_s > 0 else 0.0
    lines = [
        f"run dir      {run_dir}",
        f"tasks        {summary.tasks_done:,} done, {summary.tasks_failed:,} failed, "
        f"{summary.tasks_unfinished + summary.tasks_unsubmitted:,} left "
        f"of {summary.tasks_total:,}",
        f"images       {summary.images_done:,} of {summary.images_total:,} "
        f"({summary.images_new:,} new, {rate:.1f}/s)",
        f"cost         ${summary.spent_usd} total, ${summary.spent_this_run_usd} "
        "this run",
        f"api requests {summary.api_requests:,} "
        f"({summary.api_requests / max(1, summary.images_new):.3f} per new image)",
        f"wall time    {summary.wall_s:.1f}s",
        f"ledger       {run_dir / 'ledger.csv'}",
    ]
    if summary.latency_s is not None:
        lines.insert(
            -2,
            f"api latency  {summary.latency_s:.2f}s per task (learnt this run; "
            "tasks/s cannot pass concurrency / latency)",
        )
    if summary.failures:
        lines.append("failures:")
        lines += [f"  {key}: {code}: {msg}" for key, code, msg in summary.failures[:20]]
        if len(summary.failures) > 20:
            lines.append(f"  ... and {len(summary.failures) - 20} more (see ledger)")
    if summary.tasks_skipped_failed:
        lines.append(
            f"{summary.tasks_skipped_failed} task(s) failed in an earlier run; "
            "add --retry-failed to submit them again"
        )
    if summary.exit_code == ExitCode.STOPPED:
        why = (
            summary.stop_message
            or summary.stop_reason
            or (
                None
                if summary.outputs_error is None
                else f"the ledger or gallery was not written: {summary.outputs_error}"
            )
            or "unfinished tasks"
        )
        lines.append(f"stopped early: {why}")
        lines.append("resume with: " + " ".join(["remix", *argv]))
    print("\n".join(lines))
