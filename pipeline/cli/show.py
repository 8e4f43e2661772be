"""``remix status`` and ``remix report``: print what the library computed, pick the
exit code.

The library (:mod:`pipeline.status`, :mod:`pipeline.costs`) returns data and pure
text and raises :class:`~pipeline.errors.ConfigError` on bad input; only here is
anything written to stdout or stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.costs import build_report, format_report, parse_by, report_csv
from pipeline.errors import ConfigError
from pipeline.exit_codes import ExitCode
from pipeline.rundata import check_run_dir, load_run
from pipeline.status import format_job_status, format_status, job_status, run_status


def _invalid(message: object) -> ExitCode:
    sys.stderr.write(f"remix: {message}\n")
    return ExitCode.INVALID


def show_status(run_dir: Path, *more: Path, fmt: str = "table") -> ExitCode:
    """Print ``run_dir``'s status (table or JSON); with ``more`` run dirs, the shards
    of one job as one job. INVALID when one is not a run dir, or they are not the
    shards of one job."""
    try:
        if more:
            job = job_status([run_dir, *more])
            text = format_job_status(job)
            data = job.to_json()
        else:
            status = run_status(run_dir)
            text = format_status(status)
            data = status.to_json()
    except ConfigError as exc:
        return _invalid(exc)
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(text + "\n")
    return ExitCode.OK


def show_report(run_dirs: list[Path], *, by: str, fmt: str) -> ExitCode:
    """Print a cost report over ``run_dirs`` (table, CSV or JSON); INVALID on bad
    input (an unknown ``--by``, a directory that is not a run dir)."""
    try:
        parse_by(by)
        for run_dir in run_dirs:
            check_run_dir(run_dir)
    except (ValueError, ConfigError) as exc:
        return _invalid(exc)
    report = build_report([load_run(d) for d in run_dirs], by=by)
    if fmt == "json":
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    elif fmt == "csv":
        sys.stdout.write(report_csv(report))
    else:
        sys.stdout.write(format_report(report) + "\n")
    return ExitCode.OK
