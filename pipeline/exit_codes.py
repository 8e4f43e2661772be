"""What a run (or a doctor check) ended as, as the number cron and CI read: the
exit codes of every ``remix`` command, in one place (the README's table)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """Everything asked for is done."""
    FAILED = 1
    """Some tasks failed for good (``--retry-failed`` sends them again)."""
    INVALID = 2
    """Bad input (manifest, config, arguments): nothing was sent."""
    STOPPED = 3
    """Stopped early (interrupt, budget, credit, API down): rerun to resume."""
