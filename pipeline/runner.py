"""``remix run`` as a library: load and validate the job, lock its run dir, count the
job (or its shard), journal the run's start, run the engine under the run's logging
and GC settings, then write the ledger and gallery. The CLI and tests take this one
path."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import anyio
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.config import Settings
from pipeline.dialect import load_dialect
from pipeline.engine import Engine
from pipeline.errors import ConfigError, PipelineError
from pipeline.expand import expand
from pipeline.feed import selected
from pipeline.gallery import write_gallery
from pipeline.gc_tuning import sparing_collector
from pipeline.journal import JOURNAL_NAME, JournalWriter, load_state
from pipeline.journal_events import RunStartedEvent, utc_now
from pipeline.journal_offsets import JournalOffsets
from pipeline.ledger import write_ledger
from pipeline.manifest import Manifest
from pipeline.progress import Progress
from pipeline.records import EngineOptions, RunDirCounts, RunSummary
from pipeline.run_identity import supersede, task_fingerprints
from pipeline.rundir import api_identity, open_run_dir
from pipeline.shard import Shard
from pipeline.validation.check import check_manifest
from pipeline.validation.problems import ValidationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobTotals:
    """The plan's numbers for the whole manifest."""

    tasks: int
    images: int
    estimate_usd: Decimal


@dataclass(frozen=True)
class Job:
    """A validated manifest and what its validation counted."""

    manifest: Manifest
    path: Path
    report: ValidationReport

    def totals(self, settings: Settings) -> JobTotals:
        return JobTotals(
            tasks=self.report.tasks,
            images=self.report.images,
            estimate_usd=self.report.estimated_cost_usd(settings.prices_usd),
        )


def load_job(manifest_path: Path) -> Job:
    """Read and validate a manifest: every problem at once, before anything is sent.

    Raises:
        ManifestError: the manifest is invalid.
    """
    manifest, report = check_manifest(manifest_path)
    return Job(manifest=manifest, path=manifest_path, report=report)


def default_run_dir(
    settings: Settings, manifest: Manifest, shard: Shard | None
) -> Path:
    """``<run.runs_dir>/<job name>``, with ``-shardIofN`` for a shard."""
    return settings.run.runs_dir / (
        manifest.job.name + ("" if shard is None else shard.dir_suffix)
    )


def check_budget(
    manifest: Manifest, settings: Settings, options: EngineOptions
) -> None:
    """Refuse a budget that cannot pay for one task of the run: it would send
    nothing, night after night.

    Raises:
        ConfigError: the budget is below the cheapest task's price.
    """
    budget = options.budget_usd
    if budget is None:
        return
    cheapest: Decimal | None = None
    for spec in selected(lambda: expand(manifest), options.shard):
        price = settings.price_for(spec.rendering_speed) * spec.images
        if cheapest is None or price < cheapest:
            cheapest = price
            if price <= budget:
                return
    if cheapest is not None:
        raise ConfigError(
            f"the budget ${budget} is less than one task's price (${cheapest}): "
            f"nothing would be sent; give --budget ${cheapest} or more"
        )


def settle_summary(summary: RunSummary, run_dir: Path) -> None:
    """Count the run dir's tasks after the run (the exit code follows them)."""
    state = JournalOffsets.of_file(run_dir / JOURNAL_NAME)  # the fold, light
    with state.reading():
        summary.after = RunDirCounts.of(state, summary.tasks_total)


def write_outputs(run_dir: Path) -> str | None:
    """ledger.csv and gallery.html, rebuilt from the journal; why not, when not.

    They are derived from the journal, so failing to write them (a full disk) loses
    nothing: a rerun writes them.
    """
    try:
        write_ledger(run_dir)
        write_gallery(run_dir)
    except (PipelineError, OSError) as exc:
        log.error(
            "could not write the ledger or gallery (%s); rerun to write them", exc
        )
        return str(exc)
    return None


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
        tasks_done_before=len(state.done_keys),
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
                journals_sent=True,
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
    job: Job | None = None,
    outputs: bool = True,
    progress: Progress | None = None,
    on_engine: Callable[[Engine], None] | None = None,
    rerun_changed: bool = False,
) -> RunSummary:
    """``remix run`` as a library call: validate, lock the run dir, run or resume,
    then write the ledger and gallery (unless ``outputs`` is False).

    ``job`` is the manifest already loaded by ``load_job`` (not read again);
    ``options.budget_usd`` of None falls back to the manifest's ``budget_usd``, split
    evenly across the shards of a sharded run (N shards run at once: N x the cap). A
    ledger or gallery that could not be written is ``summary.outputs_error``.
    ``rerun_changed`` lets tasks that already ran have changed parameters: they run
    again, their earlier images kept as superseded (see ``pipeline.run_identity``).

    Raises:
        ManifestError: the manifest is invalid (nothing was sent).
        ConfigError: the run dir holds another API's run, changed tasks (without
            ``rerun_changed``) or another run, or the budget is below one task's
            price (nothing was sent).
    """
    job = job or load_job(manifest_path)
    budget = job.manifest.job.budget_usd
    if options.budget_usd is None and budget is not None:  # a shard: budget / N
        share = budget if options.shard is None else options.shard.budget_share(budget)
        options = dataclasses.replace(options, budget_usd=share)
    check_budget(job.manifest, settings, options)
    key = settings.api_key
    with open_run_dir(
        run_dir,
        manifest_path=manifest_path,
        settings_public=settings.public_dict(),
        shard=None if options.shard is None else options.shard.label,
        api=api_identity(
            settings.api.base_url, None if key is None else key.get_secret_value()
        ),
        task_prints=task_fingerprints(
            selected(lambda: expand(job.manifest), options.shard), manifest_path.parent
        ),
        rerun_changed=rerun_changed,
    ) as opened:
        if opened.resuming:
            log.warning("resuming the run in %s", run_dir)
        if opened.rerun:
            await supersede(run_dir, opened.rerun)
            opened.commit()
        summary = await run_job(
            manifest=job.manifest,
            manifest_path=manifest_path,
            totals=job.totals(settings),
            run_dir=run_dir,
            settings=settings,
            options=options,
            progress=progress,
            on_engine=on_engine,
        )
        settle_summary(summary, run_dir)
        if outputs:
            summary.outputs_error = write_outputs(run_dir)
    return summary
