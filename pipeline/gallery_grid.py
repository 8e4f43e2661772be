"""The gallery's grid, built from a run dir (or the run dirs of one job's shards):
what goes in each cell, page by page.

The grid comes from the journals (each folded once, keeping line offsets: see
:mod:`pipeline.journal_offsets`); the run's manifest (its path is in run.json), when
it still loads, adds the reference images, the manifest's order, the prompts of tasks
without a sidecar, and the tasks not run yet. Without it the grid still works. Every
path in the grid is relative to the page's directory, which need not be a run dir's.
:mod:`pipeline.gallery` renders it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal
from urllib.parse import quote

from pipeline.errors import ConfigError, PipelineError
from pipeline.expand import expand
from pipeline.journal import JOURNAL_NAME
from pipeline.journal_offsets import JournalOffsets
from pipeline.ledger import parse_key
from pipeline.manifest import Manifest, load_manifest
from pipeline.plan import count_tasks
from pipeline.rundir import read_run_info
from pipeline.shard import Shard
from pipeline.storage import safe_part, sidecar_path
from pipeline.thumbnails import THUMBS_DIR, in_threads, thumb_relpath, thumbnail_or_none

log = logging.getLogger(__name__)

MAX_EXPAND: Final = 20_000
"""Expand the manifest (not-run cells, prompts of failed tasks) up to this size."""
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


# ---------------------------------------------------------------------------
# The grid model


@dataclass(slots=True)
class GridImage:
    """One stored image of a cell."""

    index: int
    path: str
    """Relative to the run dir."""
    seed: int | None
    cost: str | None
    """USD, as the journal has it."""
    image_uuid: str
    size: tuple[int, int] | None = None
    """The thumbnail's size; None: no thumbnail (image missing or unreadable)."""
    home: str = ""
    """Its run dir, relative to the page's directory ("" when the page is in it)."""
    run: int | None = None
    """Which run it comes from, when runs are compared (index into the plan's)."""

    @property
    def href(self) -> str:
        """The image, relative to the page."""
        return _under(self.home, self.path)

    @property
    def thumb(self) -> str | None:
        """The thumbnail, relative to the page, when there is one."""
        if self.size is None:
            return None
        return _under(self.home, thumb_relpath(self.path).as_posix())


@dataclass(slots=True)
class GridCell:
    """One task's cell: where it sits, its status and what the details panel shows."""

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
    images: list[GridImage] = field(default_factory=list)


@dataclass(slots=True)
class GridRef:
    """One reference row's header: the reference image, or what the manifest names."""

    id: str
    source: str | None = None
    """What the manifest names (path, URL, UUID), for the label."""
    local: Path | None = None
    size: tuple[int, int] | None = None
    """The thumbnail's size; None: no thumbnail."""
    home: str = ""
    """The run dir its thumbnail goes in, relative to the page's directory."""
    copied: bool = False
    """Whether the reference image itself was copied into the run dir."""

    @property
    def thumb_relpath(self) -> str:
        """The thumbnail's path inside its run dir."""
        return PurePosixPath(THUMBS_DIR, "refs", safe_part(self.id) + ".jpg").as_posix()

    @property
    def copy_relpath(self) -> str:
        """Where the reference image is copied inside the run dir, so the page links
        to it relatively (a zipped or served run dir keeps it)."""
        suffix = self.local.suffix.lower() if self.local is not None else ""
        name = safe_part(self.id) + suffix
        return PurePosixPath(THUMBS_DIR, "references", name).as_posix()

    @property
    def href(self) -> str | None:
        """The reference image (its copy, else its thumbnail), relative to the page."""
        if self.copied:
            return _under(self.home, self.copy_relpath)
        return self.thumb

    @property
    def thumb(self) -> str | None:
        """The thumbnail, relative to the page, when there is one."""
        return None if self.size is None else _under(self.home, self.thumb_relpath)


def _under(home: str, relpath: str) -> str:
    return relpath if not home else f"{quote(home)}/{relpath}"


