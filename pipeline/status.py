"""Where a run dir stands (``remix status``): counts, cost, state, how to resume.

Read-only on purpose, so it is safe while a run is writing to the directory.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from pipeline.journal import JOURNAL_NAME
from pipeline.rundata import load_run
from pipeline.rundir import LOCK_NAME


def _lock_holder(path: Path) -> int | None:
    """The pid holding a lock on ``path`` per /proc/locks (Linux), else None.

    Read-only on purpose: taking the lock, even briefly, could make a starting run
    believe another run holds its directory.
    """
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if ident in fields:
            pid = fields[fields.index(ident) - 1]
            return int(pid) if pid.isdigit() else 0
    return None


@dataclass(frozen=True, slots=True)
class RunStatus:
    """Where a run dir stands, as ``remix status`` shows it."""

    run_dir: str
    manifest: str | None
    shard: str | None
    state: str
    """running, finished, finished-with-failures, stopped, interrupted, not-started."""
    detail: str
    running_pid: int | None
    finished: bool
    resumable: bool
    tasks_total: int | None
    done: int
    failed: int
    in_flight: int
    remaining: int | None
    images_done: int
    images_total: int | None
    spent_usd: Decimal
    estimate_usd: Decimal | None
    started_at: str | None
    last_activity: datetime | None
    pending_task_uuids: tuple[str, ...]
    resume_command: str | None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (decimals as exact strings, times as ISO 8601)."""
        return {
            "run_dir": self.run_dir,
            "manifest": self.manifest,
            "shard": self.shard,
            "state": self.state,
            "detail": self.detail,
            "running_pid": self.running_pid,
            "finished": self.finished,
            "resumable": self.resumable,
            "tasks_total": self.tasks_total,
            "done": self.done,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "remaining": self.remaining,
            "images_done": self.images_done,
            "images_total": self.images_total,
            "spent_usd": str(self.spent_usd),
            "estimate_usd": None
            if self.estimate_usd is None
            else str(self.estimate_usd),
            "started_at": self.started_at,
            "last_activity": None
            if self.last_activity is None
            else self.last_activity.isoformat(),
            "pending_task_uuids": list(self.pending_task_uuids),
            "resume_command": self.resume_command,
        }


def resume_command(run_dir: Path, manifest: str | None, shard: str | None) -> str:
    """The exact shell command that resumes this run dir."""
    parts = ["remix", "run", manifest or "MANIFEST", "--run-dir", str(run_dir)]
    if shard:
        parts += ["--shard", shard]
    return shlex.join(parts)


def run_status(run_dir: Path) -> RunStatus:
    """Fold ``run_dir`` into a :class:`RunStatus` (read-only; safe during a run).

    Raises:
        ConfigError: ``run_dir`` is not a run directory.
    """
    run = load_run(run_dir)
    state = run.state
    done = len(state.done_keys)
    failed = sum(1 for k in state.failed if not state.is_complete(k))
    in_flight = len(state.pending)
    total = None if run.last_started is None else run.last_started.tasks
    remaining = None if total is None else max(0, total - done - failed - in_flight)
    pid = _lock_holder(run_dir / LOCK_NAME) or _lock_holder(run_dir / JOURNAL_NAME)
    left = in_flight + (remaining or 0)
    finished = False
    if pid is not None:
        name, detail = "running", f"a remix process (pid {pid}) is running it"
    elif run.last_started is None:
        name, detail = "not-started", "no run has started in this directory yet"
    elif run.last_ended is None:
        name, detail = "interrupted", "the last run ended without a run_ended event"
    elif left:
        reason = run.last_ended.reason
        name, detail = "stopped", f"stopped ({reason}) with {left:,} task(s) left"
    elif failed:
        finished = True
        name = "finished-with-failures"
        detail = f"{failed:,} task(s) failed; add --retry-failed to submit them again"
    else:
        finished = True
        name, detail = "finished", "every task is done"
    resumable = pid is None and (not finished or failed > 0)
    manifest = run.manifest
    started_at = run.info.get("started_at")
    return RunStatus(
        run_dir=str(run_dir),
        manifest=manifest,
        shard=run.shard,
        state=name,
        detail=detail,
        running_pid=pid,
        finished=finished,
        resumable=resumable,
        tasks_total=total,
        done=done,
        failed=failed,
        in_flight=in_flight,
        remaining=remaining,
        images_done=state.images_done,
        images_total=None if run.last_started is None else run.last_started.images,
        spent_usd=state.spent_usd,
        estimate_usd=run.estimate_usd,
        started_at=started_at if isinstance(started_at, str) else None,
        last_activity=run.last_event_at,
        pending_task_uuids=tuple(state.pending_uuids()),
        resume_command=resume_command(run_dir, manifest, run.shard)
        + (" --retry-failed" if name == "finished-with-failures" else ""),
    )


def _ago(then: datetime, now: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def format_status(status: RunStatus, *, now: datetime | None = None) -> str:
    """``remix status`` as aligned text lines."""
    now = now or datetime.now(UTC)
    total = "?" if status.tasks_total is None else f"{status.tasks_total:,}"
    remaining = "?" if status.remaining is None else f"{status.remaining:,}"
    images_total = "?" if status.images_total is None else f"{status.images_total:,}"
    estimate = (
        ""
        if status.estimate_usd is None
        else f" (plan estimate ${status.estimate_usd})"
    )
    lines = [
        f"run dir       {status.run_dir}",
        f"manifest      {status.manifest or '(unknown: no run.json)'}"
        + (f"  shard {status.shard}" if status.shard else ""),
        f"state         {status.state}: {status.detail}",
        f"tasks         {status.done:,} done, {status.failed:,} failed, "
        f"{status.in_flight:,} in flight, {remaining} remaining of {total}",
        f"images        {status.images_done:,} of {images_total}",
        f"cost          ${status.spent_usd} so far{estimate}",
    ]
    if status.started_at:
        lines.append(f"started       {status.started_at}")
    if status.last_activity is not None:
        last = status.last_activity.isoformat(timespec="seconds")
        lines.append(f"last activity {last} ({_ago(status.last_activity, now)})")
    if status.pending_task_uuids:
        shown = ", ".join(status.pending_task_uuids[:5])
        more = len(status.pending_task_uuids) - 5
        lines.append(
            f"in flight     {shown}" + (f" (+{more:,} more)" if more > 0 else "")
        )
    if status.resumable and status.resume_command:
        lines.append(f"resume with   {status.resume_command}")
    elif status.state == "running":
        lines.append("resume        not needed: the run is in progress")
    return "\n".join(lines)
