"""Job manifest models and reading (TOML plus CSV/JSONL reference lists).

A manifest names references (images), variants (wire parameters) and an optional matrix
of axes. This module reads it and builds the models, reporting every type problem at
once, each placed at its table, list file line and field. The checks of what the types
cannot say (ids, parameter names, axes, values, templates, image files) live in
`pipeline.validation`; `load_manifest` runs its shape checks too, so a loaded manifest
is well formed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ManifestError
from pipeline.validation.problems import Problem
from pipeline.validation.structure import Outline, structure_problems
from pipeline.wire import MODEL_AIR, image_ref_kind

ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Reference, variant and job ids: they become parts of task keys and file paths."""
VAR_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCHEME: Final = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|data:)")

STYLE_REFS_PATH: Final = ("providerSettings", "ideogram", "styleReferenceImages")
"""The one parameter besides the reference that may name local image files."""

VARIANT_KEYS: Final = ("id", "only")
"""Variant keys that are not wire parameters."""
TABLES: Final = (
    "job",
    "defaults",
    "references",
    "references_from",
    "variants",
    "matrix",
)


def _check_id(value: str) -> str:
    if not ID_RE.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a valid id: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' (ids become file names)"
        )
    return value


def _check_var(value: str) -> str:
    if not VAR_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid variable name: use letters, digits and '_' "
            "(it is written {name} in prompts)"
        )
    return value


Id = Annotated[StrictStr, AfterValidator(_check_id)]
VarName = Annotated[StrictStr, AfterValidator(_check_var)]


def is_local_image(value: str) -> bool:
    """True when an image string names a local file rather than a URL, UUID or data URI.

    Raw base64 is not accepted in manifests: short base64 and a path look alike. A
    string with another scheme (``ftp://``, ``data:text/...``) is not a path either:
    the wire check rejects it with a clear message.
    """
    if _SCHEME.match(value):
        return False
    return image_ref_kind(value) not in ("uuid", "url", "data_uri")


def resolve_local(value: str, base_dir: Path) -> str:
    """The absolute, normalised path of a local image named relative to base_dir."""
    try:
        expanded = Path(value).expanduser()
    except RuntimeError as exc:  # "~nosuchuser/x.png"
        raise ValueError(f"cannot expand {value!r}: no such user") from exc
    return os.path.abspath(base_dir / expanded)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context
    if isinstance(context, Mapping):
        base = context.get("base_dir")
        if isinstance(base, Path):
            return base
    return Path.cwd()


def resolve_style_refs(params: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of params whose local styleReferenceImages are absolute paths."""
    out = dict(params)
    ps = out.get("providerSettings")
    ideo = ps.get("ideogram") if isinstance(ps, Mapping) else None
    refs = ideo.get("styleReferenceImages") if isinstance(ideo, Mapping) else None
    if isinstance(ps, Mapping) and isinstance(ideo, Mapping) and isinstance(refs, list):
        fixed = [
            resolve_local(r, base_dir)
            if isinstance(r, str) and is_local_image(r)
            else r
            for r in refs
        ]
        out["providerSettings"] = {
            **ps,
            "ideogram": {**ideo, "styleReferenceImages": fixed},
        }
    return out


def _resolve_axis_value(path: str, value: Any, base_dir: Path) -> Any:
    """Resolve local style images inside one matrix value, wherever the axis points."""
    segs = path.split(".")
    if segs != list(STYLE_REFS_PATH[: len(segs)]):
        return value
    wrapped: Any = value
    for seg in reversed(segs):
        wrapped = {seg: wrapped}
    resolved: Any = resolve_style_refs(wrapped, base_dir)
    for seg in segs:
        resolved = resolved[seg]
    return resolved


# ---------------------------------------------------------------------------
# Models


class ManifestModel(BaseModel):
    """Python-mode validation (tomllib gives dicts); a typo in a table is an error."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True
    )


class Job(ManifestModel):
    name: Id
    """Names the job in reports and run directories."""
    model: StrictStr = MODEL_AIR
    """The model AIR; the wire model accepts only the seed's Ideogram 2.0 Remix."""
    budget_usd: Annotated[Decimal, Field(ge=0)] | None = None
    """Hard cap on spend for one run."""


