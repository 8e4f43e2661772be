"""What a run (or a doctor check) ended as, as the number cron and CI read: the
exit codes of every ``remix`` command, in one place (the README's table).

A run's code follows its run dir after the run (``RunSummary.exit_code``), not what
that one invocation did: a rerun with nothing to do exits as the dir stands."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """Every task of the run dir (the job, or the shard) is done."""
    FAILED = 1
    """Some tasks failed for good and none is left (``--retry-failed`` sends them
    again)."""
    INVALID = 2
    """Bad input (manifest, config, arguments, a budget below one task): nothing
    was sent."""
    STOPPED = 3
    """Tasks are left: stopped early (interrupt, budget, credit, API down); rerun to
    resume."""
