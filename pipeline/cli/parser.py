"""The ``remix`` command line's grammar: subcommands, options and their types."""

from __future__ import annotations

import argparse
import os
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.sandboxed import SANDBOX_KEY
from pipeline.periods import parse_date
from pipeline.rundir import remix_version
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
    """``I/N``, or ``auto/N`` resolved here from the scheduler's environment."""
    try:
        return Shard.resolve(text, os.environ)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Help(argparse.HelpFormatter):
    """Shows each option's default (unless it is None or off, which the help text
    words itself) and keeps the examples' lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and "(default:" not in text
            and action.option_strings
            and default is not None
            and default is not False
            and default != argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


EXAMPLES = "examples:"


def _examples(*lines: str) -> str:
    return EXAMPLES + "\n" + "\n".join(f"  {line}" for line in lines)


VERBOSE_HELP = "more log lines on stderr: -v info, -vv debug (default: warnings only)"
QUIET_HELP = "no progress bar (default: a bar on a terminal)"


CONFIG_HELP = "settings file (default: ./config.toml if present)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remix",
        description="Batch image-to-image runs on Runware's Ideogram Remix API. "
        "The key comes from RUNWARE_API_KEY, or from the file RUNWARE_API_KEY_FILE "
        "names (mode 600); REMIX_BASE_URL points remix at another API (e.g. a "
        "standalone `remix sandbox`).",
        formatter_class=_Help,
        epilog=_examples(
            "remix plan jobs/demo.toml",
            "remix run jobs/demo.toml --sandbox --run-dir runs/demo",
            "remix COMMAND --help",
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"remix {remix_version()}"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    # The same flags after the subcommand; SUPPRESS keeps them from resetting the above.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help=VERBOSE_HELP,
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help=QUIET_HELP,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", title="commands"
    )

    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="validate, count and estimate; spends nothing",
        formatter_class=_Help,
        epilog=_examples("remix plan jobs/nightly.toml", "remix plan --sizes"),
    )
    plan.add_argument("manifest", type=Path, nargs="?", help="the job manifest (.toml)")
    plan.add_argument("--config", type=Path, help=CONFIG_HELP)
    plan.add_argument(
        "--format", choices=["table", "json"], default="table", help="output format"
    )
    plan.add_argument(
        "--sizes",
        action="store_true",
        help="list the width x height pairs Ideogram Remix accepts, and exit",
    )
    plan.add_argument(
        "--shard",
        type=_shard,
        help="count shard I of N (0-based) only, e.g. 0/4; auto/N as for run "
        "(default: the whole job)",
    )

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run or resume a job",
        description="Run a job, or resume it: the same command continues where it "
        "stopped and never pays twice for a task. Exit 0 all done, 1 some tasks "
        "failed for good, 2 invalid input (nothing sent), 3 stopped early "
        "(resumable).",
        formatter_class=_Help,
        epilog=_examples(
            "remix run jobs/demo.toml --sandbox --run-dir runs/demo",
            "remix run jobs/nightly.toml --run-dir 'runs/nightly-{date}' -q"
            "   # cron: deploy/",
        ),
    )
    run.add_argument("manifest", type=Path, help="the job manifest (.toml)")
    run.add_argument(
        "--run-dir",
        type=Path,
        help="where the images, journal and ledger go; '{date}' in it is the date "
        "of the run's first start, so a resume after midnight continues the "
        "night's run (default: runs/<job name>, plus -shardIofN for a shard)",
    )
    run.add_argument("--config", type=Path, help=CONFIG_HELP)
    run.add_argument(
        "--sandbox",
        action="store_true",
        help="start the local sandbox API in-process (no key, nothing paid)",
    )
    run.add_argument(
        "--concurrency",
        type=_positive_int,
        help="most tasks in flight at the API (default: limits.concurrency, 64)",
    )
    run.add_argument(
        "--budget",
        type=_decimal,
        help="hard cap in USD for the run dir (default: the manifest's "
        "job.budget_usd, split evenly across shards; else none)",
    )
    run.add_argument(
        "--shard",
        type=_shard,
        help="run shard I of N (0-based), e.g. 0/4; auto/N takes I from "
        "JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID (Slurm) "
        "(default: every task)",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="submit tasks that failed in an earlier run again",
    )
    run.add_argument(
        "--rerun-changed",
        action="store_true",
        help="the manifest changed tasks this run dir already ran: run exactly those "
        "again (their earlier images stay, superseded); dropped tasks keep results",
    )

    status = sub.add_parser(
        "status",
        parents=[common],
        help="progress, failures and cost of a run dir (or of one job's shards)",
        formatter_class=_Help,
        epilog=_examples(
            "remix status runs/demo",
            "remix status runs/nightly-shard0of2 runs/nightly-shard1of2",
        ),
    )
    status.add_argument(
        "run_dirs", type=Path, nargs="+", help="a run dir, or the run dirs of shards"
    )
    status.add_argument(
        "--format", choices=["table", "json"], default="table", help="output format"
    )

    report = sub.add_parser(
        "report",
        parents=[common],
        help="cost report over one or more run dirs",
        formatter_class=_Help,
        epilog=_examples(
            "remix report runs/demo", "remix report runs/nightly-* --by day"
        ),
    )
    report.add_argument("run_dirs", type=Path, nargs="+", help="run directories")
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
        help="only what happened on or after this date (YYYY-MM-DD, in --tz; "
        "default: from the first run)",
    )
    report.add_argument(
        "--until",
        type=_date,
        metavar="DATE",
        help="only what happened on or before this date, through its end "
        "(YYYY-MM-DD, in --tz; default: up to now)",
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
        help="write the report to this file instead, its path printed (default: "
        "stdout; for html, cost-report.html beside the run dirs)",
    )

    gallery = sub.add_parser(
        "gallery",
        parents=[common],
        help="write RUN_DIR/gallery.html; one page for one job's shards; or runs "
        "compared side by side",
        formatter_class=_Help,
        epilog=_examples(
            "remix gallery runs/demo",
            "remix gallery runs/nightly-shard0of2 runs/nightly-shard1of2",
            "remix gallery runs/night-2026-12-01 runs/night-2026-12-02",
            "remix gallery runs/demo --picks picks.json",
        ),
    )
    gallery.add_argument(
        "run_dirs",
        type=Path,
        nargs="+",
        help="a run dir; the run dirs of one job's shards (one grid); or runs to "
        "compare (each cell shows every run's image)",
    )
    gallery.add_argument(
        "--picks",
        type=Path,
        metavar="FILE",
        help="star the task keys of this picks file (the page's 'export picks' "
        "JSON, or a CSV with a key column) (default: none)",
    )
    gallery.add_argument(
        "--out",
        type=Path,
        help="the page to write (default: RUN_DIR/gallery.html for one run dir; "
        "JOB-gallery.html beside the run dirs for several)",
    )

    doctor = sub.add_parser(
        "doctor",
        parents=[common],
        help="check the key and how the API answers, spending nothing; remember it",
        formatter_class=_Help,
        epilog=_examples("remix doctor", "remix doctor --spend-one --out one.jpg"),
    )
    doctor.add_argument("--config", type=Path, help=CONFIG_HELP)
    doctor.add_argument(
        "--sandbox", action="store_true", help="check a local sandbox API in-process"
    )
    doctor.add_argument(
        "--spend-one",
        action="store_true",
        help="also run one real task end to end (costs one image, price shown first)",
    )
    doctor.add_argument(
        "--out",
        type=Path,
        help="with --spend-one: write its image to this file (default: not kept)",
    )
    doctor.add_argument(
        "--format", choices=["table", "json"], default="table", help="output format"
    )

    sandbox = sub.add_parser(
        "sandbox",
        parents=[common],
        help="serve the local Runware-compatible API",
        description="Serve the local Runware-compatible API. Point remix at it with "
        "REMIX_BASE_URL=<the URL it prints> and RUNWARE_API_KEY=<--api-key>. The "
        "dialect options make it answer the undocumented parts of the protocol as "
        "other servers might (runware-protocol.md §10).",
        formatter_class=_Help,
        epilog=_examples(
            "remix sandbox        # terminal 1: serves http://127.0.0.1:8080/v1",
            "REMIX_BASE_URL=http://127.0.0.1:8080/v1 RUNWARE_API_KEY=sandbox \\",
            "  remix run jobs/demo.toml --run-dir runs/demo-standalone   # terminal 2",
        ),
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
        help="queue capacity in tasks; a submit beyond it gets 429 (default: no cap)",
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
        help="the account balance in USD. Each imageInference "
        "costs its price x numberResults when accepted, refunded if it fails; one "
        "that does not fit is refused with insufficientCredits (402 when every "
        "imageInference of the request was). Top up a running sandbox with "
        'POST /sandbox/credit {"add_usd": "5.00"} and the Bearer key; GET it for '
        "the balance (default: unlimited)",
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