class Reference(ManifestModel):
    id: Id
    image: Annotated[StrictStr, Field(min_length=1)]
    """A local path (made absolute on load), http(s) URL, image UUID or data URI."""
    vars: dict[VarName, StrictStr] = Field(default_factory=dict)
    """Values for {name} placeholders in prompts."""

    _where: str | None = PrivateAttr(default=None)

    @field_validator("image")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_local(value, _base_dir(info)) if is_local_image(value) else value

    @property
    def local_path(self) -> Path | None:
        """The image file, when the reference is a local file."""
        return Path(self.image) if is_local_image(self.image) else None


class ReferencesFrom(ManifestModel):
    """A long reference list in a file next to the manifest: exactly one of the two."""

    csv: StrictStr | None = None
    """Columns id,image[,var columns]; a header line is required."""
    jsonl: StrictStr | None = None
    """One object {id, image, vars?} a line."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ReferencesFrom:
        if (self.csv is None) == (self.jsonl is None):
            raise ValueError('give exactly one of csv = "file.csv" or jsonl = ...')
        return self


class Variant(BaseModel):
    """An id plus any wire parameters (camelCase), checked against the wire model."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Any] = Field(init=False)

    id: Id
    only: list[Id] | None = None
    """Reference ids this variant applies to (all references when unset)."""

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, Mapping):
            return resolve_style_refs(data, _base_dir(info))
        return data

    @property
    def params(self) -> dict[str, Any]:
        """The wire parameters this variant sets (everything but id and only)."""
        return self.__pydantic_extra__


class Manifest(ManifestModel):
    """A whole job. Build it with `load_manifest`, which also reads list files."""

    job: Job
    defaults: dict[StrictStr, Any] = Field(default_factory=dict)
    """Wire parameters for every task; variants and the matrix override them."""
    references: list[Reference] = Field(default_factory=list)
    """Inline references followed by those read from references_from."""
    references_from: ReferencesFrom | None = None
    variants: list[Variant] = Field(default_factory=list)
    matrix: dict[StrictStr, list[Any]] = Field(default_factory=dict)
    """Dotted wire path -> values; tasks take the cartesian product, in this order."""

    @field_validator("defaults")
    @classmethod
    def _resolve_defaults(cls, value: dict[str, Any], info: ValidationInfo) -> Any:
        return resolve_style_refs(value, _base_dir(info))

    @field_validator("matrix")
    @classmethod
    def _resolve_matrix(cls, value: dict[str, list[Any]], info: ValidationInfo) -> Any:
        base = _base_dir(info)
        return {
            path: [_resolve_axis_value(path, v, base) for v in values]
            for path, values in value.items()
        }

    def reference_where(self, index: int) -> str:
        """Where reference `index` was written, for problem messages."""
        ref = self.references[index]
        return ref._where or f"references[{index}] (id={ref.id})"

    def variant_where(self, index: int) -> str:
        return f"variants[{index}] (id={self.variants[index].id})"

    def outline(self) -> Outline:
        """What the shape checks read, for a manifest built without `read_manifest`."""
        wheres = [self.variant_where(i) for i in range(len(self.variants))]
        return Outline(
            self.defaults,
            [(w, v.params) for w, v in zip(wheres, self.variants, strict=True)],
            self.matrix,
            [
                (Problem(self.reference_where(i), "", ""), r.id)
                for i, r in enumerate(self.references)
            ],
            [(w, v.id) for w, v in zip(wheres, self.variants, strict=True)],
            [(w, v.only) for w, v in zip(wheres, self.variants, strict=True)],
        )


# ---------------------------------------------------------------------------
# Pydantic errors -> problem lines


def error_message(error: Mapping[str, Any], *, noun: str = "key") -> str:
    """A pydantic error's message, minus pydantic's "Value error, " noise."""
    kind = error.get("type", "")
    loc = error.get("loc", ())
    msg = str(error.get("msg", ""))
    if kind == "extra_forbidden" and loc:
        return f"unknown {noun} '{loc[-1]}'"
    if kind == "missing":
        return "required"
    if kind == "list_type":
        return "must be a list"
    return msg.removeprefix("Value error, ")


def dotted(loc: Iterable[Any]) -> str:
    """A pydantic loc as a dotted path (list indices as numbers)."""
    return ".".join(str(p) for p in loc if p != "[key]")


class _Origin(NamedTuple):
    file: str | None
    label: str


def _where_ref(origin: _Origin, raw: Any) -> Problem:
    ref_id = raw.get("id") if isinstance(raw, Mapping) else None
    label = f"{origin.label} (id={ref_id})" if isinstance(ref_id, str) else origin.label
    return Problem(label, "", "", origin.file)


