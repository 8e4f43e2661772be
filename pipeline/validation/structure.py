"""Shape checks pydantic cannot see: ids, duplicates, parameter names, matrix paths.

They work on an `Outline` (the parts of a manifest these checks look at, each with
where it was written), which `pipeline.manifest` builds from raw TOML data (so they
run even when the manifest does not build) or from a built `Manifest`. This is the one
check of parameter *names*: unknown and reserved keys are found here, against a tree
derived from the wire models, and the wire check of the tasks leaves them alone.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, NamedTuple

from pydantic import BaseModel

from pipeline.validation.problems import Problem
from pipeline.wire import ImageInferenceRequest

RESERVED: Final[Mapping[str, str]] = {
    "taskType": "remix always sends imageInference",
    "taskUUID": "remix gives every task its own taskUUID",
    "deliveryMethod": "remix always submits with async delivery and polls",
    "includeCost": "remix always asks for the cost, for the ledger",
    "inputs": "the reference image comes from [[references]]",
    "model": "set the model once in [job] model",
}
"""Wire parameters remix sets itself; a manifest may not."""


class Outline(NamedTuple):
    """What the shape checks read, each part paired with where it was written."""

    defaults: Any
    variants: Sequence[tuple[str, Any]]
    """(where, wire parameters) of each variant table."""
    matrix: Any
    reference_ids: Sequence[tuple[Problem, Any]]
    """(where-template, id): a list line's Problem carries its file."""
    variant_ids: Sequence[tuple[str, Any]]
    variant_only: Sequence[tuple[str, Any]] = ()
    not_lists: frozenset[str] = frozenset()
    """Tables given as something other than a list: the types report those, so
    they are not also reported as empty."""


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


def structure_problems(outline: Outline) -> list[Problem]:
    """Every shape problem of a manifest: ids, emptiness, parameter names, axes."""
    defaults, variants, matrix, reference_ids, variant_ids, variant_only, odd = outline
    out: list[Problem] = []
    if not reference_ids and "references" not in odd:
        out.append(
            Problem(
                "references",
                "",
                "no references: add [[references]] tables or a "
                "[references_from] csv/jsonl file",
            )
        )
    if not variant_ids and "variants" not in odd:
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
            for ref_id in dict.fromkeys(x for x in only if isinstance(x, Hashable)):
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


def unusable_axes(matrix: Mapping[str, Any]) -> frozenset[str]:
    """Axis paths that name no settable wire field (reported by `structure_problems`).

    The task checks leave their values out of the parameters: applied, they would
    only make follow-on wire errors of the same mistake.
    """
    return frozenset(p for p in matrix if isinstance(_matrix_field(p), str))
