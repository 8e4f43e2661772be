"""Run-dir templates for scheduled runs: ``--run-dir 'runs/nightly-{date}'``.

A cron line that names its run dir with ``$(date +%F)`` starts a new, paid run when
it is resumed after midnight. A template's ``{date}`` is instead fixed by the run's
first start: the template's run dir first started within ``CONTINUE_WITHIN`` is
tonight's, and is continued whatever today's date is (a finished one then has
nothing left to do: a retry costs nothing); otherwise ``{date}`` is today's local
date, so each night still gets its own dir.
"""

from __future__ import annotations

import glob
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from pipeline.rundir import read_run_info

DATE_FIELD: Final = "{date}"
CONTINUE_WITHIN: Final = timedelta(hours=20)
"""How long after its first start an unfinished run is still "tonight's": long
enough for a morning resume, short of the next night's start (which then begins a
new dir even when last night's stopped on its budget)."""
_DATE_GLOB: Final = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
_DATE_RE: Final = r"\d{4}-\d{2}-\d{2}"


def resolve_run_dir(run_dir: Path, *, now: datetime | None = None) -> Path:
    """``run_dir`` itself, or for a template the dir this run continues or starts.

    Raises:
        ConfigError: a candidate dir's run.json is unreadable.
    """
    text = str(run_dir)
    if DATE_FIELD not in text:
        return run_dir
    now = (now or datetime.now(UTC)).astimezone()
    if (tonight := _tonights_run(text, now)) is not None:
        return tonight
    return Path(text.replace(DATE_FIELD, now.date().isoformat()))


def _tonights_run(template: str, now: datetime) -> Path | None:
    """The template's run dir most recently first started within the window."""
    pattern = glob.escape(template).replace(DATE_FIELD, _DATE_GLOB)
    shape = re.compile(re.escape(template).replace(re.escape(DATE_FIELD), _DATE_RE))
    best: tuple[datetime, Path] | None = None
    for name in glob.glob(pattern):
        path = Path(name)
        if not shape.fullmatch(name) or not path.is_dir():
            continue
        started = _first_start(path)
        if started is None or not timedelta(0) <= now - started <= CONTINUE_WITHIN:
            continue
        if best is None or started > best[0]:
            best = (started, path)
    return None if best is None else best[1]


def _first_start(run_dir: Path) -> datetime | None:
    info = read_run_info(run_dir)
    stamp = info.get("started_at") if info else None
    try:
        started = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None
    if started is not None and started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return started
