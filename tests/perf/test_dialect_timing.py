"""No dialect of the real API costs a run a wait of its own (marker ``perf``).

The conformance matrix (``tests/test_dialects.py``) proves every dialect's first
run finishes and pays once; this times the quiet ones: a 48-task job at a 50 ms API
takes a few seconds, so 20 s means a dialect made the run wait for something.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sandbox.presets import DIALECTS
from tests.conftest import SandboxFactory
from tests.test_dialects import DIALECTS_DONE, QUIET, first_run

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("dialect", DIALECTS_DONE)
async def test_no_dialect_costs_a_wait_of_its_own(
    tmp_path: Path, make_sandbox: SandboxFactory, dialect: str
) -> None:
    run = await first_run(tmp_path, make_sandbox, {**QUIET, **DIALECTS[dialect]})
    assert run.summary.exit_code == 0, run.summary.stop_message
    assert run.summary.wall_s < 20, "a dialect cost a wait of its own"
