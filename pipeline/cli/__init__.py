"""The ``remix`` command: parsing, the commands, what they print, and exit codes."""

from pipeline.cli.app import build_parser, main, sandbox_config
from pipeline.cli.exit import ExitCode

__all__ = ["ExitCode", "build_parser", "main", "sandbox_config"]
