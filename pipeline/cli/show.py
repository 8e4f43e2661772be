"""``remix status`` and ``remix report``: print what the library computed, pick the
exit code.

The library (:mod:`pipeline.status`, :mod:`pipeline.costs`) returns data and pure
text and raises :class:`~pipeline.errors.ConfigError` on bad input; only here is
anything written to stdout or stderr.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from pipeline.costs import build_report, format_report, parse_by, report_csv
from pipeline.errors import ConfigError, StorageError
from pipeline.exit_codes import ExitCode
from pipeline.periods import Window, resolve_zone
from pipeline.rundata import check_run_dir, load_run
from pipeline.status import format_job_status, format_status, job_status, run_status
from pipeline.storage import write_atomic_sync


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


def show_report(
    run_dirs: list[Path],
    *,
    by: str,
    fmt: str,
    since: date | None = None,
    until: date | None = None,
    tz: str | None = None,
    output: Path | None = None,
) -> ExitCode:
    """Print a cost report over ``run_dirs`` (table, CSV or JSON), or write it to
    ``output``; ``html`` writes a page of charts (beside the run dirs without
    ``output``) and prints its path. INVALID on bad input (an unknown ``--by`` or
    zone, ``--since`` after ``--until``, a directory that is not a run dir)."""
    try:
        parse_by(by)
        zone = resolve_zone(tz)
        window = Window(since, until)
        for run_dir in run_dirs:
            check_run_dir(run_dir)
    except (ValueError, ConfigError) as exc:
        return _invalid(exc)
    runs = [load_run(d) for d in run_dirs]
    if fmt == "html":
        from pipeline.cost_page import default_page_path, write_cost_page

        path = output or default_page_path(run_dirs)
        try:
            write_cost_page(runs, path, by=by, zone=zone, window=window)
        except StorageError as exc:
            return _invalid(exc)
        sys.stdout.write(f"{path}\n")
        return ExitCode.OK
    report = build_report(runs, by=by, zone=zone, window=window)
    if fmt == "json":
        text = json.dumps(report.to_json(), indent=2) + "\n"
    elif fmt == "csv":
        text = report_csv(report)
    else:
        text = format_report(report) + "\n"
    if output is None:
        sys.stdout.write(text)
        return ExitCode.OK
    try:
        write_atomic_sync(output, text.encode())
    except StorageError as exc:
        return _invalid(exc)
    sys.stdout.write(f"{output}\n")
    return ExitCode.OK
