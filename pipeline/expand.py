"""Lazy expansion of a manifest into `TaskSpec`s with stable keys.

Tasks are references x variants x the cartesian product of the matrix axes, in manifest
order, produced by a generator: a 100k-task job is never held as a list. Expansion is
pure: it reads no file (local images are checked by `pipeline.validation`, and read
only when uploaded).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from pipeline.errors import ManifestError
from pipeline.manifest import Manifest
from pipeline.plan import Plan, substitute_images, unknown_vars
from pipeline.validation.tasks import wire_problems
from pipeline.wire import ImageInferenceRequest

__all__ = ["TaskSpec", "expand"]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task: its stable key and wire parameters (local images not yet uploaded)."""

    key: str
    """``<reference>/<variant>`` plus ``/axis=value,...`` when the matrix has axes."""
    reference_id: str
    variant_id: str
    axes: tuple[tuple[str, str], ...]
    """(axis name, value as text) in manifest order."""
    params: Mapping[str, Any] = field(hash=False)
    """The task's wire JSON without taskType/taskUUID/deliveryMethod/includeCost.

    Local images appear as absolute path strings (see `local_files`). Read-only:
    nested tables are shared between the tasks of one variant and axis combination.
    """
    local_files: tuple[Path, ...]
    """Local images this task needs uploaded: the reference and local style images."""
    images: int
    """numberResults (1 when unset)."""
    rendering_speed: str | None

    def request(
        self, task_uuid: UUID, uploaded: Mapping[Path, str]
    ) -> ImageInferenceRequest:
        """The wire request, with local files replaced by their uploaded image UUIDs.

        Raises:
            KeyError: a local file of this task is missing from `uploaded`.
            ManifestError: the parameters fail the wire model (validation would have
                said so before the run).
        """
        swap: dict[str, str] = {}
        for path in self.local_files:
            try:
                swap[str(path)] = uploaded[path]
            except KeyError:
                msg = f"task {self.key}: local file {path} has not been uploaded"
                raise KeyError(msg) from None
        body = substitute_images(self.params, swap)
        body.update(
            taskType="imageInference",
            taskUUID=task_uuid,
            deliveryMethod="async",
            includeCost=True,
        )
        try:
            return ImageInferenceRequest.model_validate(
                body, by_alias=True, by_name=False
            )
        except ValidationError as exc:
            lines = [f"{self.key}: {f}: {m}" for _, f, m in wire_problems(exc)]
            raise ManifestError(lines) from exc


def expand(manifest: Manifest) -> Iterator[TaskSpec]:
    """Every task of the manifest, lazily, in a stable order (reference, variant, axes).

    Raises:
        ManifestError: a prompt template cannot be filled (`validate_manifest` reports
            this, with every other problem, before a run).
    """
    plan = Plan(manifest)
    param_set = functools.lru_cache(maxsize=4096)(plan.param_set)
    model = manifest.job.model
    only = [None if v.only is None else set(v.only) for v in manifest.variants]
    for ref in manifest.references:
        ref_local = ref.local_path
        for vi, variant in enumerate(manifest.variants):
            if (wanted := only[vi]) is not None and ref.id not in wanted:
                continue
            for combo in plan.combos():
                pset = param_set(vi, combo)
                key = plan.key(ref.id, variant.id, pset)
                # Nested tables are shared with the other tasks of this param set.
                params: dict[str, Any] = {"model": model, **pset.params}
                if pset.templates:
                    values = plan.template_values(ref.vars, ref.id, variant.id, pset)
                    for name, template in pset.templates.items():
                        if isinstance(template, str):
                            raise ManifestError([f"{key}: {name}: {template}"])
                        if missing := template.missing(values):
                            msg = unknown_vars(missing, values)
                            raise ManifestError([f"{key}: {name}: {msg}"])
                        params[name] = template.fill(values)
                params["inputs"] = {"referenceImages": [ref.image]}
                local = (
                    pset.style_files
                    if ref_local is None
                    else (ref_local, *pset.style_files)
                )
                yield TaskSpec(
                    key=key,
                    reference_id=ref.id,
                    variant_id=variant.id,
                    axes=pset.axes,
                    params=params,
                    local_files=tuple(dict.fromkeys(local)),
                    images=pset.images,
                    rendering_speed=pset.rendering_speed,
                )
