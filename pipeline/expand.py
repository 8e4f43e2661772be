"""Lazy expansion of a manifest into `TaskSpec`s with stable keys; whole-job checks.

Tasks are references x variants x the cartesian product of the matrix axes, in manifest
order, produced by a generator: a 100k-task job is never held as a list. A task's
parameters merge defaults < variant < matrix (nested tables merged key by key; a
``colorPalette`` is replaced whole, since it is either a preset or custom members).

`validate_manifest` checks every task before any money is spent. It exploits the
task = reference x parameter set structure: each distinct parameter set (variant x axis
values) goes through the wire model once, each reference image once, and only the
prompts, the one part that differs per reference, are filled and checked per task.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from uuid import UUID

from PIL import Image
from pydantic import ValidationError

from pipeline.errors import ManifestError
from pipeline.manifest import (
    STYLE_REFS_PATH,
    Manifest,
    Problem,
    Reference,
    Variant,
    dotted,
    error_message,
    is_local_image,
    load_manifest,
    manifest_problems,
)
from pipeline.wire import DEFAULT_PRICE_USD, ImageInferenceRequest, Inputs

PROMPT_FIELDS: Final = ("positivePrompt", "negativePrompt")
PROMPT_MAX: Final = 2000
PROBLEM_LIMIT: Final = 200
"""Problems listed in a report; the rest are counted."""

_ATOMIC: Final = frozenset({("providerSettings", "ideogram", "colorPalette")})
"""Tables replaced whole when merged: a palette is a preset name *or* members."""

_DUMMY_UUID: Final = UUID("00000000-0000-4000-8000-000000000000")
_DUMMY_IMAGE: Final = "00000000-0000-4000-8000-000000000000"
"""Stands in for an uploaded local image while validating (the upload is later)."""


# ---------------------------------------------------------------------------
# Task specs


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
        body = _substitute_images(self.params, swap)
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


def _substitute_images(
    params: Mapping[str, Any], swap: Mapping[str, str]
) -> dict[str, Any]:
    body = dict(params)
    inputs = body.get("inputs")
    if isinstance(inputs, Mapping) and isinstance(inputs.get("referenceImages"), list):
        refs = [
            swap.get(r, r) if isinstance(r, str) else r
            for r in inputs["referenceImages"]
        ]
        body["inputs"] = {**inputs, "referenceImages": refs}
    ps = body.get("providerSettings")
    ideo = ps.get("ideogram") if isinstance(ps, Mapping) else None
    styles = ideo.get("styleReferenceImages") if isinstance(ideo, Mapping) else None
    if (
        isinstance(ps, Mapping)
        and isinstance(ideo, Mapping)
        and isinstance(styles, list)
    ):
        fixed = [swap.get(s, s) if isinstance(s, str) else s for s in styles]
        body["providerSettings"] = {
            **ps,
            "ideogram": {**ideo, "styleReferenceImages": fixed},
        }
    return body


# ---------------------------------------------------------------------------
# Values, merging, templates


def render_value(value: Any) -> str:
    """An axis value as text for keys and templates (TOML spelling for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _merge(
    base: Mapping[str, Any], over: Mapping[str, Any], path: tuple[str, ...] = ()
) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        here = (*path, key)
        old = out.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(old, Mapping)
            and here not in _ATOMIC
        ):
            out[key] = _merge(old, value, here)
        else:
            out[key] = value
    return out


