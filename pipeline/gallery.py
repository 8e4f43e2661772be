"""The static HTML contact sheet of a run dir: ``gallery.html`` plus ``thumbs/``.

References run down the side (with the reference image itself), variants across,
matrix axis combinations as sub-columns (and selectable), one cell per task. The
page is a single file with inline CSS and JS: it opens from the file system with no
server, network or CDN. Thumbnails are JPEGs made once with Pillow (kept while newer
than their image) and lazy-loaded, so a 5,000-image run opens fast. Cell details
(prompt, parameters, seed, cost, error) live in one JSON block with shared strings
stored once; the page only ever sets them as text, and every text in the HTML is
escaped: prompts and error messages are user and server input.

The grid comes from the journal; the run's manifest (its path is in run.json), when it
still loads, adds the reference images, the manifest's order, the prompts of tasks
without a sidecar, and the tasks not run yet. Without it the page still works.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final, Literal, TypeVar

from PIL import Image, ImageOps

from pipeline.errors import ConfigError, PipelineError
from pipeline.expand import count_tasks, expand
from pipeline.journal import JOURNAL_NAME, CompletedEvent, FailedEvent
from pipeline.manifest import Manifest, load_manifest
from pipeline.report import JournalIndex, KeyFacts, parse_key, scan_journal
from pipeline.rundir import read_run_info
from pipeline.shard import Shard
from pipeline.storage import safe_part, sidecar_path, write_atomic_text_stream

log = logging.getLogger(__name__)

GALLERY_NAME: Final = "gallery.html"
THUMBS_DIR: Final = "thumbs"
THUMB_WIDTH: Final = 320
"""Thumbnail width in pixels (2x the default cell width, for sharp HiDPI display)."""
PAGE_CELLS: Final = 2_000
"""Cells per gallery page (whole reference rows, so a page may hold a few more)."""
MAX_EXPAND: Final = 20_000
"""Expand the manifest (not-run cells, prompts of failed tasks) up to this size."""
_JPEG_QUALITY: Final = 85
_THUMB_CHUNK: Final = 64
"""Thumbnails per thread-pool work item, at most."""
_NOISE_PARAMS: Final = frozenset(
    {
        "positivePrompt",
        "negativePrompt",
        "taskType",
        "taskUUID",
        "deliveryMethod",
        "includeCost",
    }
)
"""Wire keys the details panel shows elsewhere or that say nothing about the look."""

CellStatus = Literal["done", "partial", "failed", "pending", "not-run"]

_T = TypeVar("_T")
_R = TypeVar("_R")


# ---------------------------------------------------------------------------
# Thumbnails


def thumb_relpath(image_relpath: str) -> PurePosixPath:
    """Where the thumbnail of ``images/...`` goes: ``thumbs/images/....jpg``."""
    return PurePosixPath(THUMBS_DIR, image_relpath).with_suffix(".jpg")


def make_thumbnail(
    src: Path, dst: Path, *, width: int = THUMB_WIDTH
) -> tuple[int, int]:
    """Write a JPEG thumbnail of ``src`` (``width`` wide at most); return its size.

    Skipped when ``dst`` is at least as new as ``src``. The ICC profile is kept and
    transparency is laid on neutral grey, so colours are not shifted.

    Raises:
        OSError: ``src`` cannot be read or is not an image, or ``dst`` cannot be
            written.
    """
    try:
        if dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            with Image.open(dst) as done:
                return done.size
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.debug("thumbnail %s unreadable, rebuilding: %s", dst, exc)
    with Image.open(src) as opened:
        w, h = opened.size
        if w > width:
            # JPEG: decode at a reduced scale, far faster for big images.
            opened.draft("RGB", (width, max(1, h * width // w)))
        icc = opened.info.get("icc_profile")
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (128, 128, 128))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.thumbnail((width, width * 4), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True, icc_profile=icc)
        size = image.size
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Thumbnails are derived data: a rename keeps them whole, no fsync needed.
    tmp = dst.with_name(dst.name + ".part")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave a half thumbnail behind
        raise
    return size


def _thumb_or_none(src: Path, dst: Path) -> tuple[int, int] | None:
    try:
        return make_thumbnail(src, dst)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("no thumbnail for %s: %s", src, exc)
        return None


def _in_threads(func: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``func`` over ``items`` in up to 8 threads, results in order.

    Work goes out in a few dozen chunks, not one future per item: a future costs a
    couple of KB, which a 2,000-image page would otherwise hold all at once.
    """
    if not items:
        return []
    workers = min(8, os.cpu_count() or 1, len(items))
    size = max(1, min(_THUMB_CHUNK, -(-len(items) // (workers * 4))))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    results: list[_R] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(lambda chunk: [func(item) for item in chunk], chunks):
            results.extend(done)
    return results


def make_thumbnails(pairs: Sequence[tuple[Path, Path]]) -> list[tuple[int, int] | None]:
    """Thumbnails for ``(src, dst)`` pairs, in parallel threads; None where unreadable.

    Pillow releases the GIL while decoding and resizing, so threads scale.
    """
    return _in_threads(lambda pair: _thumb_or_none(*pair), pairs)


# ---------------------------------------------------------------------------
# The grid model


@dataclass(slots=True)
class _Img:
    index: int
    path: str
    """Relative to the run dir."""
    seed: int | None
    cost: str | None
    """USD, as the journal has it."""
    image_uuid: str
    size: tuple[int, int] | None = None
    """The thumbnail's size; None: no thumbnail (image missing or unreadable)."""

    @property
    def thumb(self) -> str | None:
        """The thumbnail's path relative to the run dir, when there is one."""
        return None if self.size is None else thumb_relpath(self.path).as_posix()


@dataclass(slots=True)
class _Cell:
    key: str
    reference: str
    variant: int
    """Index into the plan's variants."""
    combo: int
    """Index into the plan's combos."""
    status: CellStatus
    task_uuid: str | None = None
    prompt: str | None = None
    negative: str | None = None
    params: str | None = None
    """The parameters as shown; "" when known but with nothing to show."""
    error: tuple[str, str] | None = None
    images: list[_Img] = field(default_factory=list)


@dataclass(slots=True)
class _Ref:
    id: str
    source: str | None = None
    """What the manifest names (path, URL, UUID), for the label."""
    local: Path | None = None
    size: tuple[int, int] | None = None
    """The thumbnail's size; None: no thumbnail."""

    @property
    def thumb(self) -> str | None:
        """The thumbnail's path relative to the run dir, when there is one."""
        if self.size is None:
            return None
        return PurePosixPath(THUMBS_DIR, "refs", safe_part(self.id) + ".jpg").as_posix()


@dataclass
class _Plan:
    """The whole grid's layout, small per cell: cell details are built page by page."""

    title: str
    run_dir: Path
    index: JournalIndex
    manifest: Manifest | None
    """Set when the manifest loaded and is small enough to expand."""
    refs: dict[str, _Ref]
    variants: list[str]
    combos: list[str]
    rows: dict[str, list[str]]
    """Reference id -> the keys of its cells."""
    statuses: Counter[str]
    images: int
    variant_at: dict[str, int] = field(init=False)
    combo_at: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.variant_at = {v: i for i, v in enumerate(self.variants)}
        self.combo_at = {c: i for i, c in enumerate(self.combos)}

    @property
    def cells(self) -> int:
        """Cells in the whole grid (all pages)."""
        return sum(self.statuses.values())


def _load_manifest(run_dir: Path, path: str | None) -> Manifest | None:
    if path is None:
        return None
    try:
        return load_manifest(Path(path))
    except (PipelineError, OSError, ValueError) as exc:
        log.warning(
            "gallery of %s without its manifest %s (%s): no reference images, "
            "no not-run cells",
            run_dir,
            path,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None


def _read_sidecar(run_dir: Path, relpath: str) -> dict[str, Any]:
    try:
        data = json.loads(sidecar_path(run_dir / relpath).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _run_info(run_dir: Path) -> Mapping[str, object]:
    try:
        return read_run_info(run_dir) or {}
    except ConfigError as exc:
        log.warning("%s", exc)
        return {}


def _status(facts: KeyFacts | None) -> CellStatus | None:
    """A key's cell status, as the journal has it; None: no cell of its own."""
    if facts is None:
        return None
    status: CellStatus | None = None
    if facts.images:
        status = "done" if facts.complete else "partial"
    if facts.pending and status != "partial":
        status = "pending"
    if facts.failure is not None and not facts.complete:
        status = "failed"
    return status


def _combo(axes: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{n}={v}" for n, v in axes)


def _plan(run_dir: Path) -> _Plan:
    index = scan_journal(run_dir / JOURNAL_NAME)
    info = _run_info(run_dir)
    manifest_path = _text(info.get("manifest"))
    shard_text = _text(info.get("shard"))
    if shard_text is None and index.last_started is not None:
        shard_text = index.last_started.shard
    manifest = _load_manifest(run_dir, manifest_path)
    refs: dict[str, _Ref] = {}
    rows: dict[str, list[str]] = {}
    variants: dict[str, None] = {}
    combos: dict[str, None] = {}
    statuses: Counter[str] = Counter()
    planned: set[str] = set()
    expandable = False
    if manifest is not None:
        for reference in manifest.references:
            refs[reference.id] = _Ref(
                reference.id, reference.image, reference.local_path
            )
            rows[reference.id] = []
        variants.update((v.id, None) for v in manifest.variants)
        shard = Shard.read(shard_text)
        try:
            if count_tasks(manifest) <= MAX_EXPAND:
                for spec in expand(manifest):
                    if shard and not shard.contains(spec.key):
                        continue
                    planned.add(spec.key)
                    rows.setdefault(spec.reference_id, []).append(spec.key)
                    combos.setdefault(_combo(spec.axes))
                    statuses[_status(index.keys.get(spec.key)) or "not-run"] += 1
                expandable = True
        except (PipelineError, ValueError) as exc:
            log.warning("gallery: cannot expand %s: %s", manifest_path, exc)
    images = 0
    for key, facts in index.keys.items():
        images += facts.image_count
        if key in planned or (status := _status(facts)) is None:
            continue
        statuses[status] += 1
        ref_id, variant, axes = parse_key(key)
        rows.setdefault(ref_id, []).append(key)
        variants.setdefault(variant)
        combos.setdefault(_combo(axes))
    for ref_id in rows:
        refs.setdefault(ref_id, _Ref(ref_id))
    if manifest is not None:
        title = manifest.job.name
    elif manifest_path:
        title = Path(manifest_path).stem
    else:
        title = run_dir.name or str(run_dir)
    return _Plan(
        title=title,
        run_dir=run_dir,
        index=index,
        manifest=manifest if expandable else None,
        refs=refs,
        variants=list(variants),
        combos=list(combos),
        rows=rows,
        statuses=statuses,
        images=images,
    )


def _pages(plan: _Plan, page_cells: int) -> list[list[str]]:
    """Reference ids per page: whole rows, about ``page_cells`` cells a page."""
    pages: list[list[str]] = [[]]
    count = 0
    for reference in plan.refs:
        size = len(plan.rows.get(reference, ()))
        if pages[-1] and count + size > page_cells:
            pages.append([])
            count = 0
        pages[-1].append(reference)
        count += size
    return pages


def _page_cells(
    plan: _Plan, references: Sequence[str], f: BinaryIO
) -> dict[str, list[_Cell]]:
    """The cells of some reference rows, with their images, prompts and errors.

    Small per cell (slots, parameters kept as the text shown), as a page holds
    a few thousand of them at once.
    """
    index, run_dir = plan.index, plan.run_dir
    grid: dict[str, list[_Cell]] = {}
    for reference in references:
        row = grid[reference] = []
        for key in plan.rows.get(reference, ()):
            facts = index.keys.get(key)
            _, variant, axes = parse_key(key)
            v, c = plan.variant_at.get(variant), plan.combo_at.get(_combo(axes))
            if v is None or c is None:  # pragma: no cover - the plan has them all
                continue
            cell = _Cell(key, reference, v, c, _status(facts) or "not-run")
            row.append(cell)
            if facts is None:
                continue
            params: dict[str, Any] | None = None
            for _, offset in facts.image_offsets():
                event = index.read_at(f, offset)
                assert isinstance(event, CompletedEvent)
                cell.task_uuid = event.task_uuid
                cell.images.append(
                    _Img(
                        event.index,
                        event.path,
                        event.seed,
                        _money(event.cost_usd),
                        event.image_uuid,
                    )
                )
                meta = _read_sidecar(run_dir, event.path)
                if meta:
                    cell.prompt = _text(meta.get("prompt")) or cell.prompt
                    cell.negative = _text(meta.get("negative_prompt")) or cell.negative
                    found = meta.get("params")
                    params = found if isinstance(found, dict) else params
            if params is not None:
                cell.params = _display_params(params) or ""
            if facts.pending:
                cell.task_uuid = facts.pending[-1][0]
            if facts.failure is not None and not facts.complete:
                failure = index.read_at(f, facts.failure)
                assert isinstance(failure, FailedEvent)
                cell.task_uuid = failure.task_uuid or cell.task_uuid
                cell.error = (failure.code, failure.message)
    if plan.manifest is not None:
        _fill_from_manifest(plan.manifest, grid)
    return grid


def _fill_from_manifest(manifest: Manifest, grid: Mapping[str, list[_Cell]]) -> None:
    """Prompts and parameters the sidecars did not give (not-run, failed cells)."""
    wanted = {
        c.key: c
        for row in grid.values()
        for c in row
        if c.prompt is None or c.negative is None or c.params is None
    }
    if not wanted:
        return
    try:
        for spec in expand(manifest):
            cell = wanted.get(spec.key)
            if cell is None:
                continue
            cell.prompt = cell.prompt or _text(spec.params.get("positivePrompt"))
            cell.negative = cell.negative or _text(spec.params.get("negativePrompt"))
            if cell.params is None:
                cell.params = _display_params(spec.params) or ""
    except (PipelineError, ValueError) as exc:  # pragma: no cover - expanded before
        log.warning("gallery: cannot expand the manifest: %s", exc)


def _thumb_of(run_dir: Path, target: _Img | _Ref) -> None:
    """Make ``target``'s thumbnail when its image is there; set its size."""
    if isinstance(target, _Img):
        src = run_dir / target.path
        dst = run_dir / thumb_relpath(target.path)
    elif target.local is not None:
        src = target.local
        dst = run_dir / THUMBS_DIR / "refs" / (safe_part(target.id) + ".jpg")
    else:
        return
    target.size = _thumb_or_none(src, dst) if src.is_file() else None


def _thumbnails(
    run_dir: Path, grid: Mapping[str, list[_Cell]], refs: Sequence[_Ref]
) -> None:
    targets: list[_Img | _Ref] = [
        img for row in grid.values() for cell in row for img in cell.images
    ]
    targets.extend(ref for ref in refs if ref.local is not None)
    _in_threads(lambda target: _thumb_of(run_dir, target), targets)


# ---------------------------------------------------------------------------
# HTML


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _display_params(params: Mapping[str, Any] | None) -> str | None:
    if not params:
        return None
    shown = {k: v for k, v in params.items() if k not in _NOISE_PARAMS}
    inputs = shown.get("inputs")
    if isinstance(inputs, dict):
        rest = {k: v for k, v in inputs.items() if k != "referenceImages"}
        if rest:
            shown["inputs"] = rest
        else:
            del shown["inputs"]
    return json.dumps(shown, indent=2, ensure_ascii=False, default=str)


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


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _cell_data(cell: _Cell, strings: _Strings) -> dict[str, object]:
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
                "f": img.path,
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


def _cell_html(cell: _Cell, index: int, variant: str) -> str:
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
                    f'<a class="missing" data-i="{i}" href="{_e(img.path)}">'
                    "image missing or unreadable</a>"
                )
                continue
            w, h = img.size
            parts.append(
                f'<a data-i="{i}" href="{_e(img.path)}" target="_blank">'
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


def _ref_html(ref: _Ref) -> str:
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


def _summary(plan: _Plan) -> str:
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
    bits.append(f"${plan.index.spent_usd} spent")
    return " · ".join(bits)


def page_name(number: int) -> str:
    """Page ``number``'s file name: ``gallery.html``, then ``gallery-2.html``..."""
    return GALLERY_NAME if number == 1 else f"gallery-{number}.html"


def _nav(number: int, count: int, first_row: int, rows: int) -> str:
    """Links between the pages (nothing when there is only one)."""
    if count <= 1:
        return ""

    def link(n: int, text: str, rel: str = "") -> str:
        extra = f' rel="{rel}"' if rel else ""
        return f'<a href="{page_name(n)}"{extra}>{text}</a>'

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
    plan: _Plan, references: Sequence[str], grid: dict[str, list[_Cell]], nav: str
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
    yield _PAGE_HEAD.format(
        title=_e(plan.title),
        summary=_e(_summary(plan)),
        filters=filters,
        nav=nav,
        head1=head1,
        head2=head2,
        empty=empty,
        css=_CSS,
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
    yield _PAGE_FOOT.format(run_dir=_e(plan.run_dir), generated=_e(generated))
    combos = [dict(parse_key(f"_/_/{c}")[2]) if c else {} for c in plan.combos]
    # The JSON of {"combos", "strings", "cells"}, the cells' parts made above.
    yield f'{{"combos":{_script_json(combos)},"strings":{_script_json(strings.table)}'
    yield ',"cells":['
    yield ",".join(data)
    yield "]}"
    yield _PAGE_TAIL.format(js=_JS)


def _remove_stale_pages(run_dir: Path, count: int) -> None:
    """Drop ``gallery-N.html`` pages beyond ``count`` left by a bigger earlier grid."""
    for path in run_dir.glob("gallery-*.html"):
        number = path.stem.removeprefix("gallery-")
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
    plan = _plan(run_dir)
    pages = _pages(plan, page_cells)
    first_row = 0
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(plan.index.open()) if plan.index.keys else None
        for number, references in enumerate(pages, 1):
            grid = _page_cells(plan, references, f) if f is not None else {}
            _thumbnails(run_dir, grid, [plan.refs[r] for r in references])
            nav = _nav(number, len(pages), first_row, len(references))
            write_atomic_text_stream(
                run_dir / page_name(number),
                _page_chunks(plan, references, grid, nav),
            )
            del grid
            first_row += len(references)
    _remove_stale_pages(run_dir, len(pages))
    target = run_dir / GALLERY_NAME
    log.info("gallery %s: %d cell(s), %d page(s)", target, plan.cells, len(pages))
    return target


_CSS: Final = """
:root {
  color-scheme: light dark;
  --bg: #f4f4f4; --panel: #ffffff; --fg: #1c1c1c; --muted: #6a6a6a;
  --line: #d9d9d9; --ph: #e6e6e6; --sel: #1c1c1c; --bad: #a3211a;
  --thumb: 160px; --refw: 136px;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #141414; --panel: #1c1c1c; --fg: #e6e6e6; --muted: #9a9a9a;
    --line: #2f2f2f; --ph: #262626; --sel: #f0f0f0; --bad: #f0a29c;
  }
}
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body { background: var(--bg); color: var(--fg);
  font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
.app { display: grid; grid-template-columns: minmax(0, 1fr) 340px; height: 100vh; }
main { overflow: auto; }
.top { display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 18px;
  padding: 12px 16px; }
.top h1 { font-size: 17px; margin: 0; font-weight: 600; }
.top .sum { color: var(--muted); }
.top .controls { display: flex; gap: 14px; flex-wrap: wrap; margin-left: auto;
  align-items: center; }
.top label { color: var(--muted); }
select, input { font: inherit; color: inherit; }
select { background: var(--panel); border: 1px solid var(--line);
  border-radius: 4px; padding: 1px 4px; }
table.grid { border-collapse: separate; border-spacing: 0; margin: 0 16px 24px 0; }
.grid th { font-weight: 600; text-align: left; }
.grid thead th { position: sticky; background: var(--bg); z-index: 2; }
.grid thead tr:first-child th { top: 0; height: 30px; padding: 6px 8px 2px;
  border-bottom: 1px solid var(--line); white-space: nowrap; }
.grid thead tr:nth-child(2) th { top: 30px; padding: 3px 8px 5px;
  color: var(--muted); font-weight: 500; font-size: 12px;
  border-bottom: 1px solid var(--line); }
.grid th.corner { left: 0; z-index: 3; padding-left: 16px; color: var(--muted);
  font-weight: 500; vertical-align: bottom; }
.grid th.variant { border-left: 1px solid var(--line); }
.grid th.first, .grid td.first { border-left: 1px solid var(--line); }
.grid th.ref { position: sticky; left: 0; z-index: 1; background: var(--bg);
  width: var(--refw); min-width: var(--refw); padding: 8px 10px 8px 16px;
  vertical-align: top; font-weight: 600; border-bottom: 1px solid var(--line); }
.grid th.ref img, .grid th.ref .ph { display: block; width: 100%; height: auto;
  border-radius: 3px; margin-bottom: 4px; background: var(--ph); }
.grid th.ref .ph { aspect-ratio: 4 / 3; display: flex; align-items: center;
  justify-content: center; text-align: center; color: var(--muted);
  font-weight: 400; font-size: 11px; padding: 6px; overflow-wrap: anywhere; }
.grid td { vertical-align: top; padding: 6px; border-bottom: 1px solid var(--line);
  width: calc(var(--thumb) + 12px); min-width: calc(var(--thumb) + 12px); }
.grid td.cell { cursor: pointer; }
.grid td.cell:focus { outline: none; }
.grid td.cell.sel { box-shadow: inset 0 0 0 2px var(--sel); }
.imgs { display: flex; flex-wrap: wrap; gap: 3px; }
.imgs a { display: block; width: 100%; }
.imgs.multi a { width: calc(50% - 2px); }
.imgs img { display: block; width: 100%; height: auto; border-radius: 3px;
  background: var(--ph); }
.note, .fail, a.missing { display: flex; flex-direction: column;
  justify-content: center;
  min-height: calc(var(--thumb) * 0.56); border-radius: 3px; padding: 8px;
  background: var(--ph); color: var(--muted); text-align: center; font-size: 12px; }
.fail { color: var(--bad); border: 1px solid currentColor; background: transparent;
  text-align: left; gap: 4px; overflow-wrap: anywhere; }
.fail code { font-size: 11px; }
.fail .msg { color: var(--fg); display: -webkit-box; -webkit-line-clamp: 4;
  -webkit-box-orient: vertical; overflow: hidden; }
.dim { color: var(--muted); }
aside { background: var(--panel); border-left: 1px solid var(--line); overflow: auto;
  padding: 14px 16px 24px; }
aside h2 { font-size: 14px; margin: 0 0 2px; overflow-wrap: anywhere; }
aside .status { color: var(--muted); margin-bottom: 10px; }
aside .status.failed { color: var(--bad); }
aside img { display: block; width: 100%; height: auto; border-radius: 3px;
  margin: 6px 0 10px; background: var(--ph); }
aside dl { margin: 0; }
aside dt { color: var(--muted); font-size: 11px; text-transform: uppercase;
  letter-spacing: .04em; margin-top: 10px; }
aside dd { margin: 2px 0 0; white-space: pre-wrap; overflow-wrap: anywhere; }
aside pre { margin: 4px 0 0; font-size: 11px; white-space: pre-wrap;
  overflow-wrap: anywhere; background: var(--bg); padding: 8px; border-radius: 4px; }
aside summary { color: var(--muted); cursor: pointer; margin-top: 12px; }
aside .hint { color: var(--muted); }
aside a { color: inherit; }
.nothing { padding: 0 16px; color: var(--muted); }
.pages { flex-basis: 100%; display: flex; flex-wrap: wrap; gap: 2px 8px;
  align-items: baseline; }
.pages a { color: inherit; }
.pages b { padding: 0 2px; border-bottom: 2px solid var(--sel); }
footer { padding: 0 16px 16px; color: var(--muted); font-size: 11px; }
#check { display: none; }
@media (max-width: 900px) {
  .app { grid-template-columns: 1fr; grid-template-rows: 1fr 40vh; }
  aside { border-left: 0; border-top: 1px solid var(--line); }
}
"""

_JS: Final = r"""
(function () {
  "use strict";
  var meta = JSON.parse(document.getElementById("data").textContent);
  var S = meta.strings, cells = meta.cells;
  var checking = location.hash === "#check";
  if (checking) {
    // Headless checks see the whole page: load every image now, not on scroll.
    document.querySelectorAll("img[loading=lazy]").forEach(function (img) {
      img.loading = "eager";
    });
  }
  var grid = document.querySelector("table.grid");
  var $ = function (id) { return document.getElementById(id); };
  var pinned = null;
  function str(i) { return i === null || i === undefined ? "" : S[i]; }
  function setText(id, text) {
    var el = $(id);
    el.textContent = text;
    var row = el.closest("[data-row]");
    if (row) row.hidden = !text;
  }
  function show(td, imgIndex) {
    var c = cells[+td.dataset.c];
    if (!c) return;
    var img = c.i.length ? c.i[Math.min(imgIndex || 0, c.i.length - 1)] : null;
    $("d-hint").hidden = true;
    $("d-body").hidden = false;
    $("d-key").textContent = c.k;
    var st = $("d-status");
    var label = {done: "done", partial: "partly done", failed: "failed",
      pending: "in flight", "not-run": "not run yet"}[c.s] || c.s;
    if (img && c.i.length > 1) {
      label += " \u00b7 image " + (img.n + 1) + " of " + c.i.length;
    }
    st.textContent = label;
    st.className = "status " + c.s;
    var pv = $("d-preview");
    if (img && img.th) {
      pv.src = img.th;
      pv.hidden = false;
    } else {
      pv.hidden = true;
      pv.removeAttribute("src");
    }
    var open = $("d-open");
    if (img) { open.href = img.f; open.hidden = false; } else { open.hidden = true; }
    setText("d-prompt", str(c.p));
    setText("d-negative", str(c.n));
    setText("d-seed", img && img.seed !== null ? String(img.seed) : "");
    setText("d-cost", img && img.cost !== null ? "$" + img.cost : "");
    setText("d-error", c.e ? c.e[0] + ": " + c.e[1] : "");
    setText("d-task", c.t || "");
    setText("d-image", img ? img.u : "");
    setText("d-file", img ? img.f : "");
    $("d-params").textContent = str(c.q);
    $("d-params-box").hidden = c.q === null || c.q === undefined;
  }
  function target(ev) {
    var td = ev.target.closest ? ev.target.closest("td.cell") : null;
    if (!td) return null;
    var a = ev.target.closest("[data-i]");
    return {td: td, i: a ? +a.dataset.i : 0};
  }
  function pin(td, i) {
    if (pinned) pinned.classList.remove("sel");
    pinned = td;
    if (td) { td.classList.add("sel"); show(td, i); }
  }
  grid && grid.addEventListener("mouseover", function (ev) {
    var t = target(ev);
    if (t && !pinned) show(t.td, t.i);
  });
  grid && grid.addEventListener("click", function (ev) {
    var t = target(ev);
    if (!t) return;
    if (ev.target.closest("a") && !ev.metaKey && !ev.ctrlKey && pinned !== t.td) {
      ev.preventDefault();  // first click selects; a second one opens the image
    }
    pin(t.td, t.i);
  });
  grid && grid.addEventListener("keydown", function (ev) {
    var t = target(ev);
    if (t && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      pin(t.td, t.i);
    }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape") pin(null);
  });
  var size = $("size");
  size && size.addEventListener("input", function () {
    document.documentElement.style.setProperty("--thumb", size.value + "px");
  });
  // Axis filters: hide the sub-columns whose values do not match, via one style rule.
  var selects = document.querySelectorAll("select[data-axis]");
  var rule = $("filter-rule");
  function applyFilters() {
    var want = {};
    selects.forEach(function (s) { if (s.value) want[s.dataset.axis] = s.value; });
    var hidden = [];
    meta.combos.forEach(function (axes, i) {
      for (var name in want) {
        if (axes[name] !== want[name]) { hidden.push(i); return; }
      }
    });
    rule.textContent = hidden.map(function (i) {
      return '.grid [data-combo="' + i + '"]';
    }).join(",") + (hidden.length ? "{display:none}" : "");
    var visible = meta.combos.length - hidden.length;
    document.querySelectorAll("th.variant").forEach(function (th) {
      th.colSpan = Math.max(1, visible);
    });
  }
  selects.forEach(function (s) { s.addEventListener("change", applyFilters); });
  if (checking) {
    window.addEventListener("load", function () {
      var imgs = Array.prototype.slice.call(document.images).filter(function (i) {
        return i.id !== "d-preview";
      });
      // Synchronous on purpose: the load event waited for every (eager) image,
      // and a headless --dump-dom does not wait for promises.
      (function () {
        var tds = document.querySelectorAll("td.cell");
        var pairs = {};
        tds.forEach(function (td) {
          pairs[td.dataset.ref + "\u0000" + td.dataset.variant] = 1;
        });
        var first = document.querySelector("td.cell.done") || tds[0];
        if (first) pin(first, 0);
        var result = {
          images: imgs.length,
          loaded: imgs.filter(function (i) {
            return i.complete && i.naturalWidth > 0;
          }).length,
          broken: imgs.filter(function (i) { return !(i.naturalWidth > 0); })
            .map(function (i) { return i.getAttribute("src"); }),
          cells: tds.length,
          pairs: Object.keys(pairs).length,
          references: document.querySelectorAll("tbody th.ref").length,
          variants: document.querySelectorAll("thead th.variant").length,
          failed: document.querySelectorAll("td.cell.failed").length,
          selected_key: first ? first.dataset.key : null,
          panel_key: $("d-key").textContent,
          panel_prompt: $("d-prompt").textContent,
          panel_seed: $("d-seed").textContent,
          panel_cost: $("d-cost").textContent
        };
        $("check").textContent = JSON.stringify(result);
        document.documentElement.dataset.checked = "1";
      })();
    });
  }
})();
"""

_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title} · remix gallery</title>
<style>{css}</style>
<style id="filter-rule"></style>
</head>
<body>
<div class="app">
<main>
<div class="top">
  <h1>{title}</h1>
  <span class="sum">{summary}</span>
  {nav}
  <div class="controls">{filters}
    <label>size <input id="size" type="range" min="80" max="320" step="8"
      value="160"></label>
  </div>
</div>
{empty}
<table class="grid">
<thead>
<tr><th class="corner" rowspan="2" scope="col">reference</th>{head1}</tr>
<tr>{head2}</tr>
</thead>
<tbody>
{rows}
</tbody>
</table>
<footer>{run_dir} · generated {generated} · click a cell to pin its details, Esc to
unpin; click the pinned image again to open it full size</footer>
</main>
<aside id="panel" aria-live="polite">
  <p class="hint" id="d-hint">Hover over a cell to see its prompt, parameters, seed
  and cost; click to pin it.</p>
  <div id="d-body" hidden>
    <h2 id="d-key"></h2>
    <div class="status" id="d-status"></div>
    <a id="d-open" target="_blank" hidden><img id="d-preview" alt="preview" hidden></a>
    <dl>
      <div data-row><dt>prompt</dt><dd id="d-prompt"></dd></div>
      <div data-row><dt>negative prompt</dt><dd id="d-negative"></dd></div>
      <div data-row><dt>error</dt><dd id="d-error"></dd></div>
      <div data-row><dt>seed</dt><dd id="d-seed"></dd></div>
      <div data-row><dt>cost</dt><dd id="d-cost"></dd></div>
      <div data-row><dt>task UUID</dt><dd id="d-task"></dd></div>
      <div data-row><dt>image UUID</dt><dd id="d-image"></dd></div>
      <div data-row><dt>file</dt><dd id="d-file"></dd></div>
    </dl>
    <details id="d-params-box" open><summary>parameters</summary>
      <pre id="d-params"></pre></details>
  </div>
</aside>
</div>
<pre id="check"></pre>
<script type="application/json" id="data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

_PAGE_HEAD, _, _PAGE_REST = _PAGE.partition("{rows}")
_PAGE_FOOT, _, _PAGE_TAIL = _PAGE_REST.partition("{data}")
