"""The ``remix`` command: arguments, logging, exit codes; the only anyio.run caller.

Exit codes: 0 every task done; 1 some tasks failed for good (see the ledger); 2 invalid
input, nothing submitted; 3 stopped early (budget, auth, credit, interrupt, disk):
resumable with the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import SecretStr

from pipeline.cli.exit import ExitCode
from pipeline.cli.show import show_report, show_status
from pipeline.config import ENV_API_KEY, Settings, load_settings, loop_options
from pipeline.errors import ConfigError, ManifestError, PipelineError
from pipeline.expand import check_manifest
from pipeline.gallery import write_gallery
from pipeline.ledger import write_ledger
from pipeline.manifest import Manifest
from pipeline.progress import NullProgress, Progress, TqdmProgress
from pipeline.records import EngineOptions, RunSummary
from pipeline.rundir import open_run_dir
from pipeline.runner import JobTotals, run_job
from pipeline.shard import Shard

if TYPE_CHECKING:  # imported when serving: the sandbox is not every run's cost
    from pipeline.sandbox import SandboxConfig

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED = (
    ExitCode.OK,
    ExitCode.FAILED,
    ExitCode.INVALID,
    ExitCode.STOPPED,
)
SANDBOX_KEY = "sandbox"


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or not value.is_finite():
        raise argparse.ArgumentTypeError(f"must be a non-negative amount: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shard: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remix",
        description="Batch image-to-image runs on Runware's Ideogram Remix API.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    # The same flags after the subcommand; SUPPRESS keeps them from resetting the above.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser(
        "plan", parents=[common], help="validate, count and estimate; spends nothing"
    )
    plan.add_argument("manifest", type=Path)
    plan.add_argument("--config", type=Path)
    plan.add_argument("--format", choices=["table", "json"], default="table")
    plan.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", parents=[common], help="run or resume a job")
    run.add_argument("manifest", type=Path)
    run.add_argument("--run-dir", type=Path)
    run.add_argument("--config", type=Path)
    run.add_argument(
        "--sandbox", action="store_true", help="start the local sandbox API in-process"
    )
    run.add_argument("--concurrency", type=_positive_int)
    run.add_argument("--budget", type=_decimal, help="hard cap in USD for the run dir")
    run.add_argument(
        "--shard", type=_shard, help="run shard I of N (0-based), e.g. 0/4"
    )
    run.add_argument(
        "--retry-failed", action="store_true", help="submit failed tasks again"
    )
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status", parents=[common], help="progress, failures and cost of a run dir"
    )
    status.add_argument("run_dir", type=Path)
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser(
        "report", parents=[common], help="cost report over one or more run dirs"
    )
    report.add_argument("run_dirs", type=Path, nargs="+")
    report.add_argument(
        "--by",
        default="variant",
        help="reference, variant, day, run or axis:NAME (e.g. axis:remixStrength)",
    )
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(func=cmd_report)

    gallery = sub.add_parser(
        "gallery", parents=[common], help="write RUN_DIR/gallery.html"
    )
    gallery.add_argument("run_dir", type=Path)
    gallery.set_defaults(func=cmd_gallery)

    doctor = sub.add_parser(
        "doctor",
        parents=[common],
        help="check the key and how the API answers, spending nothing; remember it",
    )
    doctor.add_argument("--config", type=Path)
    doctor.add_argument(
        "--sandbox", action="store_true", help="check a local sandbox API in-process"
    )
    doctor.add_argument(
        "--spend-one",
        action="store_true",
        help="also run one real task end to end (costs one image, price shown first)",
    )
    doctor.add_argument(
        "--out", type=Path, help="with --spend-one: write its image to this file"
    )
    doctor.add_argument("--format", choices=["table", "json"], default="table")
    doctor.set_defaults(func=cmd_doctor)

    sandbox = sub.add_parser(
        "sandbox",
        parents=[common],
        help="serve the local Runware-compatible API",
        description="Serve the local Runware-compatible API. Point remix at it with "
        "REMIX_BASE_URL=<the URL it prints> and RUNWARE_API_KEY=<--api-key>. The "
        "dialect options make it answer the undocumented parts of the protocol as "
        "other servers might (runware-protocol.md §10).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sandbox.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sandbox.add_argument(
        "--port", type=int, default=8080, help="port to listen on (0: any free one)"
    )
    sandbox.add_argument(
        "--seed", type=int, default=0, help="seed for image seeds and faults"
    )
    sandbox.add_argument(
        "--api-key", default=SANDBOX_KEY, help="the key clients must send"
    )
    sandbox.add_argument(
        "--latency",
        type=float,
        default=0.5,
        help="seconds from accepting a task to its first image",
    )
    sandbox.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        help="up to this many seconds more per task, at random",
    )
    sandbox.add_argument(
        "--failure-rate",
        type=float,
        default=0.0,
        help="share of tasks that fail with an inferenceError (refunded)",
    )
    sandbox.add_argument(
        "--server-error-rate",
        type=float,
        default=0.0,
        help="share of requests answered 500/503 before anything is accepted",
    )
    sandbox.add_argument(
        "--rate-limit-rate",
        type=float,
        default=0.0,
        help="share of requests answered 429 before anything is accepted",
    )
    sandbox.add_argument(
        "--max-in-flight",
        type=int,
        help="queue capacity in tasks; a submit beyond it gets 429 (None: no cap)",
    )
    dialect = sandbox.add_argument_group("dialects")
    dialect.add_argument(
        "--poll-task-type",
        choices=["imageInference", "getResponse"],
        default="imageInference",
        help="the taskType of every item of a getResponse answer (acks and sync "
        "results keep imageInference)",
    )
    dialect.add_argument(
        "--unknown-task",
        choices=[
            "taskFailedOrNotFound",
            "taskNotFound",
            "taskExpired",
            "silent",
            "processing",
        ],
        default="taskFailedOrNotFound",
        help="how getResponse answers a taskUUID it does not know: an errors item "
        "with that code (400 when alone), 'silent': no item at all, 'processing': "
        "a processing item forever",
    )
    dialect.add_argument(
        "--poll-batch",
        choices=["all", "first", "reject", "empty"],
        default="all",
        help="a request holding several getResponse tasks: 'all' answers each, "
        "'first' only the first, 'reject' refuses the request with 400, 'empty' "
        'answers 200 {"data": []}; the last two process nothing of it',
    )
    dialect.add_argument(
        "--failed-as",
        choices=["errors", "data"],
        default="errors",
        help="a failed generation in a getResponse answer: an errors item "
        "(inferenceError), or a data item with status 'error' and a nested error",
    )
    dialect.add_argument(
        "--reuse-code",
        choices=["conflictTaskUUID", "duplicateTaskUUID"],
        default="conflictTaskUUID",
        help="the code refusing an imageInference whose taskUUID was accepted "
        "before (nothing is billed)",
    )
    dialect.add_argument(
        "--ack",
        choices=["processing", "empty"],
        default="processing",
        help="acknowledge an accepted async imageInference with a processing item, "
        'or with nothing ({"data": []} when nothing else is in the answer)',
    )
    dialect.add_argument(
        "--credit-usd",
        type=_decimal,
        help="the account balance in USD (None: unlimited). Each imageInference "
        "costs its price x numberResults when accepted, refunded if it fails; one "
        "that does not fit is refused with insufficientCredits (402 when every "
        "imageInference of the request was). Top up a running sandbox with "
        'POST /sandbox/credit {"add_usd": "5.00"} and the Bearer key; GET it for '
        "the balance",
    )
    sandbox.set_defaults(func=cmd_sandbox)
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO
    if verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the remix command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    try:
        code: int = args.func(args)
    except ManifestError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        print(
            f"remix: {len(exc.problems)} problem(s) found; nothing was submitted",
            file=sys.stderr,
        )
        return EXIT_INVALID
    except ConfigError as exc:
        print(f"remix: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except PipelineError as exc:
        print(f"remix: {exc}", file=sys.stderr)
        return EXIT_STOPPED if exc.run_fatal else EXIT_FAILED
    except KeyboardInterrupt:
        print("remix: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_STOPPED
    except Exception:  # the one catch-all: a bug gets a logged traceback and exit 1
        log.exception("remix: unexpected error")
        return EXIT_FAILED
    return code


# ---------------------------------------------------------------------- plan


def _load_valid(path: Path, settings: Settings) -> tuple[Manifest, dict[str, Any]]:
    """Load and validate a manifest; every problem at once, or totals for the plan."""
    manifest, report = check_manifest(path)
    by_speed: dict[str, int] = dict(report.images_by_speed)
    estimate = sum(
        (settings.price_for(speed) * count for speed, count in by_speed.items()),
        Decimal(0),
    )
    return manifest, {
        "job": manifest.job.name,
        "manifest": str(path),
        "tasks": report.tasks,
        "images": report.images,
        "images_by_rendering_speed": by_speed,
        "estimated_cost_usd": str(estimate),
        "budget_usd": None
        if manifest.job.budget_usd is None
        else str(manifest.job.budget_usd),
    }


def cmd_plan(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _, plan = _load_valid(args.manifest, settings)
    if args.format == "json":
        print(json.dumps(plan, indent=2))
        return EXIT_OK
    rows = [
        ("job", plan["job"]),
        ("tasks", f"{plan['tasks']:,}"),
        ("images", f"{plan['images']:,}"),
    ]
    rows += [
        (f"  {speed or 'DEFAULT'} images", f"{count:,} x ${settings.price_for(speed)}")
        for speed, count in sorted(plan["images_by_rendering_speed"].items())
    ]
    rows.append(("estimated cost", f"${plan['estimated_cost_usd']}"))
    if plan["budget_usd"] is not None:
        rows.append(("budget", f"${plan['budget_usd']}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("valid: nothing was submitted")
    return EXIT_OK


# ----------------------------------------------------------------------- run


def _run_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.concurrency is not None:
        overrides["limits"] = {"concurrency": args.concurrency}
    return load_settings(args.config, overrides=overrides)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _run_settings(args)
    manifest, plan = _load_valid(args.manifest, settings)
    backend_options = loop_options(settings.run.event_loop)
    log.debug("event loop: %s", "uvloop" if backend_options else "asyncio")
    if not args.sandbox and settings.api_key is None:
        raise ConfigError(
            f"no API key: set {ENV_API_KEY} (from your Runware dashboard, API keys) "
            "to run against the real API, or add --sandbox to run against the "
            "local sandbox"
        )
    shard: Shard | None = args.shard
    run_dir: Path = args.run_dir or settings.run.runs_dir / (
        manifest.job.name + ("" if shard is None else shard.dir_suffix)
    )
    budget = args.budget if args.budget is not None else manifest.job.budget_usd
    options = EngineOptions(
        concurrency=settings.limits.concurrency,
        budget_usd=budget,
        retry_failed=args.retry_failed,
        shard=args.shard,
        handle_signals=True,
    )
    with open_run_dir(
        run_dir,
        manifest_path=args.manifest,
        settings_public=settings.public_dict(),
        shard=None if shard is None else shard.label,
    ) as resuming:
        if resuming:
            log.warning("resuming the run in %s", run_dir)
        progress: Progress = NullProgress() if args.quiet else TqdmProgress()
        summary = anyio.run(
            _run_async,
            args,
            settings,
            manifest,
            plan,
            run_dir,
            options,
            progress,
            backend="asyncio",
            backend_options=backend_options,
        )
        outputs_written = _write_outputs(run_dir)
    _print_summary(summary, run_dir, args)
    if not outputs_written:
        return max(summary.exit_code, EXIT_STOPPED)
    return summary.exit_code


async def _run_async(
    args: argparse.Namespace,
    settings: Settings,
    manifest: Manifest,
    plan: dict[str, Any],
    run_dir: Path,
    options: EngineOptions,
    progress: Progress,
) -> RunSummary:
    async with contextlib.AsyncExitStack() as stack:
        if args.sandbox:
            from pipeline.sandbox import SandboxConfig, running_sandbox

            base_url = await stack.enter_async_context(
                running_sandbox(SandboxConfig(api_key=SANDBOX_KEY, latency_s=0.5))
            )
            # Never send a real key to the sandbox.
            settings = settings.model_copy(
                update={
                    "api": settings.api.model_copy(update={"base_url": base_url}),
                    "api_key": SecretStr(SANDBOX_KEY),
                }
            )
        return await run_job(
            manifest=manifest,
            manifest_path=args.manifest,
            totals=_totals(plan),
            run_dir=run_dir,
            settings=settings,
            options=options,
            progress=progress,
        )
    raise AssertionError("unreachable")


def _totals(plan: dict[str, Any]) -> JobTotals:
    return JobTotals(
        tasks=plan["tasks"],
        images=plan["images"],
        estimate_usd=Decimal(plan["estimated_cost_usd"]),
    )


def _write_outputs(run_dir: Path) -> bool:
    """ledger.csv and gallery.html, rebuilt from the journal after every run.

    They are derived from the journal, so failing to write them (a full disk) loses
    nothing: the summary still prints, and a rerun writes them.
    """
    try:
        write_ledger(run_dir)
        write_gallery(run_dir)
    except (PipelineError, OSError) as exc:
        log.error(
            "could not write the ledger or gallery (%s); rerun to write them", exc
        )
        return False
    return True


def _print_summary(
    summary: RunSummary, run_dir: Path, args: argparse.Namespace
) -> None:
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
    if summary.exit_code == EXIT_STOPPED:
        why = summary.stop_message or summary.stop_reason or "unfinished tasks"
        lines.append(f"stopped early: {why}")
        lines.append("resume with: " + " ".join(["remix", *args.argv]))
    print("\n".join(lines))


# -------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from pipeline.doctor import Findings, examine, render_table

    if args.out is not None and not args.spend_one:
        raise ConfigError("--out needs --spend-one (it names that task's image)")
    settings = load_settings(args.config)

    def announce(line: str) -> None:
        print(f"remix: {line}", file=sys.stderr, flush=True)

    async def check() -> Findings:
        async with contextlib.AsyncExitStack() as stack:
            nonlocal settings
            if args.sandbox:
                settings = await _with_sandbox(stack, settings)
            return await examine(
                settings,
                spend_one=args.spend_one,
                announce=announce,
                out=args.out,
                # The in-process sandbox's port changes every time: nothing to keep.
                save=not args.sandbox,
            )

    findings = anyio.run(
        check,
        backend="asyncio",
        backend_options=loop_options(settings.run.event_loop),
    )
    if args.sandbox and findings.usable:
        findings.cache_note = (
            "not written: the in-process sandbox's port is new each run"
        )
    if args.format == "json":
        print(json.dumps(findings.as_json(), indent=2))
    else:
        print(render_table(findings))
    if findings.problem is not None:
        print(f"remix: {findings.problem}", file=sys.stderr)
    return findings.exit_code


async def _with_sandbox(
    stack: contextlib.AsyncExitStack, settings: Settings
) -> Settings:
    """Start the default in-process sandbox; settings pointing at it (its own key:
    a real key is never sent to it)."""
    from pipeline.sandbox import SandboxConfig, running_sandbox

    base_url = await stack.enter_async_context(
        running_sandbox(SandboxConfig(api_key=SANDBOX_KEY, latency_s=0.5))
    )
    return settings.model_copy(
        update={
            "api": settings.api.model_copy(update={"base_url": base_url}),
            "api_key": SecretStr(SANDBOX_KEY),
        }
    )


# ------------------------------------------------------------ status / report


def cmd_status(args: argparse.Namespace) -> int:
    return show_status(args.run_dir, fmt=args.format)


def cmd_report(args: argparse.Namespace) -> int:
    return show_report(args.run_dirs, by=args.by, fmt=args.format)


def cmd_gallery(args: argparse.Namespace) -> int:
    path = write_gallery(args.run_dir)
    print(path)
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    from pipeline.sandbox import serve

    serve(args.host, args.port, sandbox_config(args))
    return EXIT_OK


def sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    """The SandboxConfig ``remix sandbox`` serves, from its parsed options."""
    from pipeline.sandbox import SandboxConfig

    return SandboxConfig(
        seed=args.seed,
        api_key=args.api_key,
        latency_s=args.latency,
        latency_jitter_s=args.latency_jitter,
        task_fail_rate=args.failure_rate,
        server_error_rate=args.server_error_rate,
        rate_limit_rate=args.rate_limit_rate,
        max_in_flight=args.max_in_flight,
        poll_task_type=args.poll_task_type,
        unknown_task=args.unknown_task,
        poll_batch=args.poll_batch,
        failed_as=args.failed_as,
        reuse_code=args.reuse_code,
        ack=args.ack,
        credit_usd=args.credit_usd,
    )
