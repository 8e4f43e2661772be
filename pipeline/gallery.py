"""The static HTML contact sheet of a run dir: ``gallery.html`` plus ``thumbs/``;
one page for the run dirs of one job's shards (``remix gallery S0 S1 --out P``); or
runs compared key by key (``remix gallery NIGHT_A NIGHT_B``).

References run down the side (with the reference image itself), variants across,
matrix axis combinations as sub-columns (and selectable), one cell per task. The
page is a single file with inline CSS and JS, and everything it loads or links lives
under the run dir (reference images are copied in) by relative paths: it opens from
the file system, a zip or any web server, with no network or CDN. Thumbnails are
JPEGs made once with Pillow and lazy-loaded, so a 5,000-image run opens fast. Cell
details live in one JSON block with shared strings stored once; the page only ever
sets them as text, and Jinja2 escapes every text in the HTML: prompts and error
messages are user and server input.

This module hands plain data to the Jinja2 template ``assets/gallery.html.j2`` (which
inlines ``gallery.css`` and ``gallery.js``); :mod:`pipeline.gallery_grid` builds the
grid (from the journal and, when it still loads, the run's manifest) and
:mod:`pipeline.thumbnails` makes the thumbnails.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from pipeline.errors import ConfigError
from pipeline.gallery_grid import (
    CellStatus,
    GridCell,
    GridPlan,
    GridRef,
    cells_of,
    make_grid_thumbnails,
    plan_grid,
    split_pages,
)
from pipeline.ledger import parse_key
from pipeline.storage import safe_part, write_atomic_text_stream

if TYPE_CHECKING:
    from jinja2 import Template

log = logging.getLogger(__name__)

GALLERY_NAME: Final = "gallery.html"
PAGE_CELLS: Final = 2_000
"""Cells per gallery page (whole reference rows, so a page may hold a few more)."""


@cache
def _template() -> Template:
    """The page's Jinja2 template (``assets/gallery.html.j2``, CSS and JS inlined)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("pipeline", "assets"),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("gallery.html.j2")


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element: no ``</script>``, no ``<!--``."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


class _Strings:
    """Prompts and parameter sets repeat across references: store each once."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self._index: dict[str, int] = {}

    def ref(self, text: str | None) -> int | None:
        if text is None:
            return None
        found = self._index.get(text)
        if found is None:
            found = self._index[text] = len(self.table)
            self.table.append(text)
        return found


def _cell_data(cell: GridCell, strings: _Strings) -> dict[str, object]:
    """What the page's script shows of a cell (details panel, lightbox, picks)."""
    return {
        "k": cell.key,
        "s": cell.status,
        "t": cell.task_uuid,
        "p": strings.ref(cell.prompt),
        "n": strings.ref(cell.negative),
        "q": strings.ref(cell.params or None),
        "e": None if cell.error is None else list(cell.error),
        "i": [
            {
                "n": img.index,
                "f": img.href,
                "th": img.thumb,
                "seed": img.seed,
                "cost": img.cost,
                "u": img.image_uuid,
                "r": img.run,
            }
            for img in cell.images
        ],
    }


_STATUS_NOTE: Final[Mapping[str, str]] = {
    "pending": "in flight",
    "not-run": "not run yet",
    "partial": "partly done",
}


def _cell_view(
    cell: GridCell, index: int, variant: str, runs: Sequence[str], picked: bool
) -> dict[str, object]:
    """A cell as the template draws it."""
    images = [
        {
            "i": i,
            "href": img.href,
            "thumb": img.thumb if img.size is not None else None,
            "w": img.size[0] if img.size else None,
            "h": img.size[1] if img.size else None,
            "alt": f"{cell.key} #{img.index + 1}",
            "run": img.run,
            "run_label": None if img.run is None else runs[img.run],
        }
        for i, img in enumerate(cell.images)
    ]
    failed = cell.status == "failed" and cell.error is not None
    return {
        "c": index,
        "key": cell.key,
        "status": cell.status,
        "first": cell.combo == 0,
        "combo": cell.combo,
        "ref": cell.reference,
        "variant": variant,
        "images": images,
        "error": cell.error if failed else None,
        "note": None if failed else _STATUS_NOTE.get(cell.status),
        "picked": picked,
    }


def _ref_view(ref: GridRef) -> dict[str, object]:
    """A reference row's header as the template draws it."""
    label = "no local file" if ref.source is None else ref.source
    if len(label) > 60:
        label = label[:57] + "..."
    return {
        "id": ref.id,
        "thumb": ref.thumb if ref.size is not None else None,
        "href": ref.href,
        "w": ref.size[0] if ref.size else None,
        "h": ref.size[1] if ref.size else None,
        "source": ref.source or "",
        "label": label,
    }


