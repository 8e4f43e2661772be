"""One run dir read once: run.json and the journal folded with its events kept.

Status and cost reports both start here. Reading is safe while a run is still
writing: a torn last journal line is skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.journal import JOURNAL_NAME, ResumeState, load_state
from pipeline.journal_events import RunEndedEvent, RunStartedEvent, SubmittedEvent
from pipeline.ledger import LedgerRow, build_ledger_rows
from pipeline.rundir import RUN_INFO_NAME, SANDBOX_API, read_run_info, recorded_api

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """Everything reports and status need from one run dir (one journal pass)."""

    run_dir: Path
    info: dict[str, object]
    """run.json (empty when missing or unreadable)."""
    state: ResumeState
    rows: list[LedgerRow]
    key_estimates: dict[str, SubmittedEvent] = field(default_factory=dict)
    """key -> its latest submission (estimate and submit time)."""

    @property
    def last_started(self) -> RunStartedEvent | None:
        """The latest run_started: the current totals and plan estimate."""
        return self.state.last_started

    @property
    def last_ended(self) -> RunEndedEvent | None:
        """The run_ended that closed the latest run_started, if any."""
        return self.state.last_ended

    @property
    def last_event_at(self) -> datetime | None:
        """When the last event was journaled."""
        return self.state.last_event_at

    @property
    def manifest(self) -> str | None:
        """The manifest path recorded in run.json."""
        value = self.info.get("manifest")
        return value if isinstance(value, str) else None

    @property
    def api(self) -> str | None:
        """The API the run dir belongs to (run.json), None when unknown."""
        return recorded_api(self.info)

    @property
    def is_sandbox(self) -> bool:
        """True for a run against a local sandbox: its dollars are not billed."""
        return self.api == SANDBOX_API

    @property
    def shard(self) -> str | None:
        """``I/N`` when this run dir holds one shard of a job."""
        value = self.info.get("shard")
        if isinstance(value, str):
            return value
        return None if self.last_started is None else self.last_started.shard

    @property
    def estimate_usd(self) -> Decimal | None:
        """The plan's estimate from the latest run_started."""
        return None if self.last_started is None else self.last_started.estimate_usd


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a run (its run.json or its journal)."""
    return (path / RUN_INFO_NAME).is_file() or (path / JOURNAL_NAME).is_file()


def check_run_dir(path: Path) -> None:
    """Raise unless ``path`` holds a run.

    Raises:
        ConfigError: no run.json and no journal there, saying what to pass instead.
    """
    if not is_run_dir(path):
        raise ConfigError(
            f"{path} is not a run directory (no {RUN_INFO_NAME} or "
            f"{JOURNAL_NAME}); pass the --run-dir of a `remix run`"
        )


def _read_info(run_dir: Path) -> dict[str, object]:
    try:
        info = read_run_info(run_dir)
    except ConfigError as exc:
        log.warning("%s", exc)
        return {}
    return dict(info) if info else {}


def load_run(run_dir: Path) -> RunData:
    """Read ``run_dir``'s run.json and journal (a torn last line is skipped).

    Raises:
        ConfigError: ``run_dir`` is not a run directory.
    """
    check_run_dir(run_dir)
    state = load_state(run_dir / JOURNAL_NAME)
    # state.submitted is in journal order: the last submission of a key wins.
    estimates = {sub.key: sub for sub in state.submitted.values()}
    return RunData(
        run_dir=run_dir,
        info=_read_info(run_dir),
        state=state,
        rows=build_ledger_rows(state),
        key_estimates=estimates,
    )
