"""The expansion plan: how a manifest becomes parameter sets, keys and prompts.

Pure data work, no files: `expand` walks it to produce tasks and the validation
package walks it to check them, so both see the same merged parameters, keys and
templates. A task's parameters merge defaults < variant < matrix (nested tables merged
key by key; a ``colorPalette`` is replaced whole, since it is either a preset or custom
members).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from pipeline.manifest import (
    STYLE_REFS_PATH,
    Manifest,
    Reference,
    Variant,
    is_local_image,
)

PROMPT_FIELDS: Final = ("positivePrompt", "negativePrompt")

_ATOMIC: Final = frozenset({("providerSettings", "ideogram", "colorPalette")})
"""Tables replaced whole when merged: a palette is a preset name *or* members."""


def substitute_images(
    params: Mapping[str, Any], swap: Mapping[str, str]
) -> dict[str, Any]:
    """A copy of params with image strings swapped (local paths -> uploaded UUIDs).

    Only the two image lists are rebuilt; other nested tables stay shared.
    """
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
# Axes and parameter sets


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
class ParamSet:
    """What every task of one (variant, axis values) pair shares."""

    params: dict[str, Any]
    """Merged parameters; prompts still templates; no model or inputs yet."""
    axes: tuple[tuple[str, str], ...]
    axes_part: str
    templates: Mapping[str, Template | str]
    style_files: tuple[Path, ...]
    images: int
    rendering_speed: str | None


class Plan:
    """Axes and merged variant parameters, computed once per manifest."""

    def __init__(
        self, manifest: Manifest, inert_axes: frozenset[str] = frozenset()
    ) -> None:
        """`inert_axes`: dotted axis paths whose values still make task keys but are
        not applied to the parameters (validation passes those naming no field)."""
        self.manifest = manifest
        self.axes = axes_of(manifest)
        self._applied = [".".join(a.path) not in inert_axes for a in self.axes]
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

    def param_set(self, vi: int, combo: tuple[int, ...]) -> ParamSet:
        params = dict(self._variant_params[vi])
        for axis, i, applied in zip(self.axes, combo, self._applied, strict=True):
            if applied:
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
        return ParamSet(
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

    def key(self, ref_id: str, variant_id: str, pset: ParamSet) -> str:
        if pset.axes_part:
            return f"{ref_id}/{variant_id}/{pset.axes_part}"
        return f"{ref_id}/{variant_id}"

    @staticmethod
    def template_values(
        ref_vars: Mapping[str, str], ref_id: str, variant_id: str, pset: ParamSet
    ) -> dict[str, str]:
        values = {name: value for name, value in pset.axes if name.isidentifier()}
        values["reference"] = ref_id
        values["variant"] = variant_id
        values.update(ref_vars)
        return values


def unknown_vars(missing: Sequence[str], values: Mapping[str, str]) -> str:
    """The message for placeholders a task has no value for."""
    names = ", ".join(f"{{{n}}}" for n in missing)
    known = ", ".join(sorted(values))
    return f"unknown template variable {names}; known here: {known}"
