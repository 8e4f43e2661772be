"""remix: batch image-to-image runs on Runware's Ideogram Remix API.

The library API (the README's "As a library"): ``load_settings``, ``load_job`` and
``run_manifest`` do what ``remix run`` does; ``run_status`` (``job_status`` for a
job's shards), ``write_ledger`` and ``write_gallery`` read a run dir back. Names load
on first use, so ``import pipeline`` (and every ``python -m pipeline...``) costs
nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Settings, load_settings
    from pipeline.errors import ConfigError, ManifestError, PipelineError
    from pipeline.exit_codes import ExitCode
    from pipeline.gallery import write_gallery
    from pipeline.ledger import write_ledger
    from pipeline.records import EngineOptions, RunDirCounts, RunSummary
    from pipeline.runner import Job, default_run_dir, load_job, run_manifest
    from pipeline.shard import Shard
    from pipeline.status import JobStatus, RunStatus, job_status, run_status

_HOMES: dict[str, str] = {
    "Settings": "pipeline.config",
    "load_settings": "pipeline.config",
    "ConfigError": "pipeline.errors",
    "ManifestError": "pipeline.errors",
    "PipelineError": "pipeline.errors",
    "ExitCode": "pipeline.exit_codes",
    "write_gallery": "pipeline.gallery",
    "write_ledger": "pipeline.ledger",
    "EngineOptions": "pipeline.records",
    "RunDirCounts": "pipeline.records",
    "RunSummary": "pipeline.records",
    "Job": "pipeline.runner",
    "default_run_dir": "pipeline.runner",
    "load_job": "pipeline.runner",
    "run_manifest": "pipeline.runner",
    "Shard": "pipeline.shard",
    "JobStatus": "pipeline.status",
    "RunStatus": "pipeline.status",
    "job_status": "pipeline.status",
    "run_status": "pipeline.status",
}

__all__ = [
    "ConfigError",
    "EngineOptions",
    "ExitCode",
    "Job",
    "JobStatus",
    "ManifestError",
    "PipelineError",
    "RunDirCounts",
    "RunStatus",
    "RunSummary",
    "Settings",
    "Shard",
    "default_run_dir",
    "job_status",
    "load_job",
    "load_settings",
    "run_manifest",
    "run_status",
    "write_gallery",
    "write_ledger",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