def _assign(params: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set a dotted path, copying the tables on the way (they may be shared)."""
    table = params
    for seg in path[:-1]:
        nxt = table.get(seg)
        nxt = dict(nxt) if isinstance(nxt, Mapping) else {}
        table[seg] = nxt
        table = nxt
    table[path[-1]] = value


def _get(params: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = params
    for seg in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(seg)
    return value


_TOKEN: Final = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed prompt: literal pieces interleaved with placeholder names."""

    literals: tuple[str, ...]
    names: tuple[str, ...]
    """len(literals) == len(names) + 1."""

    def fill(self, values: Mapping[str, str]) -> str:
        """The filled text; every name must be in `values` (see `missing`)."""
        if not self.names:
            return self.literals[0]
        parts = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            parts += (values[name], literal)
        return "".join(parts)

    def missing(self, values: Mapping[str, str]) -> list[str]:
        return [n for n in dict.fromkeys(self.names) if n not in values]


@functools.lru_cache(maxsize=4096)
def parse_template(text: str) -> Template | str:
    """A `Template`, or a message saying why `text` is not one.

    Only ``{identifier}`` is a placeholder; ``{{`` and ``}}`` are literal braces; any
    other brace is an error (a likely typo that would otherwise reach the API).
    """
    literals: list[str] = []
    names: list[str] = []
    buf: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        buf.append(text[pos : match.start()])
        pos = match.end()
        token = match[0]
        if token in ("{{", "}}"):
            buf.append(token[0])
        elif match[1] is not None:
            literals.append("".join(buf))
            buf = []
            names.append(match[1])
        else:
            return (
                f"stray '{token}' at character {match.start() + 1}: placeholders are "
                f"{{name}}; write {token * 2} for a literal brace"
            )
    buf.append(text[pos:])
    literals.append("".join(buf))
    return Template(tuple(literals), tuple(names))


# ---------------------------------------------------------------------------
# The expansion plan, shared by expand and validate_manifest


@dataclass(frozen=True, slots=True)
class Axis:
    path: tuple[str, ...]
    name: str
    """Last path segment, or the full dotted path when two axes share it."""
    values: tuple[Any, ...]
    rendered: tuple[str, ...]


def axes_of(manifest: Manifest) -> tuple[Axis, ...]:
    """The matrix axes in manifest order, with their names and values as text."""
    paths = list(manifest.matrix)
    lasts = [p.rsplit(".", 1)[-1] for p in paths]
    return tuple(
        Axis(
            tuple(path.split(".")),
            last if lasts.count(last) == 1 else path,
            tuple(values),
            tuple(render_value(v) for v in values),
        )
        for path, last, values in zip(
            paths, lasts, manifest.matrix.values(), strict=True
        )
    )


def refs_for(manifest: Manifest, variant: Variant) -> Sequence[Reference]:
    """The references a variant applies to (its `only` list, else all), in order."""
    if variant.only is None:
        return manifest.references
    only = set(variant.only)
    return [r for r in manifest.references if r.id in only]


def count_tasks(manifest: Manifest) -> int:
    """How many tasks the manifest expands to, without expanding it."""
    n = sum(len(refs_for(manifest, v)) for v in manifest.variants)
    for values in manifest.matrix.values():
        n *= len(values)
    return n


@dataclass(frozen=True, slots=True)
class _ParamSet:
    """What every task of one (variant, axis values) pair shares."""

    params: dict[str, Any]
    """Merged parameters; prompts still templates; no model or inputs yet."""
    axes: tuple[tuple[str, str], ...]
    axes_part: str
    templates: Mapping[str, Template | str]
    style_files: tuple[Path, ...]
    images: int
    rendering_speed: str | None


class _Plan:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.axes = axes_of(manifest)
        self._variant_params = [
            _merge(manifest.defaults, v.params) for v in manifest.variants
        ]
        self.refs_for = [refs_for(manifest, v) for v in manifest.variants]

    def combos(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(len(a.values)) for a in self.axes))

    def axes_part(self, combo: tuple[int, ...]) -> str:
        return ",".join(
            f"{a.name}={a.rendered[i]}" for a, i in zip(self.axes, combo, strict=True)
        )

    def param_set(self, vi: int, combo: tuple[int, ...]) -> _ParamSet:
        params = dict(self._variant_params[vi])
        for axis, i in zip(self.axes, combo, strict=True):
            _assign(params, axis.path, axis.values[i])
        templates = {
            name: parse_template(text)
            for name in PROMPT_FIELDS
            if isinstance(text := params.get(name), str)
        }
        styles = _get(params, STYLE_REFS_PATH)
        style_files = tuple(
            dict.fromkeys(
                Path(s)
                for s in (styles if isinstance(styles, list) else [])
                if isinstance(s, str) and is_local_image(s)
            )
        )
        number = params.get("numberResults")
        speed = _get(params, ("providerSettings", "ideogram", "renderingSpeed"))
        return _ParamSet(
            params=params,
            axes=tuple(
                (a.name, a.rendered[i]) for a, i in zip(self.axes, combo, strict=True)
            ),
            axes_part=self.axes_part(combo),
            templates=templates,
            style_files=style_files,
            images=number
            if isinstance(number, int) and not isinstance(number, bool)
            else 1,
            rendering_speed=speed if isinstance(speed, str) else None,
        )

    def key(self, ref_id: str, variant_id: str, pset: _ParamSet) -> str:
        if pset.axes_part:
            return f"{ref_id}/{variant_id}/{pset.axes_part}"
        return f"{ref_id}/{variant_id}"

    @staticmethod
    def template_values(
        ref_vars: Mapping[str, str], ref_id: str, variant_id: str, pset: _ParamSet
    ) -> dict[str, str]:
        values = {name: value for name, value in pset.axes if name.isidentifier()}
        values["reference"] = ref_id
        values["variant"] = variant_id
        values.update(ref_vars)
        return values


