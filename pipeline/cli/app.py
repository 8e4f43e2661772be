"""The ``remix`` command: logging, which command runs, and what each error exits as.

Exit codes (``ExitCode``): 0 every task done; 1 some tasks failed for good (see the
ledger); 2 invalid input, nothing submitted; 3 stopped early (budget, auth, credit,
interrupt, disk): resumable with the same command.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from pipeline.cli.doctor import cmd_doctor
from pipeline.cli.parser import build_parser, sandbox_config
from pipeline.cli.run import cmd_plan, cmd_run
from pipeline.cli.show import show_report, show_status
from pipeline.errors import ConfigError, ManifestError, PipelineError
from pipeline.exit_codes import ExitCode
from pipeline.gallery import load_picks, write_job_gallery
from pipeline.rundata import check_run_dir

log = logging.getLogger("pipeline")


def cmd_status(args: argparse.Namespace) -> ExitCode:
    return show_status(*args.run_dirs, fmt=args.format)


def cmd_report(args: argparse.Namespace) -> ExitCode:
    return show_report(
        args.run_dirs,
        by=args.by,
        fmt=args.format,
        since=args.since,
        until=args.until,
        tz=args.tz,
        output=args.output,
    )


def cmd_gallery(args: argparse.Namespace) -> ExitCode:
    """One page: RUN_DIR/gallery.html, or for one job's shards (or runs compared)
    JOB-gallery.html beside their run dirs (``--out`` chooses); ``--picks`` stars
    the keys of a picks file the page exported."""
    for run_dir in args.run_dirs:
        check_run_dir(run_dir)
    picks = None if args.picks is None else load_picks(args.picks)
    print(write_job_gallery(args.run_dirs, out=args.out, picks=picks))
    return ExitCode.OK


def cmd_sandbox(args: argparse.Namespace) -> ExitCode:
    from pipeline.sandbox import serve  # serving only: not every command's import

    serve(args.host, args.port, sandbox_config(args))
    return ExitCode.OK


COMMANDS: dict[str, Callable[[argparse.Namespace], ExitCode]] = {
    "plan": cmd_plan,
    "run": cmd_run,
    "status": cmd_status,
    "report": cmd_report,
    "gallery": cmd_gallery,
    "doctor": cmd_doctor,
    "sandbox": cmd_sandbox,
}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO
    if verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the remix command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except ManifestError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        print(
            f"remix: {len(exc.problems)} problem(s) found; nothing was submitted",
            file=sys.stderr,
        )
        return ExitCode.INVALID
    except ConfigError as exc:
        print(f"remix: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    except PipelineError as exc:
        print(f"remix: {exc}", file=sys.stderr)
        return ExitCode.STOPPED if exc.run_fatal else ExitCode.FAILED
    except KeyboardInterrupt:
        print("remix: interrupted; rerun the same command to resume", file=sys.stderr)
        return ExitCode.STOPPED
    except Exception:  # the one catch-all: a bug gets a logged traceback and exit 1
        log.exception("remix: unexpected error")
        return ExitCode.FAILED


def run_command() -> NoReturn:
    """The ``remix`` executable: ``main``, then exit with its code."""
    code = main()
    # The outcome is decided: a Ctrl-C while the interpreter exits (joining worker
    # threads) would otherwise end the process by SIGINT instead of with ``code``.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)
