"""Job manifest models and loading (TOML plus CSV/JSONL reference lists).

A manifest names references (images), variants (wire parameters) and an optional matrix
of axes. This module checks its *shape*, reporting every problem at once: types, ids,
unknown or reserved parameter names, matrix paths, the reference list files. Per-task
checks (value ranges, template variables, image files) live in
`expand.validate_manifest`, which runs every task.

Problems render as ``FILE: WHERE: FIELD: message``, e.g.
``jobs/x.toml: variants[1] (id=deco): providerSettings.ideogram.remixStrenght: unknown
parameter 'remixStrenght' (did you mean remixStrength?)``.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
from pipeline.wire import MODEL_AIR, ImageInferenceRequest, image_ref_kind

ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Reference, variant and job ids: they become parts of task keys and file paths."""
VAR_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCHEME: Final = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|data:)")

STYLE_REFS_PATH: Final = ("providerSettings", "ideogram", "styleReferenceImages")
"""The one parameter besides the reference that may name local image files."""

RESERVED: Final[Mapping[str, str]] = {
    "taskType": "remix always sends imageInference",
    "taskUUID": "remix gives every task its own taskUUID",
    "deliveryMethod": "remix always submits with async delivery and polls",
    "includeCost": "remix always asks for the cost, for the ledger",
    "inputs": "the reference image comes from [[references]]",
    "model": "set the model once in [job] model",
}
"""Wire parameters remix sets itself; a manifest may not."""

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


# ---------------------------------------------------------------------------
# The wire parameter tree: which keys exist, for unknown-key and matrix-path checks