def expand(manifest: Manifest) -> Iterator[TaskSpec]:
    """Every task of the manifest, lazily, in a stable order (reference, variant, axes).

    Raises:
        ManifestError: a prompt template cannot be filled (`validate_manifest` reports
            this, with every other problem, before a run).
    """
    plan = _Plan(manifest)
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
                            msg = _unknown_vars(missing, values)
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


def _unknown_vars(missing: Sequence[str], values: Mapping[str, str]) -> str:
    names = ", ".join(f"{{{n}}}" for n in missing)
    known = ", ".join(sorted(values))
    return f"unknown template variable {names}; known here: {known}"


# ---------------------------------------------------------------------------
# Validation


def wire_problems(exc: ValidationError) -> list[tuple[str, str, str]]:
    """(error type, camelCase dotted field path, message) for a wire ValidationError."""
    out: list[tuple[str, str, str]] = []
    for error in exc.errors(include_url=False):
        path = dotted(error["loc"])
        message = error_message(error, noun="parameter")
        if not path:
            # Model-level checks of the wire request name their fields in the message.
            if message.startswith("width x height"):
                path = "width/height"
            elif message.startswith("ttl"):
                path = "ttl"
            else:
                path = "request"
        elif error["type"] == "missing" and len(error["loc"]) == 1:
            message = "required: set it in [defaults], the variant or the matrix"
        out.append((error["type"], path, message))
    return out


def image_problem(path: Path) -> str | None:
    """Why a local image cannot be used as a reference, or None when it can."""
    if not path.is_file():
        return f"file not found: {path}"
    try:
        with Image.open(path) as image:
            kind = image.format
            image.verify()
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        Image.DecompressionBombError,
    ) as exc:
        return f"not a readable image: {path} ({exc})"
    if kind not in ("PNG", "JPEG", "WEBP"):
        return f"{path} is {kind}; the API takes PNG, JPG or WEBP"
    return None


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """Totals for the plan and every problem found (the listing is capped)."""

    tasks: int
    images: int
    images_by_speed: Mapping[str, int]
    """Images per renderingSpeed ("DEFAULT" when unset, as the API): prices differ."""
    local_files: int
    """Distinct local images that will be uploaded."""
    problems: tuple[str, ...]
    """At most `limit` problem lines, then "... and N more" when there are more."""
    problem_count: int

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def raise_for_problems(self) -> None:
        """Raises ManifestError with the listing when there is any problem."""
        if self.problems:
            raise ManifestError(list(self.problems))

    def estimated_cost_usd(
        self, price_per_image_usd: Mapping[str, Decimal] | None = None
    ) -> Decimal:
        """Images x price per rendering speed (the seed's price where none is given)."""
        prices = price_per_image_usd or {}
        return sum(
            (
                prices.get(speed, DEFAULT_PRICE_USD) * n
                for speed, n in self.images_by_speed.items()
            ),
            Decimal(0),
        )


