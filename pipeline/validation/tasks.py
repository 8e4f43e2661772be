"""Per-task checks: wire conformance, reference strings, task keys, prompts.

It exploits the task = reference x parameter set structure: each distinct parameter set
(variant x axis values) goes through the wire model once, each reference string once,
each template once per reference, and only the filled prompts, the one part that
differs per task, are checked per task. Unknown parameter names are not reported here
(`structure` owns them); local image files are checked by `files`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Final
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from pipeline.manifest import (
    STYLE_REFS_PATH,
    Manifest,
    Reference,
    Variant,
    dotted,
    error_message,
    is_local_image,
)
from pipeline.plan import (
    PROMPT_FIELDS,
    ParamSet,
    Plan,
    Template,
    count_tasks,
    parse_template,
    substitute_images,
    unknown_vars,
)
from pipeline.validation.files import ImageFiles
from pipeline.validation.problems import Problem, ProblemSink
from pipeline.wire import (
    CROSS_FIELD_CHECKS,
    MODEL_AIR,
    ImageInferenceRequest,
    Inputs,
    ModelAir,
)

PROMPT_MAX: Final = 2000
PLACEHOLDER_TASK_UUID: Final = UUID("00000000-0000-4000-8000-000000000000")
"""Stands in for a task's taskUUID while validating (each run draws its own)."""
PLACEHOLDER_IMAGE: Final = "00000000-0000-4000-8000-000000000000"
"""Stands in for an uploaded local image while validating (the upload is later)."""

_STYLE_FIELD: Final = ".".join(STYLE_REFS_PATH)
_MODEL: Final = TypeAdapter[str](ModelAir)
"""The wire's own check of the model AIR, run once for the [job] model."""


def wire_problems(exc: ValidationError) -> list[tuple[str, str, str]]:
    """(error type, camelCase dotted field path, message) for a wire ValidationError.

    A model-level check has no location: its fields come from the wire models'
    `CROSS_FIELD_CHECKS`, by error type.
    """
    out: list[tuple[str, str, str]] = []
    for error in exc.errors(include_url=False):
        path = dotted(error["loc"])
        message = error_message(error, noun="parameter")
        if not path:
            fields = CROSS_FIELD_CHECKS.get(error["type"])
            path = "/".join(fields) if fields else "request"
        elif error["type"] == "missing" and len(error["loc"]) == 1:
            message = "required: set it in [defaults], the variant or the matrix"
        out.append((error["type"], path, message))
    return out


def reference_problems(
    manifest: Manifest, files: ImageFiles, sink: ProblemSink
) -> None:
    """Each reference's image: its file (opened once per path) or its wire form."""
    for ri, ref in enumerate(manifest.references):
        where = manifest.reference_where(ri)
        if (local := ref.local_path) is not None:
            if (msg := files.problem(local)) is not None:
                sink.add(Problem(where, "image", msg))
            continue
        try:
            Inputs.model_validate(
                {"referenceImages": [ref.image]}, by_alias=True, by_name=False
            )
        except ValidationError as exc:
            for _, _, msg in wire_problems(exc):
                sink.add(Problem(where, "image", msg))


def key_part_problems(plan: Plan, sink: ProblemSink) -> None:
    """Two axis value combinations must not render to the same task key part: one
    problem for each key part that more than one combination gives."""
    given = Counter(plan.axes_part(combo) for combo in plan.combos())
    for part, n in given.items():
        if n > 1:
            sink.add(
                Problem(
                    "matrix",
                    "",
                    f"two value combinations give the same task "
                    f"key part '{part}': make the axis values distinct",
                )
            )