def _axes_of(combos: Sequence[str]) -> dict[str, list[str]]:
    axes: dict[str, list[str]] = {}
    for combo in combos:
        for name, value in parse_key(f"_/_/{combo}")[2] if combo else ():
            values = axes.setdefault(name, [])
            if value not in values:
                values.append(value)
    return axes


def _summary(plan: GridPlan) -> str:
    statuses = plan.statuses
    bits = [
        f"{len(plan.refs)} references",
        f"{len(plan.variants)} variants",
        f"{plan.cells:,} tasks",
        f"{plan.images:,} images",
    ]
    labels: tuple[tuple[CellStatus, str], ...] = (
        ("failed", "failed"),
        ("pending", "in flight"),
        ("not-run", "not run"),
    )
    for status, label in labels:
        if n := statuses[status]:
            bits.append(f"{n:,} {label}")
    if plan.compare:
        bits.append("comparing " + " | ".join(plan.run_labels))
    elif len(plan.sources) > 1:
        given = ", ".join(str(s) for s in sorted(plan.shards, key=lambda s: s.index))
        bits.append(f"shards {given}")
    bits.append(f"${plan.spent_usd} spent")
    return " · ".join(bits)


def page_name(number: int) -> str:
    """Page ``number``'s file name: ``gallery.html``, then ``gallery-2.html``..."""
    return page_path(Path(GALLERY_NAME), number).name


def page_path(first: Path, number: int) -> Path:
    """Page ``number`` of the gallery whose first page is ``first``: ``P.html``,
    then ``P-2.html``..."""
    if number == 1:
        return first
    return first.with_name(f"{first.stem}-{number}{first.suffix}")


def _nav(
    first: Path, number: int, count: int, first_row: int, rows: int
) -> dict[str, object] | None:
    """Links between the pages (None when there is only one)."""
    if count <= 1:
        return None

    def href(n: int) -> str:
        return quote(page_path(first, n).name)

    last = first_row + rows
    return {
        "number": number,
        "count": count,
        "prev": href(number - 1) if number > 1 else None,
        "next": href(number + 1) if number < count else None,
        "pages": [
            {"number": n, "href": href(n), "current": n == number}
            for n in range(1, count + 1)
        ],
        "where": f"page {number} of {count}: references {first_row + 1:,} to {last:,}",
    }


def _store_key(plan: GridPlan) -> str:
    """Where the page keeps its picks in localStorage: one gallery (all its pages,
    wherever it is opened from) shares them; another run's gallery does not."""
    return "remix-picks:" + "|".join([plan.title, *plan.run_labels])