class _Sink:
    """Collects problem lines up to a limit, counting the rest; drops exact repeats."""

    def __init__(self, file: str, limit: int) -> None:
        self.file = file
        self.limit = limit
        self.lines: list[str] = []
        self.count = 0
        self._seen: set[tuple[str, ...]] = set()

    def add(self, problem: Problem, dedupe: tuple[str, ...] | None = None) -> None:
        if dedupe is not None:
            if dedupe in self._seen:
                return
            self._seen.add(dedupe)
        self.count += 1
        if len(self.lines) < self.limit:
            self.lines.append(problem.render(self.file))

    def listing(self) -> tuple[str, ...]:
        more = self.count - len(self.lines)
        return (*self.lines, f"... and {more} more") if more else tuple(self.lines)


def validate_manifest(
    manifest: Manifest, path: Path, *, limit: int = PROBLEM_LIMIT
) -> ValidationReport:
    """Check every task of the manifest before anything is paid for.

    Each task goes through the wire model (its parameter set once, its reference once,
    its filled prompts per task); local images are opened and verified once per file.
    """
    sink = _Sink(str(path), limit)
    shape = manifest_problems(manifest)
    for problem in shape:
        sink.add(problem)
    # The shape check already named each unknown key once, at its source table.
    skip_extra = any(p.message.startswith("unknown parameter") for p in shape)

    checked: dict[Path, str | None] = {}

    def check_file(file: Path) -> str | None:
        if file not in checked:
            checked[file] = image_problem(file)
        return checked[file]

    refs = manifest.references
    for ri, ref in enumerate(refs):
        where = manifest.reference_where(ri)
        if (local := ref.local_path) is not None:
            if (msg := check_file(local)) is not None:
                sink.add(Problem(where, "image", msg))
            continue
        try:
            Inputs.model_validate(
                {"referenceImages": [ref.image]}, by_alias=True, by_name=False
            )
        except ValidationError as exc:
            for _, _, msg in wire_problems(exc):
                sink.add(Problem(where, "image", msg))

    plan = _Plan(manifest)
    seen_parts: dict[str, tuple[int, ...]] = {}
    for combo in plan.combos():
        part = plan.axes_part(combo)
        if part in seen_parts:
            sink.add(
                Problem(
                    "matrix",
                    "",
                    f"two value combinations give the same task "
                    f"key part '{part}': make the axis values distinct",
                )
            )
        else:
            seen_parts[part] = combo
    seen_parts.clear()

    images = 0
    by_speed: dict[str, int] = {}
    for vi, variant in enumerate(manifest.variants):
        vrefs = plan.refs_for[vi]
        n_refs = len(vrefs)
        everyone = f" (same for all {n_refs} references)" if n_refs > 1 else ""
        for combo in plan.combos():
            pset = plan.param_set(vi, combo)
            first = plan.key(vrefs[0].id if vrefs else "*", variant.id, pset)
            for kind, fld, msg in _check_set(pset, manifest.job.model):
                if not (skip_extra and kind == "extra_forbidden"):
                    sink.add(Problem(first, fld, msg + everyone))
            for file in pset.style_files:
                if (msg := check_file(file)) is not None:
                    field_name = ".".join(STYLE_REFS_PATH)
                    sink.add(
                        Problem(first, field_name, msg), dedupe=("style", str(file))
                    )
            images += pset.images * n_refs
            speed = pset.rendering_speed or "DEFAULT"
            by_speed[speed] = by_speed.get(speed, 0) + pset.images * n_refs
            _check_prompts(plan, pset, vi, sink, everyone)
    return ValidationReport(
        tasks=count_tasks(manifest),
        images=images,
        images_by_speed=by_speed,
        local_files=len(checked),
        problems=sink.listing(),
        problem_count=sink.count,
    )


