"""The static HTML contact sheet of a run dir: ``gallery.html`` plus ``thumbs/``;
or one page for the run dirs of one job's shards (``remix gallery S0 S1 --out P``).

References run down the side (with the reference image itself), variants across,
matrix axis combinations as sub-columns (and selectable), one cell per task. The
page is a single file with inline CSS and JS: it opens from the file system with no
server, network or CDN. Thumbnails are JPEGs made once with Pillow (kept while newer
than their image) and lazy-loaded, so a 5,000-image run opens fast. Cell details
(prompt, parameters, seed, cost, error) live in one JSON block with shared strings
stored once; the page only ever sets them as text, and every text in the HTML is
escaped: prompts and error messages are user and server input.

This module renders; :mod:`pipeline.gallery_grid` builds the grid (from the journal
and, when it still loads, the run's manifest) and :mod:`pipeline.thumbnails` makes the
thumbnails. The page's template, CSS and JS are package data in ``pipeline/assets``,
inlined into each page as it is written.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Final

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

log = logging.getLogger(__name__)

GALLERY_NAME: Final = "gallery.html"
PAGE_CELLS: Final = 2_000
"""Cells per gallery page (whole reference rows, so a page may hold a few more)."""


@cache
def _asset(name: str) -> str:
    """A file of ``pipeline/assets`` (the page's template, CSS and JS)."""
    return (files("pipeline") / "assets" / name).read_text(encoding="utf-8")


def _page_parts() -> tuple[str, str, str]:
    """The page template cut around its rows and its data: head, foot, tail."""
    head, _, rest = _asset("gallery.html").partition("{rows}")
    foot, _, tail = rest.partition("{data}")
    return head, foot, tail


# ---------------------------------------------------------------------------
# HTML


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


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
            }
            for img in cell.images
        ],
    }


_STATUS_NOTE: Final[Mapping[str, str]] = {
    "pending": "in flight",
    "not-run": "not run yet",
}


def _cell_html(cell: GridCell, index: int, variant: str) -> str:
    first = " first" if cell.combo == 0 else ""
    attrs = (
        f'class="cell {cell.status}{first}" data-c="{index}" '
        f'data-combo="{cell.combo}" '
        f'data-ref="{_e(cell.reference)}" data-variant="{_e(variant)}" '
        f'data-key="{_e(cell.key)}" tabindex="0"'
    )
    parts: list[str] = []
    multi = " multi" if len(cell.images) > 1 else ""
    if cell.images:
        parts.append(f'<div class="imgs{multi}">')
        for i, img in enumerate(cell.images):
            alt = _e(f"{cell.key} #{img.index + 1}")
            thumb = img.thumb
            if thumb is None or img.size is None:
                parts.append(
                    f'<a class="missing" data-i="{i}" href="{_e(img.href)}">'
                    "image missing or unreadable</a>"
                )
                continue
            w, h = img.size
            parts.append(
                f'<a data-i="{i}" href="{_e(img.href)}" target="_blank">'
                f'<img src="{_e(thumb)}" width="{w}" height="{h}" alt="{alt}" '
                'loading="lazy" decoding="async"></a>'
            )
        parts.append("</div>")
    if cell.status == "failed" and cell.error is not None:
        code, message = cell.error
        parts.append(
            f'<div class="fail"><b>failed</b> <code>{_e(code)}</code>'
            f'<span class="msg">{_e(message)}</span></div>'
        )
    elif note := _STATUS_NOTE.get(cell.status):
        parts.append(f'<div class="note">{_e(note)}</div>')
    elif cell.status == "partial":
        parts.append('<div class="note">partly done</div>')
    return f"<td {attrs}>{''.join(parts)}</td>"


def _ref_html(ref: GridRef) -> str:
    thumb = ref.thumb
    if thumb is not None and ref.size is not None:
        w, h = ref.size
        href = ref.local.as_uri() if ref.local is not None else thumb
        image = (
            f'<a href="{_e(href)}" target="_blank"><img src="{_e(thumb)}" '
            f'width="{w}" height="{h}" alt="reference {_e(ref.id)}" '
            'loading="lazy" decoding="async"></a>'
        )
    else:
        label = "no local file" if ref.source is None else ref.source
        if len(label) > 60:
            label = label[:57] + "..."
        image = f'<div class="ph" title="{_e(ref.source or "")}">{_e(label)}</div>'
    return f'<th class="ref" scope="row">{image}<span>{_e(ref.id)}</span></th>'


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
    if len(plan.sources) > 1:
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


def _nav(first: Path, number: int, count: int, first_row: int, rows: int) -> str:
    """Links between the pages (nothing when there is only one)."""
    if count <= 1:
        return ""

    def link(n: int, text: str, rel: str = "") -> str:
        extra = f' rel="{rel}"' if rel else ""
        return f'<a href="{_e(page_path(first, n).name)}"{extra}>{text}</a>'

    prev = link(number - 1, "\u2039 prev", "prev") if number > 1 else ""
    nxt = link(number + 1, "next \u203a", "next") if number < count else ""
    pages = " ".join(
        f'<b aria-current="page">{n}</b>' if n == number else link(n, str(n))
        for n in range(1, count + 1)
    )
    last = first_row + rows
    where = f"page {number} of {count}: references {first_row + 1:,} to {last:,}"
    return (
        f'<nav class="pages" aria-label="pages" data-page="{number}" '
        f'data-pages="{count}">{prev} {pages} {nxt} '
        f'<span class="dim">{_e(where)}</span></nav>'
    )