def _where_variant(index: int, raw: Any) -> str:
    var_id = raw.get("id") if isinstance(raw, Mapping) else None
    return (
        f"variants[{index}] (id={var_id})"
        if isinstance(var_id, str)
        else f"variants[{index}]"
    )


def _render_manifest_error(
    exc: ValidationError,
    origins: Sequence[_Origin],
    refs: Sequence[Any],
    variants: Sequence[Any],
) -> list[Problem]:
    out: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        head = loc[0] if loc else ""
        message = error_message(error)
        if len(loc) == 1 and error["type"] == "extra_forbidden":
            message = f"unknown table; a manifest has {', '.join(TABLES)}"
        elif len(loc) == 1 and head == "job" and error["type"] == "missing":
            message = 'missing [job] table: it needs at least name = "..."'
        if head == "references" and len(loc) > 1 and isinstance(loc[1], int):
            i = loc[1]
            where = _where_ref(origins[i], refs[i] if i < len(refs) else None)
            out.append(where._replace(field=dotted(loc[2:]), message=message))
        elif head == "variants" and len(loc) > 1 and isinstance(loc[1], int):
            i = loc[1]
            raw = variants[i] if i < len(variants) else None
            out.append(Problem(_where_variant(i, raw), dotted(loc[2:]), message))
        else:
            out.append(Problem(str(head), dotted(loc[1:]), message))
    return out


# ---------------------------------------------------------------------------
# Loading


_TOML_POS: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _toml_problem(exc: tomllib.TOMLDecodeError) -> str:
    text = str(exc)
    match = _TOML_POS.search(text)
    if match:
        message = text[: match.start()]
        return f"line {match[1]}, column {match[2]}: invalid TOML: {message}"
    return f"invalid TOML: {text}"


def _read_list(
    spec: Any, base_dir: Path, manifest_file: str
) -> tuple[list[Any], list[_Origin], list[Problem]]:
    """Rows of a references_from file, each with where it came from."""
    if not isinstance(spec, Mapping):
        return [], [], []
    csv_name, jsonl_name = spec.get("csv"), spec.get("jsonl")
    if isinstance(csv_name, str) and jsonl_name is None:
        kind, name = "csv", csv_name
    elif isinstance(jsonl_name, str) and csv_name is None:
        kind, name = "jsonl", jsonl_name
    else:
        return [], [], []  # the model reports the shape problem
    path = base_dir / name
    shown = os.path.join(os.path.dirname(manifest_file), name)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return (
            [],
            [],
            [Problem("references_from", kind, f"cannot read {shown}: {reason}")],
        )
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}"
        return [], [], [Problem(where, "", "not UTF-8 text", shown)]
    read = _parse_csv if kind == "csv" else _parse_jsonl
    rows, lines, problems = read(text, shown)
    list_dir = path.parent
    for row in rows:
        image = row.get("image") if isinstance(row, dict) else None
        if isinstance(image, str) and image and is_local_image(image):
            row["image"] = resolve_local(image, list_dir)
    return rows, [_Origin(shown, f"line {n}") for n in lines], problems


def _parse_csv(text: str, shown: str) -> tuple[list[Any], list[int], list[Problem]]:
    reader = csv.reader(text.splitlines(keepends=True))
    rows: list[Any] = []
    lines: list[int] = []
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return (
            [],
            [],
            [
                Problem(
                    "line 1", "", "empty file: expected a header id,image[,vars]", shown
                )
            ],
        )
    except csv.Error as exc:
        return [], [], [Problem("line 1", "", f"invalid CSV: {exc}", shown)]
    problems = [
        Problem(
            "line 1",
            "",
            f"missing column '{col}' (the header is id,image[,vars])",
            shown,
        )
        for col in ("id", "image")
        if col not in header
    ]
    seen: set[str] = set()
    for col in header:
        if col in seen:
            problems.append(Problem("line 1", "", f"duplicate column '{col}'", shown))
        seen.add(col)
        if col not in ("id", "image") and not VAR_RE.match(col):
            problems.append(
                Problem(
                    "line 1",
                    "",
                    f"column {col!r} is not a valid variable name (letters, digits, _)",
                    shown,
                )
            )
    if problems:
        return [], [], problems
    start = 2
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                msg = f"{len(row)} fields, but the header has {len(header)}"
                problems.append(Problem(f"line {line}", "", msg, shown))
                continue
            record = dict(zip(header, row, strict=True))
            ref_id, image = record.pop("id").strip(), record.pop("image").strip()
            rows.append({"id": ref_id, "image": image, "vars": record})
            lines.append(line)
    except csv.Error as exc:
        problems.append(Problem(f"line {start}", "", f"invalid CSV: {exc}", shown))
    return rows, lines, problems