class TaskChecks:
    """Walks every parameter set of a plan, checking each thing once."""

    def __init__(self, plan: Plan, files: ImageFiles, sink: ProblemSink) -> None:
        self.plan = plan
        self.files = files
        self.sink = sink
        self.images = 0
        self.images_by_speed: dict[str, int] = {}
        self._done: set[Hashable] = set()
        self._from_defaults = self._defaults_problems()
        """The wire problems [defaults] has on its own -> the tasks inheriting them."""

    def _first(self, thing: Hashable) -> bool:
        """True the first time `thing` is met: it is checked then, and only then."""
        if thing in self._done:
            return False
        self._done.add(thing)
        return True

    def run(self) -> None:
        """Check every task that has a key of its own.

        A reference or variant whose id repeats an earlier one's, or axis values that
        render like earlier ones, make no such task: its key would name an earlier
        task, and the run is refused for the repeat itself (`structure`,
        `key_part_problems`), so these tasks are counted but not checked.
        """
        plan = self.plan
        manifest = plan.manifest
        keyed_refs = _first_of_each_id(manifest.references)
        keyed_variants = _first_of_each_id(manifest.variants)
        keyed_combos: dict[str, tuple[int, ...]] = {}
        for combo in plan.combos():
            keyed_combos.setdefault(plan.axes_part(combo), combo)
        own_combos = set(keyed_combos.values())
        at = len(self.sink.lines)
        for vi, variant in enumerate(manifest.variants):
            refs = plan.refs_for[vi]
            n_refs = len(refs)
            own_refs = [r for r in refs if id(r) in keyed_refs]
            everyone = f" (same for all {n_refs} references)" if n_refs > 1 else ""
            inherited = self._inherited(variant)
            for combo in plan.combos():
                pset = plan.param_set(vi, combo)
                self.images += pset.images * n_refs
                speed = pset.rendering_speed or "DEFAULT"
                by_speed = self.images_by_speed
                by_speed[speed] = by_speed.get(speed, 0) + pset.images * n_refs
                if id(variant) not in keyed_variants or combo not in own_combos:
                    continue
                first = plan.key(refs[0].id if refs else "*", variant.id, pset)
                if self._first("model"):
                    self._model(first)
                for fld, msg in self._wire(pset.params):
                    if (fld, msg) in inherited:
                        self._from_defaults[fld, msg] += n_refs
                    else:
                        self.sink.add(Problem(first, fld, msg + everyone))
                for file in pset.style_files:
                    # Reported at the first task using it; a reference's file is
                    # reported at each reference (see reference_problems).
                    if self._first(("style", file)) and (
                        problem := self.files.problem(file)
                    ):
                        self.sink.add(Problem(first, _STYLE_FIELD, problem))
                self._prompts(vi, pset, own_refs, first, everyone, inherited)
        self._report_defaults(at)

    def _defaults_problems(self) -> Counter[tuple[str, str]]:
        """[defaults] checked on its own, the parameters it leaves to others aside."""
        defaults = self.plan.manifest.defaults
        if not defaults:
            return Counter()
        # A prompt lets the request's own cross-field checks (the size) run.
        problems = self._wire({"positivePrompt": "x", **defaults}, missing=False)
        for name in PROMPT_FIELDS:
            if isinstance(text := defaults.get(name), str):
                template = parse_template(text)
                constant = isinstance(template, str) or not template.names
                if constant and (msg := _constant_problem(template)) is not None:
                    problems.append((name, msg))
        return Counter(dict.fromkeys(problems, 0))

    def _inherited(self, variant: Variant) -> set[tuple[str, str]]:
        """The [defaults] problems a variant's tasks inherit: those in fields that
        neither the variant nor a matrix axis sets (either way round a prefix)."""
        if not self._from_defaults:
            return set()
        own = [*_paths(variant.params), *(axis.path for axis in self.plan.axes)]
        return {
            (fld, msg)
            for fld, msg in self._from_defaults
            if not any(
                _overlap(tuple(path.split(".")), mine)
                for path in fld.split("/")
                for mine in own
            )
        }

    def _report_defaults(self, at: int) -> None:
        """Each [defaults] mistake once, with how many tasks it reaches."""
        total = count_tasks(self.plan.manifest)
        for (fld, msg), n in self._from_defaults.items():
            if n:
                reach = f"all {n:,}" if n == total else f"{n:,} of {total:,}"
                self.sink.insert(
                    at, Problem("[defaults]", fld, f"{msg} (so for {reach} tasks)")
                )
                at += 1

    def _model(self, first: str) -> None:
        """The [job] model, once, at the first task (every task sends it)."""
        try:
            _MODEL.validate_python(self.plan.manifest.job.model, strict=True)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                self.sink.add(Problem(first, "model", error_message(error)))

    def _wire(
        self, params: dict[str, Any], *, missing: bool = True
    ) -> list[tuple[str, str]]:
        """Wire problems of a parameter set, with neutral prompts and placeholders
        for what remix sets itself: reserved keys are `structure`'s alone, the model
        is `_model`'s. ``missing=False`` leaves out required parameters not set
        (for [defaults], which leaves some to the variants)."""
        body: dict[str, Any] = dict(params)
        for name in PROMPT_FIELDS:
            if isinstance(body.get(name), str):
                body[name] = "x"  # the filled prompts are checked per task
        styles = _style_files(body)
        if styles:
            body = substitute_images(body, dict.fromkeys(styles, PLACEHOLDER_IMAGE))
        body.update(
            model=MODEL_AIR,
            taskType="imageInference",
            taskUUID=PLACEHOLDER_TASK_UUID,
            inputs={"referenceImages": [PLACEHOLDER_IMAGE]},
            deliveryMethod="async",
            includeCost=True,
        )
        try:
            ImageInferenceRequest.model_validate(body, by_alias=True, by_name=False)
        except ValidationError as exc:
            return [
                (fld, msg)
                for kind, fld, msg in wire_problems(exc)
                if kind != "extra_forbidden" and (missing or kind != "missing")
            ]
        return []

    def _prompts(
        self,
        vi: int,
        pset: ParamSet,
        refs: Sequence[Reference],
        first: str,
        everyone: str,
        inherited: set[tuple[str, str]],
    ) -> None:
        """Parse errors and constant prompts once per variant (once in all when they
        come from [defaults]); templates once per reference (unknown variables);
        filled prompts per task (their length)."""
        plan = self.plan
        variant_id = plan.manifest.variants[vi].id
        for name, template in pset.templates.items():
            if isinstance(template, str) or not template.names:
                if inherited:
                    msg = _constant_problem(template)
                    if msg is not None and (name, msg) in inherited:
                        self._from_defaults[name, msg] += len(plan.refs_for[vi])
                        continue
                if self._first(("prompt", vi, name, template)):
                    msg = _constant_problem(template)
                    if msg is not None:
                        self.sink.add(Problem(first, name, msg + everyone))
                continue
            for ref in refs:
                values = plan.template_values(ref.vars, ref.id, variant_id, pset)
                key = plan.key(ref.id, variant_id, pset)
                if missing := template.missing(values):
                    if self._first(("vars", vi, id(ref), name, template)):
                        msg = unknown_vars(missing, values)
                        self.sink.add(Problem(key, name, msg))
                elif (msg := prompt_problem(template.fill(values))) is not None:
                    self.sink.add(Problem(key, name, msg))