def _page_chunks(
    plan: GridPlan, references: Sequence[str], grid: dict[str, list[GridCell]], nav: str
) -> Iterator[str]:
    """One page in pieces: the header, these reference rows, their cells' details.

    Rows go out as they are made and their cells are dropped from ``grid``; what
    stays until the end is each cell's JSON text and the page's shared strings.
    """
    strings = _Strings()
    n_combos = len(plan.combos)
    head1 = "".join(
        f'<th class="variant" colspan="{n_combos}" scope="colgroup">{_e(v)}</th>'
        for v in plan.variants
    )
    head2 = "".join(
        f'<th class="combo{" first" if i == 0 else ""}" '
        f'data-combo="{i}" scope="col">'
        + (
            "<br>".join(_e(part) for part in c.split(","))
            if c
            else '<span class="dim">—</span>'
        )
        + "</th>"
        for _ in plan.variants
        for i, c in enumerate(plan.combos)
    )
    axes = _axes_of(plan.combos)
    filters = "".join(
        f'<label>{_e(name)} <select data-axis="{_e(name)}">'
        '<option value="">all</option>'
        + "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in values)
        + "</select></label>"
        for name, values in axes.items()
        if len(values) > 1
    )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    empty = (
        ""
        if plan.cells
        else '<p class="nothing">No tasks in this run yet: run it, then regenerate '
        "the gallery with <code>remix gallery RUN_DIR</code>.</p>"
    )
    page_head, page_foot, page_tail = _page_parts()
    yield page_head.format(
        title=_e(plan.title),
        summary=_e(_summary(plan)),
        filters=filters,
        nav=nav,
        head1=head1,
        head2=head2,
        empty=empty,
        css=_asset("gallery.css"),
    )
    data: list[str] = []
    for number, ref_id in enumerate(references):
        by_pos = {(c.variant, c.combo): c for c in grid.pop(ref_id, ())}
        tds: list[str] = []
        for v, variant in enumerate(plan.variants):
            for i in range(n_combos):
                cell = by_pos.get((v, i))
                if cell is None:
                    first = " first" if i == 0 else ""
                    tds.append(f'<td class="empty{first}" data-combo="{i}"></td>')
                    continue
                tds.append(_cell_html(cell, len(data), variant))
                data.append(_script_json(_cell_data(cell, strings)))
        newline = "\n" if number else ""
        yield f"{newline}<tr>{_ref_html(plan.refs[ref_id])}{''.join(tds)}</tr>"
    run_dirs = ", ".join(str(d) for d in plan.run_dirs)
    yield page_foot.format(run_dir=_e(run_dirs), generated=_e(generated))
    combos = [dict(parse_key(f"_/_/{c}")[2]) if c else {} for c in plan.combos]
    # The JSON of {"combos", "strings", "cells"}, the cells' parts made above.
    yield f'{{"combos":{_script_json(combos)},"strings":{_script_json(strings.table)}'
    yield ',"cells":['
    yield ",".join(data)
    yield "]}"
    yield page_tail.format(js=_asset("gallery.js"))


def _remove_stale_pages(first: Path, count: int) -> None:
    """Drop ``P-N.html`` pages beyond ``count`` left by a bigger earlier grid."""
    for path in first.parent.glob(f"{first.stem}-*{first.suffix}"):
        number = path.name[len(first.stem) + 1 : len(path.name) - len(first.suffix)]
        if number.isdigit() and int(number) > count:
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove old gallery page %s: %s", path, exc)


def write_gallery(run_dir: Path, *, page_cells: int = PAGE_CELLS) -> Path:
    """Write ``RUN_DIR/gallery.html`` (and its other pages, missing thumbnails).

    Pages hold whole reference rows, about ``page_cells`` cells each, and are
    built one at a time: memory grows with the page, not with the run. Returns
    the first page's path.

    Raises:
        StorageError: a page could not be written.
    """
    return write_job_gallery([run_dir], page_cells=page_cells)


def default_gallery_path(run_dirs: Sequence[Path], title: str) -> Path:
    """``RUN_DIR/gallery.html`` for one run dir; for several (one job's shards),
    ``JOB-gallery.html`` in the directory that holds them all."""
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
) -> Path:
    """Write one gallery of ``run_dirs`` (a run dir, or one job's shards) at ``out``
    (default: :func:`default_gallery_path`), its later pages beside it as
    ``OUT-2.html``...; thumbnails go in each image's run dir. Returns ``out``.

    Raises:
        ConfigError: several run dirs that are not distinct shards of one manifest.
        StorageError: a page could not be written.
    """
    plan = plan_grid(run_dirs)
    target = out or default_gallery_path(run_dirs, plan.title)
    page_dir = target.parent
    plan.place(page_dir)
    pages = split_pages(plan, page_cells)
    first_row = 0
    with plan.reading():
        for number, references in enumerate(pages, 1):
            grid = cells_of(plan, references) if plan.has_tasks else {}
            make_grid_thumbnails(page_dir, grid, [plan.refs[r] for r in references])
            nav = _nav(target, number, len(pages), first_row, len(references))
            write_atomic_text_stream(
                page_path(target, number),
                _page_chunks(plan, references, grid, nav),
            )
            del grid
            first_row += len(references)
    _remove_stale_pages(target, len(pages))
    log.info("gallery %s: %d cell(s), %d page(s)", target, plan.cells, len(pages))
    return target