def _page_chunks(
    plan: GridPlan,
    references: Sequence[str],
    grid: dict[str, list[GridCell]],
    nav: dict[str, object] | None,
    picks: frozenset[str],
) -> Iterator[str]:
    """One page, streamed: the template draws rows as they are made, and each row's
    cells are dropped from ``grid``; what stays until the end is each cell's JSON text
    and the page's shared strings."""
    strings = _Strings()
    n_combos = len(plan.combos)
    data: list[str] = []

    def rows() -> Iterator[dict[str, object]]:
        for ref_id in references:
            by_pos = {(c.variant, c.combo): c for c in grid.pop(ref_id, ())}
            cells: list[dict[str, object] | None] = []
            for v, variant in enumerate(plan.variants):
                for i in range(n_combos):
                    cell = by_pos.get((v, i))
                    if cell is None:
                        cells.append(None)
                        continue
                    picked = cell.key in picks
                    view = _cell_view(cell, len(data), variant, plan.run_labels, picked)
                    cells.append(view)
                    data.append(_script_json(_cell_data(cell, strings)))
            yield {"ref": _ref_view(plan.refs[ref_id]), "cells": cells}

    def data_json() -> str:
        combos = [dict(parse_key(f"_/_/{c}")[2]) if c else {} for c in plan.combos]
        head = {
            "combos": combos,
            "strings": strings.table,
            "runs": plan.run_labels if plan.compare else [],
            "picks": sorted(picks),
        }
        return _script_json(head)[:-1] + ',"cells":[' + ",".join(data) + "]}"

    page = {
        "title": plan.title,
        "summary": _summary(plan),
        "store": _store_key(plan),
        "nav": nav,
        "axes": [
            {"name": name, "choices": values}
            for name, values in _axes_of(plan.combos).items()
            if len(values) > 1
        ],
        "variants": plan.variants,
        "combos": [c.split(",") if c else [] for c in plan.combos],
        "empty": not plan.cells,
        "run_dirs": ", ".join(str(d) for d in plan.run_dirs),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    yield from _template().generate(page=page, rows=rows(), data_json=data_json)


@dataclass(frozen=True)
class Picks:
    """Task keys a designer starred, and the file they came from (for messages)."""

    keys: frozenset[str]
    source: Path | None = None


def load_picks(path: Path) -> Picks:
    """The picks of a file the gallery exported (JSON ``{"picks": [{"key": ...}]}``),
    a JSON list of keys, or a CSV with a ``key`` column.

    Raises:
        ConfigError: the file cannot be read or is not a picks file; names the file.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"picks file {path}: cannot read it ({exc})") from None
    keys: list[object]
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and "key" not in rows[0]:
            raise ConfigError(f"picks file {path}: no 'key' column")
        keys = [row["key"] for row in rows]
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"picks file {path}: not JSON ({exc})") from None
        found = data.get("picks") if isinstance(data, dict) else data
        if not isinstance(found, list):
            raise ConfigError(
                f"picks file {path}: expected a gallery export "
                '({"picks": [{"key": ...}, ...]}) or a list of keys'
            )
        keys = [item.get("key") if isinstance(item, dict) else item for item in found]
    bad = [k for k in keys if not isinstance(k, str) or not k]
    if bad:
        raise ConfigError(f"picks file {path}: {len(bad)} pick(s) without a task key")
    return Picks(frozenset(str(k) for k in keys), path)


def _check_picks(plan: GridPlan, picks: Picks) -> None:
    """Picks of another gallery would mark nothing: say so rather than ignore them."""
    known = {key for row in plan.rows.values() for key in row}
    unknown = sorted(picks.keys - known)
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        where = f"picks file {picks.source}" if picks.source else "picks"
        raise ConfigError(
            f"{where}: {len(unknown)} key(s) not in these run dirs ({shown})"
        )


def _remove_stale_pages(first: Path, count: int) -> None:
    """Drop ``P-N.html`` pages beyond ``count`` left by a bigger earlier grid."""
    for path in first.parent.glob(f"{first.stem}-*{first.suffix}"):
        number = path.name[len(first.stem) + 1 : len(path.name) - len(first.suffix)]
        if number.isdigit() and int(number) > count:
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove old gallery page %s: %s", path, exc)


def write_gallery(
    run_dir: Path, *, page_cells: int = PAGE_CELLS, picks: Picks | None = None
) -> Path:
    """Write ``RUN_DIR/gallery.html`` (and its other pages, missing thumbnails).

    Pages hold whole reference rows, about ``page_cells`` cells each, and are
    built one at a time: memory grows with the page, not with the run. Returns
    the first page's path.

    Raises:
        StorageError: a page could not be written.
    """
    return write_job_gallery([run_dir], page_cells=page_cells, picks=picks)


def default_gallery_path(run_dirs: Sequence[Path], title: str) -> Path:
    """``RUN_DIR/gallery.html`` for one run dir; for several (one job's shards, or
    runs compared), ``JOB-gallery.html`` in the directory that holds them all."""
    if len(run_dirs) == 1:
        return run_dirs[0] / GALLERY_NAME
    parent = Path(os.path.commonpath([d.resolve() for d in run_dirs]))
    if parent in {d.resolve() for d in run_dirs}:  # one run dir inside another
        parent = parent.parent
    return parent / f"{safe_part(title)}-gallery.html"


def write_job_gallery(
    run_dirs: Sequence[Path],
    *,
    out: Path | None = None,
    page_cells: int = PAGE_CELLS,
    picks: Picks | None = None,
) -> Path:
    """Write one gallery of ``run_dirs`` at ``out`` (default:
    :func:`default_gallery_path`), its later pages beside it as ``OUT-2.html``...;
    thumbnails go in each image's run dir. One job's shards make one grid; other
    run dirs are compared, key by key. ``picks`` (task keys) show starred.
    Returns ``out``.

    Raises:
        ConfigError: several run dirs that are neither one job's shards nor
            distinct runs to compare; picks of keys these run dirs do not have.
        StorageError: a page could not be written.
    """
    plan = plan_grid(run_dirs)
    if picks is not None:
        _check_picks(plan, picks)
    target = out or default_gallery_path(run_dirs, plan.title)
    page_dir = target.parent
    plan.place(page_dir)
    pages = split_pages(plan, page_cells)
    picked = picks.keys if picks is not None else frozenset()
    first_row = 0
    with plan.reading():
        for number, references in enumerate(pages, 1):
            grid = cells_of(plan, references) if plan.has_tasks else {}
            make_grid_thumbnails(page_dir, grid, [plan.refs[r] for r in references])
            nav = _nav(target, number, len(pages), first_row, len(references))
            write_atomic_text_stream(
                page_path(target, number),
                _page_chunks(plan, references, grid, nav, picked),
            )
            del grid
            first_row += len(references)
    _remove_stale_pages(target, len(pages))
    log.info("gallery %s: %d cell(s), %d page(s)", target, plan.cells, len(pages))
    return target