@dataclass(frozen=True, slots=True)
class WireField:
    children: Mapping[str, WireField] | None
    """Nested parameters when the field is an object (or a list of objects)."""
    is_list: bool


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _nested_model(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, is_list = _nested_model(arg)
            if model is not None:
                return model, is_list
        return None, False
    if origin is list:
        model, _ = _nested_model(typing.get_args(annotation)[0])
        return model, model is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _wire_tree(model: type[BaseModel]) -> dict[str, WireField]:
    tree: dict[str, WireField] = {}
    for name, info in model.model_fields.items():
        sub, is_list = _nested_model(info.annotation)
        children = None if sub is None else _wire_tree(sub)
        tree[info.alias or name] = WireField(children, is_list)
    return tree


WIRE_TREE: Final = _wire_tree(ImageInferenceRequest)


def _unknown(key: str, tree: Mapping[str, WireField], top: bool) -> str:
    known = [k for k in tree if not (top and k in RESERVED)]
    squashed = key.replace("_", "").lower()
    same = [k for k in known if k.lower() == squashed]
    if same:
        hint = f" (parameters are spelled as on the wire: {same[0]})"
    else:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown parameter '{key}'{hint}"


def _reserved(key: str) -> str:
    return f"'{key}' is reserved: {RESERVED[key]}; remove it"


def parameter_problems(
    table: Mapping[str, Any],
    prefix: tuple[str, ...] = (),
    tree: Mapping[str, WireField] = WIRE_TREE,
) -> list[tuple[str, str]]:
    """(field path, message) for every unknown or reserved key in a parameter table."""
    out: list[tuple[str, str]] = []
    for key, value in table.items():
        path = (*prefix, str(key))
        dotted = ".".join(path)
        if not prefix and key in RESERVED:
            out.append((dotted, _reserved(key)))
            continue
        field = tree.get(key)
        if field is None:
            out.append((dotted, _unknown(key, tree, top=not prefix)))
        elif field.children is not None:
            out.extend(_value_problems(value, path, field))
    return out


def _value_problems(
    value: Any, path: tuple[str, ...], field: WireField
) -> list[tuple[str, str]]:
    if field.children is None:
        return []
    if field.is_list:
        out: list[tuple[str, str]] = []
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    out.extend(
                        parameter_problems(item, (*path, str(i)), field.children)
                    )
        return out
    if isinstance(value, Mapping):
        return parameter_problems(value, path, field.children)
    return []


def _matrix_field(path: str) -> WireField | str:
    """The wire field an axis path names, or why it names none."""
    segs = path.split(".")
    if not all(segs):
        return (
            "an axis is a dotted wire path like providerSettings.ideogram.remixStrength"
        )
    if segs[0] in RESERVED:
        return _reserved(segs[0])
    tree: Mapping[str, WireField] | None = WIRE_TREE
    field: WireField | None = None
    for i, seg in enumerate(segs):
        if field is not None and field.is_list:
            return (
                f"cannot point inside the list '{'.'.join(segs[:i])}': "
                "give whole lists as axis values"
            )
        if tree is None:
            return f"'{'.'.join(segs[:i])}' is a value, it has no parameters inside"
        field = tree.get(seg)
        if field is None:
            return _unknown(seg, tree, top=i == 0)
        tree = field.children
    assert field is not None  # segs is non-empty
    return field


class Problem(NamedTuple):
    """One problem; `file` overrides the manifest path (a CSV/JSONL line)."""

    where: str
    field: str
    message: str
    file: str | None = None

    def render(self, manifest_file: str) -> str:
        parts = [self.file or manifest_file, self.where, self.field, self.message]
        return ": ".join(p for p in parts if p)


def structure_problems(
    defaults: Any,
    variants: Sequence[tuple[str, Any]],
    matrix: Any,
    reference_ids: Sequence[tuple[Problem, Any]],
    variant_ids: Sequence[tuple[str, Any]],
    variant_only: Sequence[tuple[str, Any]] = (),
) -> list[Problem]:
    """Shape problems pydantic cannot see: keys against the wire, duplicates, emptiness.

    Works on raw TOML data as well as on a `Manifest`, so `load_manifest` reports them
    alongside type errors. `reference_ids` pairs a where-template (Problem) with the id.
    """
    out: list[Problem] = []
    if not reference_ids:
        out.append(
            Problem(
                "references",
                "",
                "no references: add [[references]] tables or a "
                "[references_from] csv/jsonl file",
            )
        )
    if not variant_ids:
        out.append(
            Problem("variants", "", "no variants: add at least one [[variants]] table")
        )
    first_ref: dict[str, Problem] = {}
    for where, ref_id in reference_ids:
        if not isinstance(ref_id, str):
            continue
        if ref_id in first_ref:
            seen = first_ref[ref_id]
            origin = f"{seen.file}: {seen.where}" if seen.file else seen.where
            out.append(
                where._replace(
                    field="id",
                    message=f"duplicate reference id '{ref_id}' (also {origin})",
                )
            )
        else:
            first_ref[ref_id] = where
    first_var: dict[str, str] = {}
    for vwhere, var_id in variant_ids:
        if not isinstance(var_id, str):
            continue
        if var_id in first_var:
            msg = f"duplicate variant id '{var_id}' (also {first_var[var_id]})"
            out.append(Problem(vwhere, "id", msg))
        else:
            first_var[var_id] = vwhere
    for vwhere, only in variant_only:
        if isinstance(only, list):
            if not only:
                msg = "lists no reference: remove it to use every reference"
                out.append(Problem(vwhere, "only", msg))
            for ref_id in only:
                if isinstance(ref_id, str) and ref_id not in first_ref:
                    msg = f"no reference has the id '{ref_id}'"
                    out.append(Problem(vwhere, "only", msg))
    if isinstance(defaults, Mapping):
        out.extend(Problem("defaults", f, m) for f, m in parameter_problems(defaults))
    for vwhere, params in variants:
        if isinstance(params, Mapping):
            out.extend(Problem(vwhere, f, m) for f, m in parameter_problems(params))
    if isinstance(matrix, Mapping):
        out.extend(_matrix_problems(matrix))
    return out


def _matrix_problems(matrix: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    paths = list(matrix)
    for path, values in matrix.items():
        field = _matrix_field(path)
        if isinstance(field, str):
            out.append(Problem("matrix", path, field))
            continue
        if isinstance(values, list):
            if not values:
                out.append(
                    Problem("matrix", path, "axis has no values: give at least one")
                )
            for i, value in enumerate(values):
                out.extend(
                    Problem("matrix", f"{path}[{i}]" + f[len(path) :], m)
                    for f, m in _value_problems(value, tuple(path.split(".")), field)
                )
        for other in paths:
            if other != path and other.startswith(path + "."):
                msg = f"overlaps the axis '{other}': one axis may not contain another"
                out.append(Problem("matrix", path, msg))
    return out


def manifest_problems(manifest: Manifest) -> list[Problem]:
    """`structure_problems` of a built manifest."""
    return structure_problems(
        manifest.defaults,
        [
            (manifest.variant_where(i), v.params)
            for i, v in enumerate(manifest.variants)
        ],
        manifest.matrix,
        [
            (Problem(manifest.reference_where(i), "", ""), r.id)
            for i, r in enumerate(manifest.references)
        ],
        [(manifest.variant_where(i), v.id) for i, v in enumerate(manifest.variants)],
        [(manifest.variant_where(i), v.only) for i, v in enumerate(manifest.variants)],
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


def load_manifest(path: Path, *, collect: list[str] | None = None) -> Manifest:
    """Read and check a job manifest and its reference list file.

    Args:
        collect: when given, shape problems of a manifest that still builds are
            appended here instead of raised, so the caller can report them together
            with the per-task problems of ``validate_manifest``.

    Raises:
        ManifestError: with every problem found, one ``FILE: WHERE: FIELD: message``
            line each; never a raw ValidationError.
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

    problems += structure_problems(
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
        [
            (_where_ref(origins[i], r), r.get("id") if isinstance(r, Mapping) else None)
            for i, r in enumerate(all_refs)
        ],
        [
            (_where_variant(i, v), v.get("id") if isinstance(v, Mapping) else None)
            for i, v in enumerate(variants)
        ],
        [
            (_where_variant(i, v), v.get("only") if isinstance(v, Mapping) else None)
            for i, v in enumerate(variants)
        ],
    )
    if manifest is None or (problems and collect is None):
        raise ManifestError([p.render(shown) for p in problems])
    if collect is not None:
        collect += [p.render(shown) for p in problems]
    for ref, origin in zip(manifest.references, origins, strict=True):
        if origin.file is not None:
            ref._where = f"{origin.file} {origin.label} (id={ref.id})"
    return manifest
