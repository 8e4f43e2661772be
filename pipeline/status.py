"""Where a run dir stands (``remix status``): counts, cost, state, how to resume;
and where one job stands across the run dirs of its shards.

Read-only on purpose, so it is safe while a run is writing to the directory. In
flight means sent and unfinished; tasks journaled ahead of sending (``submitted``
with no ``sent`` line yet) are queued, not in flight.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.journal import JOURNAL_NAME
from pipeline.rundata import RunData, load_run
from pipeline.rundir import LOCK_NAME
from pipeline.shard import Shard, missing_shards


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
    """Tasks sent to the API and not finished."""
    queued: int
    """Tasks journaled ahead of sending, not sent yet (nothing charged for them)."""
    remaining: int | None
    images_done: int
    images_total: int | None
    spent_usd: Decimal
    estimate_usd: Decimal | None
    started_at: str | None
    last_activity: datetime | None
    pending_task_uuids: tuple[str, ...]
    """Every unfinished task UUID, sent or queued: what a resume asks about."""
    queued_task_uuids: tuple[str, ...]
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
            **_counts_json(self),
            "started_at": self.started_at,
            "last_activity": None
            if self.last_activity is None
            else self.last_activity.isoformat(),
            "pending_task_uuids": list(self.pending_task_uuids),
            "queued_task_uuids": list(self.queued_task_uuids),
            "resume_command": self.resume_command,
        }


def _counts_json(status: RunStatus | JobStatus) -> dict[str, object]:
    """The counts a run dir and a job of shards both report, JSON-ready."""
    return {
        "tasks_total": status.tasks_total,
        "done": status.done,
        "failed": status.failed,
        "in_flight": status.in_flight,
        "queued": status.queued,
        "remaining": status.remaining,
        "images_done": status.images_done,
        "images_total": status.images_total,
        "spent_usd": str(status.spent_usd),
        "estimate_usd": None
        if status.estimate_usd is None
        else str(status.estimate_usd),
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
    return _status_of(load_run(run_dir))


def _status_of(run: RunData) -> RunStatus:
    run_dir = run.run_dir
    state = run.state
    done = len(state.done_keys)
    failed = sum(1 for k in state.failed if not state.is_complete(k))
    in_flight = queued = 0
    for subs in state.pending.values():
        if any(state.task_of(s) not in state.queued for s in subs):
            in_flight += 1
        else:
            queued += 1
    total = None if run.last_started is None else run.last_started.tasks
    remaining = (
        None if total is None else max(0, total - done - failed - in_flight - queued)
    )
    pid = _lock_holder(run_dir / LOCK_NAME) or _lock_holder(run_dir / JOURNAL_NAME)
    left = in_flight + queued + (remaining or 0)
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
    _, queued_uuids = state.sent_and_queued()
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
        queued=queued,
        remaining=remaining,
        images_done=state.images_done,
        images_total=None if run.last_started is None else run.last_started.images,
        spent_usd=state.spent_usd,
        estimate_usd=run.estimate_usd,
        started_at=started_at if isinstance(started_at, str) else None,
        last_activity=run.last_event_at,
        pending_task_uuids=tuple(state.pending_uuids()),
        queued_task_uuids=tuple(queued_uuids),
        resume_command=resume_command(run_dir, manifest, run.shard)
        + (" --retry-failed" if name == "finished-with-failures" else ""),
    )


@dataclass(frozen=True, slots=True)
class JobStatus:
    """The run dirs of one job's shards as one job: their counts added up."""

    runs: tuple[RunStatus, ...]
    missing_shards: tuple[str, ...]
    """Shards of the job (``I/N``) none of the given run dirs holds."""
    state: str
    """running, finished, finished-with-failures, incomplete (shards missing or
    unfinished)."""
    detail: str
    tasks_total: int | None
    """The given shards' tasks (None while one has not started)."""
    done: int
    failed: int
    in_flight: int
    queued: int
    remaining: int | None
    images_done: int
    images_total: int | None
    spent_usd: Decimal
    estimate_usd: Decimal | None
    """The whole job's plan estimate (every shard journals the job's)."""

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: the job's totals, and each run dir's status."""
        return {
            "state": self.state,
            "detail": self.detail,
            "missing_shards": list(self.missing_shards),
            **_counts_json(self),
            "runs": [run.to_json() for run in self.runs],
        }


def _manifest_sha(run: RunData) -> str | None:
    sha = run.info.get("manifest_sha256")
    if isinstance(sha, str):
        return sha
    return None if run.last_started is None else run.last_started.manifest_sha256


def load_shards(run_dirs: list[Path]) -> list[RunData]:
    """Read run dirs that must hold distinct shards of one job (one manifest).

    Raises:
        ConfigError: one is not a run dir, or they are not shards of one job.
    """
    runs = [load_run(d) for d in run_dirs]
    shas = {sha for run in runs if (sha := _manifest_sha(run)) is not None}
    if len(shas) > 1:
        raise ConfigError(
            "these run dirs hold runs of different manifests: pass the run dirs "
            "of one job's shards (`remix report` compares several jobs)"
        )
    try:
        missing_shards([Shard.read(run.shard) for run in runs])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return runs


def _sum_known(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def job_status(run_dirs: list[Path]) -> JobStatus:
    """The shards in ``run_dirs`` as one job (read-only; safe during their runs).

    Raises:
        ConfigError: one is not a run dir, or they are not shards of one job.
    """
    runs = load_shards(run_dirs)
    statuses = tuple(_status_of(run) for run in runs)
    missing = tuple(
        s.label for s in missing_shards([Shard.read(run.shard) for run in runs])
    )
    running = [s for s in statuses if s.state == "running"]
    unfinished = [s for s in statuses if not s.finished]
    failed = sum(s.failed for s in statuses)
    if running:
        pids = ", ".join(str(s.running_pid) for s in running)
        name = "running"
        detail = f"{len(running)} of {len(statuses)} shard(s) running (pid {pids})"
    elif missing or unfinished:
        name = "incomplete"
        bits = []
        if unfinished:
            bits.append(f"{len(unfinished)} shard(s) unfinished")
        if missing:
            bits.append(f"shard(s) {', '.join(missing)} not given (or not started)")
        detail = "; ".join(bits)
    elif failed:
        name = "finished-with-failures"
        detail = f"{failed:,} task(s) failed; add --retry-failed to submit them again"
    else:
        name, detail = "finished", f"every task of {len(statuses)} shard(s) is done"
    estimates = [s.estimate_usd for s in statuses if s.estimate_usd is not None]
    return JobStatus(
        runs=statuses,
        missing_shards=missing,
        state=name,
        detail=detail,
        tasks_total=_sum_known([s.tasks_total for s in statuses]),
        done=sum(s.done for s in statuses),
        failed=failed,
        in_flight=sum(s.in_flight for s in statuses),
        queued=sum(s.queued for s in statuses),
        remaining=_sum_known([s.remaining for s in statuses]),
        images_done=sum(s.images_done for s in statuses),
        images_total=_sum_known([s.images_total for s in statuses]),
        spent_usd=sum((s.spent_usd for s in statuses), Decimal(0)),
        estimate_usd=max(estimates) if estimates else None,
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


def _counts(
    status: RunStatus | JobStatus,
) -> str:
    total = "?" if status.tasks_total is None else f"{status.tasks_total:,}"
    remaining = "?" if status.remaining is None else f"{status.remaining:,}"
    return (
        f"{status.done:,} done, {status.failed:,} failed, "
        f"{status.in_flight:,} in flight, {status.queued:,} queued, "
        f"{remaining} remaining of {total}"
    )


def format_status(status: RunStatus, *, now: datetime | None = None) -> str:
    """``remix status`` as aligned text lines."""
    now = now or datetime.now(UTC)
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
    ]
    if status.running_pid is not None:
        lines.append(
            f"pid           {status.running_pid} (kill -INT {status.running_pid}: "
            "no new submits, in-flight tasks collected, resumable)"
        )
    lines += [
        f"tasks         {_counts(status)}",
        f"images        {status.images_done:,} of {images_total}",
        f"cost          ${status.spent_usd} so far{estimate}",
    ]
    if status.started_at:
        lines.append(f"started       {status.started_at}")
    if status.last_activity is not None:
        last = status.last_activity.isoformat(timespec="seconds")
        lines.append(f"last activity {last} ({_ago(status.last_activity, now)})")
    queued = set(status.queued_task_uuids)
    sent = [u for u in status.pending_task_uuids if u not in queued]
    if sent:
        shown = ", ".join(sent[:5])
        more = len(sent) - 5
        lines.append(
            f"in flight     {shown}" + (f" (+{more:,} more)" if more > 0 else "")
        )
    if status.queued:
        lines.append(
            f"queued        {status.queued:,} journaled ahead, not sent yet "
            "(nothing charged for them)"
        )
    if status.resumable and status.resume_command:
        lines.append(f"resume with   {status.resume_command}")
    elif status.state == "running":
        lines.append("resume        not needed: the run is in progress")
    return "\n".join(lines)


def format_job_status(job: JobStatus) -> str:
    """``remix status`` over one job's shards: the job's totals, then a line per
    shard, then how to resume the ones that stopped."""
    images_total = "?" if job.images_total is None else f"{job.images_total:,}"
    estimate = (
        "" if job.estimate_usd is None else f" (plan estimate ${job.estimate_usd})"
    )
    manifests = {r.manifest for r in job.runs if r.manifest}
    count = next((Shard.read(r.shard) for r in job.runs if r.shard), None)
    given = f"{len(job.runs)} of {count.count} shards" if count else "run dirs"
    lines = [
        f"job           {', '.join(sorted(manifests)) or '(unknown manifest)'} "
        f"({given})",
        f"state         {job.state}: {job.detail}",
        f"tasks         {_counts(job)}",
        f"images        {job.images_done:,} of {images_total}",
        f"cost          ${job.spent_usd} so far{estimate}",
    ]
    for run in sorted(job.runs, key=lambda r: _shard_order(r.shard)):
        pid = "" if run.running_pid is None else f" (pid {run.running_pid})"
        lines.append(
            f"shard {run.shard or '-':<7} {run.state}{pid}: {_counts(run)}  "
            f"{run.run_dir}"
        )
    lines += [
        f"resume with   {run.resume_command}"
        for run in job.runs
        if run.resumable and run.resume_command
    ]
    return "\n".join(lines)


def _shard_order(label: str | None) -> int:
    shard = Shard.read(label)
    return -1 if shard is None else shard.index
