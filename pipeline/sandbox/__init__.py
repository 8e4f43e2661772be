"""A Runware-compatible local API server with latency, limits, fault injection and
switches for the dialects of its undocumented answers (see ``SandboxConfig``)."""

from __future__ import annotations

from pipeline.sandbox.app import STATE, create_app
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.faults import Fault
from pipeline.sandbox.runner import (
    running_sandbox,
    serve,
    serve_until_signalled,
    serving,
)
from pipeline.sandbox.state import BilledImage, SandboxState, SandboxTask
from pipeline.sandbox.tasks import Sandbox

__all__ = [
    "STATE",
    "BilledImage",
    "Fault",
    "Sandbox",
    "SandboxConfig",
    "SandboxState",
    "SandboxTask",
    "create_app",
    "running_sandbox",
    "serve",
    "serve_until_signalled",
    "serving",
]