def _style_files(params: dict[str, Any]) -> set[str]:
    """The local style reference files a parameter set names (as the plan sees them)."""
    styles: Any = params
    for seg in STYLE_REFS_PATH:
        styles = styles.get(seg) if isinstance(styles, Mapping) else None
    return {
        s
        for s in (styles if isinstance(styles, list) else [])
        if isinstance(s, str) and is_local_image(s)
    }


def _paths(
    table: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every leaf path a (nested) parameter table sets."""
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            yield from _paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether one path lies under the other (setting one changes the other)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _first_of_each_id(items: Sequence[Reference] | Sequence[Variant]) -> set[int]:
    """Python ids of the items whose id no earlier item has."""
    firsts: dict[str, int] = {}
    for item in items:
        firsts.setdefault(item.id, id(item))
    return set(firsts.values())


def _constant_problem(template: Template | str) -> str | None:
    """A template that is not one (its parse error), or a constant prompt's problem."""
    if isinstance(template, str):
        return template
    return prompt_problem(template.fill({}))


def prompt_problem(text: str) -> str | None:
    """Why a filled prompt cannot be sent, or None."""
    if not text:
        return "must not be empty"
    if len(text) > PROMPT_MAX:
        return (
            f"{len(text)} characters after filling the template; "
            f"the limit is {PROMPT_MAX}"
        )
    return None
