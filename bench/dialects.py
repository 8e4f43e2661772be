"""What each API dialect costs remix: requests per image on the 48-task job.

Runs the conformance job (4 references x 12 variants, every third variant asking two
images: 48 tasks, 64 images) once per dialect of runware-protocol.md §10
(``pipeline.sandbox.presets``), alone and under the fault mix, against an in-process
sandbox at a steady latency, with remix's shipped poll settings. Prints a table, then
one JSON object on its last line.

    python bench/dialects.py [--latency 1.0] [--concurrency 12] [--grace 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, emit_json, scratch_dir

from pipeline.config import load_settings
from pipeline.records import EngineOptions
from pipeline.runner import run_manifest
from pipeline.sandbox import STATE, SandboxConfig, create_app, serving
from pipeline.sandbox.presets import DIALECTS, FAULT_MIX


def _write_job(root: Path) -> Path:
    from PIL import Image

    lines = [
        "[job]",
        'name = "dialects"',
        "",
        "[defaults]",
        "width = 1024",
        "height = 1024",
        'outputFormat = "PNG"',
    ]
    for i in range(4):
        path = root / "refs" / f"r{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (40 + 50 * i, 90, 160)).save(path)
        lines += ["", "[[references]]", f'id = "r{i}"', f'image = "refs/r{i}.png"']
    for v in range(12):
        lines += ["", "[[variants]]", f'id = "v{v}"', f'positivePrompt = "style {v}"']
        if v % 3 == 0:
            lines.append("numberResults = 2")
    job = root / "job.toml"
    job.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return job


async def _one(
    root: Path, dialect: str, faults: bool, args: argparse.Namespace
) -> dict[str, Any]:
    config = SandboxConfig(
        seed=7,
        latency_s=args.latency,
        render_scale=0.05,
        retry_after_s=0.2,
        **DIALECTS[dialect],
        **(FAULT_MIX if faults else {}),
    )
    work = root / f"{dialect}-{'faults' if faults else 'alone'}"
    work.mkdir()
    job = _write_job(work)
    (work / "config.toml").write_text("", encoding="utf-8")
    app = create_app(config)
    async with serving(app) as url:
        settings = load_settings(
            work / "config.toml",
            env={"RUNWARE_API_KEY": "sandbox", "REMIX_BASE_URL": url},
            overrides={"poll": {"not_found_grace_s": args.grace}},
        )
        started = time.monotonic()
        summary = await run_manifest(
            job,
            work / "run",
            settings,
            EngineOptions(concurrency=args.concurrency),
        )
        wall = time.monotonic() - started
    state = app[STATE]
    images = max(1, summary.images_new)
    return {
        "dialect": dialect,
        "faults": faults,
        "exit": summary.exit_code,
        "done": summary.tasks_done,
        "failed": summary.tasks_failed,
        "images": summary.images_new,
        "wall_s": round(wall, 2),
        "submits": summary.submit_requests,
        "resent": summary.resent,
        "polls": summary.poll_requests,
        "uploads": summary.uploads,
        "requests_per_image": round(summary.api_requests / images, 3),
        "http_requests_seen": state.http_requests,
        "reuse_refusals": state.duplicate_task_uuids,
        "billed_twice": state.content_billed_twice,
        "billed_usd": str(state.billed_total_usd),
    }


async def _measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with scratch_dir("remix-dialects-") as root:
        for dialect in DIALECTS:
            for faults in (False, True):
                rows.append(await _one(root, dialect, faults, args))
                row = rows[-1]
                emit(
                    f"{row['dialect']:<30} {'faults' if faults else 'alone':<6} "
                    f"exit {row['exit']}  {row['done']:>2} done {row['failed']:>2} "
                    f"failed  {row['requests_per_image']:>6.3f} req/image  "
                    f"(submits {row['submits']}, resent {row['resent']}, polls "
                    f"{row['polls']})  {row['wall_s']:>5.1f} s  billed twice "
                    f"{row['billed_twice']}"
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per task")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument(
        "--grace", type=float, default=5.0, help="poll.not_found_grace_s (shipped: 5)"
    )
    args = parser.parse_args(argv)
    rows = anyio.run(_measure, args)
    emit_json({"dialects": rows, "latency_s": args.latency, "grace_s": args.grace})


if __name__ == "__main__":
    main()