def _check_set(pset: _ParamSet, model: str) -> list[tuple[str, str, str]]:
    """Wire problems of a parameter set, with neutral prompts and a dummy reference."""
    body: dict[str, Any] = {"model": model, **pset.params}
    for name in PROMPT_FIELDS:
        if isinstance(body.get(name), str):
            body[name] = "x"  # the filled prompts are checked per task
    if pset.style_files:
        local = {str(f) for f in pset.style_files}
        body = _substitute_images(body, dict.fromkeys(local, _DUMMY_IMAGE))
    body.update(
        taskType="imageInference",
        taskUUID=_DUMMY_UUID,
        inputs={"referenceImages": [_DUMMY_IMAGE]},
        deliveryMethod="async",
        includeCost=True,
    )
    try:
        ImageInferenceRequest.model_validate(body, by_alias=True, by_name=False)
    except ValidationError as exc:
        return wire_problems(exc)
    return []


def _prompt_problem(text: str) -> str | None:
    if not text:
        return "must not be empty"
    if len(text) > PROMPT_MAX:
        return (
            f"{len(text)} characters after filling the template; "
            f"the limit is {PROMPT_MAX}"
        )
    return None


def _check_prompts(
    plan: _Plan, pset: _ParamSet, vi: int, sink: _Sink, everyone: str
) -> None:
    """Fill and check the prompts of every task of one parameter set."""
    refs = plan.refs_for[vi]
    variant_id = plan.manifest.variants[vi].id
    for name, template in pset.templates.items():
        if isinstance(template, str) or not template.names:
            text = template if isinstance(template, str) else template.fill({})
            msg = template if isinstance(template, str) else _prompt_problem(text)
            if msg is not None:
                first = plan.key(refs[0].id if refs else "*", variant_id, pset)
                sink.add(
                    Problem(first, name, msg + everyone), dedupe=(variant_id, name, msg)
                )
            continue
        for ref in refs:
            values = plan.template_values(ref.vars, ref.id, variant_id, pset)
            if missing := template.missing(values):
                msg = _unknown_vars(missing, values)
                key = plan.key(ref.id, variant_id, pset)
                sink.add(
                    Problem(key, name, msg), dedupe=(ref.id, variant_id, name, msg)
                )
            elif (msg := _prompt_problem(template.fill(values))) is not None:
                sink.add(Problem(plan.key(ref.id, variant_id, pset), name, msg))


_ID_TAIL = re.compile(r"\(id=([^)]*)\): (.*)$")


def merge_problems(shape: Sequence[str], per_task: Sequence[str]) -> list[str]:
    """Shape and per-task problems together, each once, in the order found.

    Both checks can see the same mistake (a duplicate id in a CSV list, say) and
    name its place slightly differently; what identifies it is the id and the text.
    """
    seen: set[str] = set()
    merged: list[str] = []
    for line in [*shape, *per_task]:
        match = _ID_TAIL.search(line)
        identity = f"{match[1]}\0{match[2]}" if match else line
        if identity not in seen:
            seen.add(identity)
            merged.append(line)
    return merged


def check_manifest(path: Path) -> tuple[Manifest, ValidationReport]:
    """Load and validate a manifest, before anything is spent.

    Raises:
        ManifestError: every problem found (shape and per-task together).
    """
    shape: list[str] = []
    manifest = load_manifest(path, collect=shape)
    report = validate_manifest(manifest, path)
    problems = merge_problems(shape, report.problems)
    if problems:
        raise ManifestError(problems)
    return manifest, report
