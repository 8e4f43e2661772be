"""Run the remix command line as ``python -m pipeline``."""

from __future__ import annotations

from pipeline.cli import run_command

run_command()