@dataclass
class GridSource:
    """One run dir of the grid and its journal."""

    run_dir: Path
    journal: JournalOffsets
    shard: Shard | None
    home: str = ""
    """The run dir relative to the page's directory ("" when the page is in it)."""


@dataclass
class GridPlan:
    """The whole grid's layout, small per cell: cell details are built page by page."""

    title: str
    sources: list[GridSource]
    """The run dirs, each key in one of them (shards of one job do not overlap)."""
    manifest: Manifest | None
    """Set when the manifest loaded and is small enough to expand."""
    refs: dict[str, GridRef]
    variants: list[str]
    combos: list[str]
    rows: dict[str, list[str]]
    """Reference id -> the keys of its cells."""
    statuses: Counter[str]
    images: int
    compare: bool = False
    """The run dirs are separate runs shown side by side, not one job's shards."""
    variant_at: dict[str, int] = field(init=False)
    combo_at: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.variant_at = {v: i for i, v in enumerate(self.variants)}
        self.combo_at = {c: i for i, c in enumerate(self.combos)}

    @property
    def cells(self) -> int:
        """Cells in the whole grid (all pages)."""
        return sum(self.statuses.values())

    @property
    def run_dirs(self) -> list[Path]:
        return [source.run_dir for source in self.sources]

    @property
    def run_labels(self) -> list[str]:
        """A short name per run dir: its name, or its path where names repeat."""
        names = [s.run_dir.name or str(s.run_dir) for s in self.sources]
        if len(set(names)) == len(names):
            return names
        return [str(s.run_dir) for s in self.sources]

    @property
    def spent_usd(self) -> Decimal:
        return sum((s.journal.spent_usd for s in self.sources), Decimal(0))

    @property
    def has_tasks(self) -> bool:
        """Whether any journal names a task."""
        return any(s.journal.keys for s in self.sources)

    @property
    def shards(self) -> list[Shard]:
        return [s.shard for s in self.sources if s.shard is not None]

    def source_of(self, key: str) -> GridSource | None:
        """The run dir whose journal has ``key`` (None: not run anywhere)."""
        for source in self.sources:
            if key in source.journal.keys:
                return source
        return None

    def sources_of(self, key: str) -> list[GridSource]:
        """The run dirs whose images a cell shows: each run compared that has
        ``key``, else the one shard that has it."""
        if not self.compare:
            found = self.source_of(key)
            return [] if found is None else [found]
        return [s for s in self.sources if key in s.journal.keys]

    def place(self, page_dir: Path) -> None:
        """Make every path relative to ``page_dir``, where the page is written."""
        page = page_dir.resolve()
        for source in self.sources:
            home = Path(os.path.relpath(source.run_dir.resolve(), page)).as_posix()
            source.home = "" if home == "." else home
        for ref in self.refs.values():
            ref.home = self.sources[0].home

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Keep the journals open while cells read their events back."""
        with contextlib.ExitStack() as stack:
            for source in self.sources:
                if source.journal.keys:
                    stack.enter_context(source.journal.reading())
            yield


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


def cell_status(journal: JournalOffsets, key: str) -> CellStatus | None:
    """A key's cell status, as the journal has it; None: no cell of its own."""
    status: CellStatus | None = None
    complete = journal.is_complete(key)
    if journal.completed_images.get(key):
        status = "done" if complete else "partial"
    if journal.pending.get(key) and status != "partial":
        status = "pending"
    if key in journal.failed and not complete:
        status = "failed"
    return status


