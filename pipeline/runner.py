"""Run setup around the engine: count the job (or its shard), journal the run's
start, open the journal, and run the engine under the run's logging and GC settings."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import anyio
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.config import Settings
from pipeline.dialect import load_dialect
from pipeline.engine import Engine
from pipeline.expand import check_manifest, expand
from pipeline.gc_tuning import sparing_collector
from pipeline.journal import (
    JOURNAL_NAME,
    JournalWriter,
    RunStartedEvent,
    load_state,
    utc_now,
)
from pipeline.manifest import Manifest
from pipeline.progress import Progress
from pipeline.records import EngineOptions, RunSummary
from pipeline.rundir import open_run_dir


@dataclass(frozen=True)
class JobTotals:
    """The plan's numbers for the whole manifest."""

    tasks: int
    images: int
    estimate_usd: Decimal


async def run_job(
    *,
    manifest: Manifest,
    manifest_path: Path,
    totals: JobTotals,
    run_dir: Path,
    settings: Settings,
    options: EngineOptions,
    progress: Progress | None = None,
    on_engine: Callable[[Engine], None] | None = None,
) -> RunSummary:
    """Run (or resume) a validated job into an opened, locked run dir.

    Args:
        on_engine: called with the engine before it starts (tests use it to stop it).
    """
    journal_path = run_dir / JOURNAL_NAME
    state = load_state(journal_path)
    tasks, images = totals.tasks, totals.images
    if options.shard is not None:
        tasks = images = 0
        for spec in expand(manifest):  # counted, never held: a shard may be 100k
            if options.shard.contains(spec.key):
                tasks += 1
                images += spec.images
    summary = RunSummary(
        tasks_total=tasks,
        images_total=images,
        images_done=state.images_done,
        spent_usd=state.spent_usd,
        tasks_skipped_failed=0
        if options.retry_failed
        else len([k for k in state.failed if not state.is_complete(k)]),
    )
    manifest_sha = hashlib.sha256(await anyio.Path(manifest_path).read_bytes())
    async with JournalWriter.open(journal_path) as journal:
        await journal.append(
            RunStartedEvent(
                ts=utc_now(),
                run_id=run_dir.name,
                manifest_sha256=manifest_sha.hexdigest(),
                tasks=tasks,
                images=images,
                estimate_usd=totals.estimate_usd,
                shard=None if options.shard is None else options.shard.label,
            )
        )
        engine = Engine(
            specs=lambda: expand(manifest),
            run_dir=run_dir,
            settings=settings,
            options=options,
            state=state,
            journal=journal,
            summary=summary,
            progress=progress,
            dialect=load_dialect(run_dir, settings.api.base_url),
        )
        if on_engine is not None:
            on_engine(engine)
        with logging_redirect_tqdm(), sparing_collector():
            return await engine.run()


async def run_manifest(
    manifest_path: Path,
    run_dir: Path,
    settings: Settings,
    options: EngineOptions,
    *,
    progress: Progress | None = None,
    on_engine: Callable[[Engine], None] | None = None,
) -> RunSummary:
    """``remix run`` as a library call: validate, lock the run dir, run or resume.

    ``options.budget_usd`` of None falls back to the manifest's ``budget_usd``.

    Raises:
        ManifestError: the manifest is invalid (nothing was sent).
        ConfigError: the run dir holds another manifest or another run.
    """
    manifest, report = check_manifest(manifest_path)
    totals = JobTotals(
        tasks=report.tasks,
        images=report.images,
        estimate_usd=report.estimated_cost_usd(settings.prices_usd),
    )
    if options.budget_usd is None and manifest.job.budget_usd is not None:
        options = dataclasses.replace(options, budget_usd=manifest.job.budget_usd)
    with open_run_dir(
        run_dir,
        manifest_path=manifest_path,
        settings_public=settings.public_dict(),
        shard=None if options.shard is None else options.shard.label,
    ):
        return await run_job(
            manifest=manifest,
            manifest_path=manifest_path,
            totals=totals,
            run_dir=run_dir,
            settings=settings,
            options=options,
            progress=progress,
            on_engine=on_engine,
        )
