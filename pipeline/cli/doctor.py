"""``remix doctor``: examine the account and API, print the findings as a table or
JSON, and exit as ``run`` would against that account."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
from typing import Final

import anyio

from pipeline.cli.sandboxed import with_sandbox
from pipeline.config import load_settings, loop_options
from pipeline.doctor import Findings, examine
from pipeline.errors import ConfigError
from pipeline.exit_codes import ExitCode

FOUND_WIDTH: Final = 44
ACTION_WIDTH: Final = 56


def cmd_doctor(args: argparse.Namespace) -> ExitCode:
    if args.out is not None and not args.spend_one:
        raise ConfigError("--out needs --spend-one (it names that task's image)")
    settings = load_settings(args.config)

    def announce(line: str) -> None:
        print(f"remix: {line}", file=sys.stderr, flush=True)

    async def check() -> Findings:
        async with contextlib.AsyncExitStack() as stack:
            nonlocal settings
            if args.sandbox:
                settings = await with_sandbox(stack, settings)
            return await examine(
                settings,
                spend_one=args.spend_one,
                announce=announce,
                out=args.out,
                # The in-process sandbox's port changes every time: nothing to keep.
                save=not args.sandbox,
            )

    findings = anyio.run(
        check,
        backend="asyncio",
        backend_options=loop_options(settings.run.event_loop),
    )
    if args.sandbox and findings.usable:
        findings.cache_note = (
            "not written: the in-process sandbox's port is new each run"
        )
    if args.format == "json":
        print(json.dumps(findings.as_json(), indent=2))
    else:
        print(render_table(findings))
    if findings.problem is not None:
        print(f"remix: {findings.problem}", file=sys.stderr)
    return findings.exit_code


def render_table(findings: Findings) -> str:
    """The findings as a text table, one row per check, then the cache line."""
    rows = [
        ("check", "found", "remix will"),
        *((c.name, c.found, c.action) for c in findings.checks),
    ]
    first = max(len(row[0]) for row in rows)
    widths = (first, FOUND_WIDTH, ACTION_WIDTH)
    lines = [f"remix doctor: {findings.base_url}", ""]
    for i, row in enumerate(rows):
        cells = [
            textwrap.wrap(text, width) or [""]
            for text, width in zip(row, widths, strict=True)
        ]
        for n in range(max(len(cell) for cell in cells)):
            parts = [cell[n] if n < len(cell) else "" for cell in cells]
            lines.append(
                f"{parts[0]:<{widths[0]}}  {parts[1]:<{widths[1]}}  {parts[2]}".rstrip()
            )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    if findings.cache is not None:
        lines.append(f"findings written to {findings.cache}")
    else:
        lines.append(f"findings {findings.cache_note}")
    if not findings.usable:
        lines.append("NOT usable")
    elif findings.exit_code == ExitCode.OK:
        lines.append("usable")
    elif findings.spend is not None and findings.spend.credit_refused:
        lines.append("the key works, but the account cannot pay: top it up")
    else:
        lines.append("usable, but the real task did not finish")
    return "\n".join(lines)
