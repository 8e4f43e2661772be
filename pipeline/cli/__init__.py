"""The ``remix`` command: grammar (parser), commands (run, doctor, show), and main."""

from pipeline.cli.app import main, run_command
from pipeline.cli.parser import build_parser, sandbox_config
from pipeline.exit_codes import ExitCode

__all__ = ["ExitCode", "build_parser", "main", "run_command", "sandbox_config"]
