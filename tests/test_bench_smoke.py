"""The benchmarks still run with one command each and end with their JSON line.

Not a measurement (timing goals live in ``bench/``, read as ratios in one run): tiny
sizes, so that a change to the engine, the sandbox or the SDK that breaks a benchmark
shows up in CI rather than on the night someone wants its numbers. What is asserted
is what every figure rests on: all tasks done by each client, nothing paid twice,
requests counted on both sides alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, tmp_path: Path) -> dict[str, Any]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    figures: dict[str, Any] = json.loads(lines[-1])
    # the readable lines come first; the JSON object is the last line alone
    assert len(lines) > 1
    assert not list(tmp_path.iterdir()), "the work dir was left behind"
    return figures


def test_throughput_runs_all_three_clients_to_the_end(tmp_path: Path) -> None:
    tasks = 48
    figures = _run(
        "throughput.py",
        *("--tasks", str(tasks), "--concurrency", "24", "--latency", "0.3"),
        tmp_path=tmp_path,
    )
    assert figures["images"] == tasks
    assert figures["failed_tasks"] == 0
    assert figures["downloads"] == tasks
    assert figures["duplicate_task_uuids"] == 0
    assert figures["content_billed_twice"] == 0
    assert figures["max_in_flight"] <= 24
    # remix's own count of its requests is the sandbox's
    assert figures["requests_per_image"] == figures["server_requests_per_image"]
    assert figures["sdk_images"] == tasks
    assert figures["sdk_failed_tasks"] == 0
    # the SDK asks once to submit and at least once per task about it
    assert figures["sdk_requests_per_image"] >= 2.0
    assert figures["ideal_answered"] == tasks
    for key in ("efficiency", "ideal_efficiency", "sdk_efficiency"):
        assert 0 < figures[key] <= figures["efficiency_bound"] + 0.05, key
    for key in ("sdk_wall_ratio", "sdk_requests_ratio", "sdk_cpu_ratio"):
        assert figures[key] > 0, key
    assert isinstance(figures["targets_met"], bool)


def test_scale_plans_runs_and_loads_a_journal(tmp_path: Path) -> None:
    sizes = (120, 240)
    figures = _run(
        "scale.py",
        *("--sizes", *map(str, sizes)),
        *("--journal-events", "500", "--concurrency", "120", "--latency", "0.3"),
        tmp_path=tmp_path,
    )
    for size in sizes:
        assert figures[f"run_tasks_{size}"] == size
        assert figures[f"plan_peak_rss_mb_{size}"] > 0
        assert figures[f"run_peak_rss_mb_{size}"] > 0
    assert figures["journal_events"] >= 500
    assert figures["journal_load_s"] >= 0
    assert figures["peak_rss_mb"] == max(
        figures[f"run_peak_rss_mb_{size}"] for size in sizes
    )