def _combo(axes: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{n}={v}" for n, v in axes)


def _source(run_dir: Path) -> tuple[GridSource, Mapping[str, object]]:
    journal = JournalOffsets.of_file(run_dir / JOURNAL_NAME)
    info = _run_info(run_dir)
    shard_text = _text(info.get("shard"))
    if shard_text is None and journal.last_started is not None:
        shard_text = journal.last_started.shard
    return GridSource(run_dir, journal, Shard.read(shard_text)), info


def _manifest_sha(source: GridSource, info: Mapping[str, object]) -> str | None:
    sha = _text(info.get("manifest_sha256"))
    started = source.journal.last_started
    return sha if sha is not None or started is None else started.manifest_sha256


def _is_comparison(read: Sequence[tuple[GridSource, Mapping[str, object]]]) -> bool:
    """Whether several run dirs are runs to compare rather than one job's shards:
    distinct shards of one manifest and one split merge into one grid; anything else
    (two nights, two jobs, the same shard on two nights) is shown side by side.

    Raises:
        ConfigError: a run dir given twice.
    """
    if len(read) == 1:
        return False
    sources = [source for source, _ in read]
    resolved = [source.run_dir.resolve() for source in sources]
    for index, run_dir in enumerate(resolved):
        if run_dir in resolved[:index]:
            raise ConfigError(f"{sources[index].run_dir} is given twice: pass it once")
    shards = [source.shard for source in sources]
    one_job = len({_manifest_sha(s, i) for s, i in read} - {None}) <= 1
    split = {shard.count for shard in shards if shard is not None}
    indices = {shard.index for shard in shards if shard is not None}
    distinct = len(indices) == len(shards)
    return not (one_job and None not in shards and len(split) == 1 and distinct)


def plan_grid(run_dirs: Sequence[Path]) -> GridPlan:
    """The grid of a run dir; of the run dirs of one job's shards as one grid; or of
    runs compared (each cell shows every run's images of its key).

    Raises:
        ConfigError: one job's shards that do not fit together, or a run dir twice.
    """
    read = [_source(run_dir) for run_dir in run_dirs]
    sources = [source for source, _ in read]
    info = read[0][1]
    compare = _is_comparison(read)
    run_dir = sources[0].run_dir
    manifest_path = _text(info.get("manifest"))
    manifest = _load_manifest(run_dir, manifest_path)
    refs: dict[str, GridRef] = {}
    rows: dict[str, list[str]] = {}
    variants: dict[str, None] = {}
    combos: dict[str, None] = {}
    statuses: Counter[str] = Counter()
    planned: set[str] = set()
    expandable = False
    shards = [source.shard for source in sources]
    whole = compare or any(shard is None for shard in shards)

    def status_of(key: str) -> CellStatus | None:
        source = next((s for s in sources if key in s.journal.keys), None)
        return None if source is None else cell_status(source.journal, key)

    if manifest is not None:
        for reference in manifest.references:
            refs[reference.id] = GridRef(
                reference.id, reference.image, reference.local_path
            )
            rows[reference.id] = []
        variants.update((v.id, None) for v in manifest.variants)
        try:
            if count_tasks(manifest) <= MAX_EXPAND:
                for spec in expand(manifest):
                    if not whole and not any(
                        shard is not None and shard.contains(spec.key)
                        for shard in shards
                    ):
                        continue
                    planned.add(spec.key)
                    rows.setdefault(spec.reference_id, []).append(spec.key)
                    combos.setdefault(_combo(spec.axes))
                    statuses[status_of(spec.key) or "not-run"] += 1
                expandable = True
        except (PipelineError, ValueError) as exc:
            log.warning("gallery: cannot expand %s: %s", manifest_path, exc)
    images = 0
    for index, source in enumerate(sources):
        journal = source.journal
        for key in journal.keys:
            earlier = any(key in e.journal.keys for e in sources[:index])
            if earlier and not compare:
                continue  # shown from the first run dir that has it
            images += len(journal.completed_images.get(key, ()))
            if earlier or key in planned:
                continue
            if (status := cell_status(journal, key)) is None:
                continue
            statuses[status] += 1
            ref_id, variant, axes = parse_key(key)
            rows.setdefault(ref_id, []).append(key)
            variants.setdefault(variant)
            combos.setdefault(_combo(axes))
    for ref_id in rows:
        refs.setdefault(ref_id, GridRef(ref_id))
    if manifest is not None:
        title = manifest.job.name
    elif manifest_path:
        title = Path(manifest_path).stem
    else:
        title = run_dir.name or str(run_dir)
    return GridPlan(
        title=f"{title} · compared" if compare else title,
        sources=sources,
        manifest=manifest if expandable else None,
        refs=refs,
        variants=list(variants),
        combos=list(combos),
        rows=rows,
        statuses=statuses,
        images=images,
        compare=compare,
    )


def split_pages(plan: GridPlan, page_cells: int) -> list[list[str]]:
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


def cells_of(plan: GridPlan, references: Sequence[str]) -> dict[str, list[GridCell]]:
    """The cells of some reference rows, with their images, prompts and errors.

    Small per cell (slots, parameters kept as the text shown), as a page holds
    a few thousand of them at once. Reads events back: call it inside
    ``with plan.reading():``.
    """
    grid: dict[str, list[GridCell]] = {}
    for reference in references:
        row = grid[reference] = []
        for key in plan.rows.get(reference, ()):
            _, variant, axes = parse_key(key)
            v, c = plan.variant_at.get(variant), plan.combo_at.get(_combo(axes))
            if v is None or c is None:  # pragma: no cover - the plan has them all
                continue
            found = plan.sources_of(key)
            if not found:
                row.append(GridCell(key, reference, v, c, "not-run"))
                continue
            status = cell_status(found[0].journal, key)
            cell = GridCell(key, reference, v, c, status or "not-run")
            row.append(cell)
            for source in found:
                run = plan.sources.index(source) if plan.compare else None
                _fill_cell(cell, source, run)
    if plan.manifest is not None:
        _fill_from_manifest(plan.manifest, grid)
    return grid


def _fill_cell(cell: GridCell, source: GridSource, run: int | None) -> None:
    """A cell's images, prompt, parameters and error as one run dir has them."""
    key, journal, run_dir = cell.key, source.journal, source.run_dir
    params: dict[str, Any] | None = None
    images = journal.completed_images.get(key, {})
    for index in sorted(images):
        event = journal.completed_event(images[index])
        cell.task_uuid = event.task_uuid
        cell.images.append(
            GridImage(
                event.index,
                event.path,
                event.seed,
                _money(event.cost_usd),
                event.image_uuid,
                home=source.home,
                run=run,
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
    if pending := journal.pending.get(key):
        cell.task_uuid = journal.task_of(pending[-1])
    failed = journal.failed.get(key)
    if failed is not None and not journal.is_complete(key):
        failure = journal.failed_event(failed)
        cell.task_uuid = failure.task_uuid or cell.task_uuid
        cell.error = (failure.code, failure.message)


def _fill_from_manifest(manifest: Manifest, grid: Mapping[str, list[GridCell]]) -> None:
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


def _thumb_of(page_dir: Path, target: GridImage | GridRef) -> None:
    """Make ``target``'s thumbnail when its image is there; set its size."""
    if isinstance(target, GridImage):
        src = page_dir / target.home / target.path
        dst = page_dir / target.home / thumb_relpath(target.path)
    elif target.local is not None:
        src = target.local
        dst = page_dir / target.home / target.thumb_relpath
        if src.is_file():
            target.copied = _copy_in(src, page_dir / target.home / target.copy_relpath)
    else:
        return
    target.size = thumbnail_or_none(src, dst) if src.is_file() else None


def _copy_in(src: Path, dst: Path) -> bool:
    """Copy a reference image into the run dir (kept while newer than ``src``), so
    the page never links outside it; False (logged) when it cannot be copied."""
    tmp = dst.with_name(dst.name + ".part")
    try:
        if dst.is_file() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            return True
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # never leave a half copy behind
        log.warning("reference %s not copied into the run dir: %s", src, exc)
        return False
    return True


def make_grid_thumbnails(
    page_dir: Path, grid: Mapping[str, list[GridCell]], refs: Sequence[GridRef]
) -> None:
    """Thumbnails of these cells' images and references (each in its run dir)."""
    targets: list[GridImage | GridRef] = [
        img for row in grid.values() for cell in row for img in cell.images
    ]
    targets.extend(ref for ref in refs if ref.local is not None)
    in_threads(lambda target: _thumb_of(page_dir, target), targets)


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


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
