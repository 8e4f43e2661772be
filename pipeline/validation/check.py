"""The entry points: `check_manifest` (a file) and `validate_manifest` (a model).

Each check runs once, in this order: reading and types (`pipeline.manifest`), shape
(`structure`), reference images, task keys, then every parameter set and prompt
(`tasks`), local files opened once each (`files`). No mistake is seen by two checks,
so the problems need no de-duplication.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, read_manifest
from pipeline.plan import Plan, count_tasks
from pipeline.validation.files import ImageFiles
from pipeline.validation.problems import (
    PROBLEM_LIMIT,
    Problem,
    ProblemSink,
    ValidationReport,
)
from pipeline.validation.structure import structure_problems, unusable_axes
from pipeline.validation.tasks import TaskChecks, key_part_problems, reference_problems


def check_manifest(
    path: Path, *, limit: int = PROBLEM_LIMIT
) -> tuple[Manifest, ValidationReport]:
    """Load and validate a manifest, before anything is spent.

    Raises:
        ManifestError: every problem found (reading, shape and per-task together).
    """
    draft = read_manifest(path)
    early = [*draft.problems, *structure_problems(draft.outline)]
    if draft.manifest is None:
        raise ManifestError([p.render(str(path)) for p in early])
    report = _validate(draft.manifest, path, early, limit)
    report.raise_for_problems()
    return draft.manifest, report


def validate_manifest(
    manifest: Manifest, path: Path, *, limit: int = PROBLEM_LIMIT
) -> ValidationReport:
    """Check every task of a built manifest (its shape too) before anything is paid
    for; `path` names the manifest in the problem lines."""
    return _validate(manifest, path, structure_problems(manifest.outline()), limit)


def _validate(
    manifest: Manifest, path: Path, early: Sequence[Problem], limit: int
) -> ValidationReport:
    sink = ProblemSink(str(path), limit)
    for problem in early:
        sink.add(problem)
    files = ImageFiles()
    reference_problems(manifest, files, sink)
    plan = Plan(manifest, inert_axes=unusable_axes(manifest.matrix))
    key_part_problems(plan, sink)
    tasks = TaskChecks(plan, files, sink)
    tasks.run()
    return ValidationReport(
        tasks=count_tasks(manifest),
        images=tasks.images,
        images_by_speed=tasks.images_by_speed,
        local_files=len(files),
        problems=sink.listing(),
        problem_count=sink.count,
    )
