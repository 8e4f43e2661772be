"""Named sandbox setups the conformance tests and ``bench/dialects.py`` share: one
per dialect of runware-protocol.md §10, and the fault mix they are also run under."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

DIALECTS: Final[Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "shipped": {},
        "poll-type-getResponse": {"poll_task_type": "getResponse"},
        "unknown-taskNotFound": {"unknown_task": "taskNotFound"},
        "unknown-taskExpired": {"unknown_task": "taskExpired"},
        "unknown-silent": {"unknown_task": "silent"},
        "unknown-processing": {"unknown_task": "processing"},
        "batch-first-only": {"poll_batch": "first"},
        "batch-refused": {"poll_batch": "reject"},
        "batch-empty": {"poll_batch": "empty"},
        "reuse-duplicate": {"reuse_code": "duplicateTaskUUID"},
        "ack-empty": {"ack": "empty"},
        "ack-empty-unknown-processing": {"ack": "empty", "unknown_task": "processing"},
        "failed-as-data": {"failed_as": "data", "task_fail_rate": 0.15},
    }
)
"""SandboxConfig fields per dialect (each alone; the shipped defaults otherwise)."""

FAULT_MIX: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "server_error_rate": 0.10,
        "rate_limit_rate": 0.05,
        "drop_after_accept_rate": 0.02,
        "malformed_rate": 0.01,
        "download_failure_rate": 0.02,
    }
)
"""10% 5xx, 5% 429, 2% dropped after accepting, 1% malformed, 2% failed downloads."""
