"""The ``remix`` command line's grammar: subcommands, options and their types."""

from __future__ import annotations

import argparse
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.sandboxed import SANDBOX_KEY
from pipeline.periods import parse_date
from pipeline.shard import Shard

if TYPE_CHECKING:  # imported when serving: the sandbox is not every run's cost
    from pipeline.sandbox import SandboxConfig


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


def _date(text: str) -> date:
    try:
        return parse_date(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    status = sub.add_parser(
        "status", parents=[common], help="progress, failures and cost of a run dir"
    )
    status.add_argument("run_dir", type=Path)
    status.add_argument("--format", choices=["table", "json"], default="table")

    report = sub.add_parser(
        "report", parents=[common], help="cost report over one or more run dirs"
    )
    report.add_argument("run_dirs", type=Path, nargs="+")
    report.add_argument(
        "--by",
        default="variant",
        help="reference, variant, run, axis:NAME (e.g. axis:remixStrength), or a "
        "period: day, week (ISO, e.g. 2026-W49) or month (e.g. 2026-12). For html: "
        "the page's first view (a period, stacked by variant; or a stacking axis, "
        "per day), both switchable in the page",
    )
    report.add_argument(
        "--format",
        choices=["table", "csv", "json", "html"],
        default="table",
        help="html: a page of charts, written beside the run dirs (their common "
        "parent's cost-report.html) or to -o, with plotly.js next to it; its path "
        "is printed",
    )
    report.add_argument(
        "--since",
        type=_date,
        metavar="DATE",
        help="only what happened on or after this date (YYYY-MM-DD, in --tz)",
    )
    report.add_argument(
        "--until",
        type=_date,
        metavar="DATE",
        help="only what happened on or before this date, through its end "
        "(YYYY-MM-DD, in --tz)",
    )
    report.add_argument(
        "--tz",
        metavar="ZONE",
        help="IANA time zone in which days start, e.g. Europe/Berlin or UTC "
        "(default: this machine's zone)",
    )
    report.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="write the report to this file instead (its path is printed)",
    )

    gallery = sub.add_parser(
        "gallery", parents=[common], help="write RUN_DIR/gallery.html"
    )
    gallery.add_argument("run_dir", type=Path)

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
    return parser


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