def _parse_jsonl(text: str, shown: str) -> tuple[list[Any], list[int], list[Problem]]:
    rows: list[Any] = []
    lines: list[int] = []
    problems: list[Problem] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            msg = f"invalid JSON: {exc.msg} (column {exc.colno})"
            problems.append(Problem(f"line {n}", "", msg, shown))
            continue
        if not isinstance(obj, dict):
            msg = 'expected an object {"id": ..., "image": ..., "vars": {...}}'
            problems.append(Problem(f"line {n}", "", msg, shown))
            continue
        rows.append(obj)
        lines.append(n)
    return rows, lines, problems


_HUGE_INT = re.compile(r'^\s*"?([\w.-]+)"?\s*=\s*[-+]?[\d_]{1000,}', re.MULTILINE)


def _huge_number_problem(path: Path, exc: ValueError) -> str:
    """tomllib's plain ValueError has no position: find the number's line and key."""
    text = path.read_text(encoding="utf-8", errors="replace")
    match = _HUGE_INT.search(text)
    if match is None:
        return f"invalid TOML: {exc}"
    line = text.count("\n", 0, match.start()) + 1
    return f"line {line}: {match[1]}: number too long to be a valid value"


class Draft(NamedTuple):
    """A read manifest: the model when it builds, the problems met reading it, and
    the outline the shape checks read (from the raw data, so they run either way)."""

    manifest: Manifest | None
    problems: list[Problem]
    outline: Outline


def read_manifest(path: Path) -> Draft:
    """Read a job manifest and its reference list file and build the models.

    Raises:
        ManifestError: the TOML cannot be read or parsed at all (one problem line).
    """
    shown = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError([f"{shown}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{shown}: not UTF-8 text (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([f"{shown}: {_toml_problem(exc)}"]) from exc
    except RecursionError as exc:
        raise ManifestError([f"{shown}: invalid TOML: nested too deeply"]) from exc
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise ManifestError([f"{shown}: {_huge_number_problem(path, exc)}"]) from exc

    base_dir = Path(os.path.abspath(path)).parent
    inline = raw.get("references", [])
    inline_list = inline if isinstance(inline, list) else []
    rows, row_origins, problems = _read_list(
        raw.get("references_from"), base_dir, shown
    )
    origins = [_Origin(None, f"references[{i}]") for i in range(len(inline_list))]
    origins += row_origins
    data = dict(raw)
    if rows:
        data["references"] = (
            [*inline_list, *rows] if isinstance(inline, list) else inline
        )
    all_refs = [*inline_list, *rows]
    raw_variants = raw.get("variants", [])
    variants = raw_variants if isinstance(raw_variants, list) else []

    manifest: Manifest | None = None
    try:
        manifest = Manifest.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems += _render_manifest_error(exc, origins, all_refs, variants)
    else:
        for ref, origin in zip(manifest.references, origins, strict=True):
            if origin.file is not None:
                ref._where = f"{origin.file} {origin.label} (id={ref.id})"

    def field(raw_variant: Any, name: str) -> Any:
        return raw_variant.get(name) if isinstance(raw_variant, Mapping) else None

    outline = Outline(
        raw.get("defaults"),
        [
            (
                _where_variant(i, v),
                {k: x for k, x in v.items() if k not in VARIANT_KEYS},
            )
            for i, v in enumerate(variants)
            if isinstance(v, Mapping)
        ],
        raw.get("matrix"),
        [(_where_ref(origins[i], r), field(r, "id")) for i, r in enumerate(all_refs)],
        [(_where_variant(i, v), field(v, "id")) for i, v in enumerate(variants)],
        [(_where_variant(i, v), field(v, "only")) for i, v in enumerate(variants)],
        frozenset(
            name
            for name in ("references", "variants")
            if name in raw and not isinstance(raw[name], list)
        ),
    )
    return Draft(manifest, problems, outline)


def load_manifest(path: Path) -> Manifest:
    """Read a job manifest and check its shape (not its tasks: see
    `pipeline.validation.check.check_manifest`, which checks every task too).

    Raises:
        ManifestError: with every problem found, one ``FILE: WHERE: FIELD: message``
            line each; never a raw ValidationError.
    """
    draft = read_manifest(path)
    problems = [*draft.problems, *structure_problems(draft.outline)]
    if draft.manifest is None or problems:
        raise ManifestError([p.render(str(path)) for p in problems])
    return draft.manifest
