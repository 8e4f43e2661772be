"""Gallery: the static contact sheet's structure, escaping, thumbnails, and a real
headless Chromium rendering of it from the file system."""

from __future__ import annotations

import colorsys
import hashlib
import html.parser
import json
import os
import subprocess
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anyio
import markupsafe
import pytest
from PIL import Image, ImageDraw

from pipeline.expand import expand
from pipeline.gallery import GALLERY_NAME, write_gallery
from pipeline.journal import JOURNAL_NAME, JournalWriter
from pipeline.journal_events import (
    CompletedEvent,
    Event,
    FailedEvent,
    RunStartedEvent,
    SubmittedEvent,
)
from pipeline.manifest import load_manifest
from pipeline.storage import encode_sidecar, image_relpath
from pipeline.thumbnails import make_thumbnail, make_thumbnails
from tests.chromium import chromium, headless_args

T0 = datetime(2026, 11, 3, 22, 0, tzinfo=UTC)
NASTY = "<b>\"quoted\" & 'single'</b> </script><script>alert(1)</script>"
FAIL_MESSAGE = '=HYPERLINK("http://x") <img src=x onerror=alert(1)>'

MANIFEST = """
[job]
name = "gallery-test"

[defaults]
width = 1024
height = 768
outputFormat = "JPG"

[[references]]
id = "harbour"
image = "refs/harbour.png"
vars = {{ subject = "a harbour" }}

[[references]]
id = "forest"
image = "refs/forest.png"
vars = {{ subject = "a forest" }}

[[variants]]
id = "neon-noir"
positivePrompt = "Turn {{subject}} into a neon noir scene {nasty}"

[[variants]]
id = "watercolour"
positivePrompt = "Paint {{subject}} as a soft watercolour"
negativePrompt = "photo, harsh"

[[variants]]
id = "paper-cut"
positivePrompt = "Rebuild {{subject}} from layered paper cut-outs"

[matrix]
"providerSettings.ideogram.remixStrength" = [30, 70]
"""


@dataclass(frozen=True)
class DemoRun:
    run_dir: Path
    references: list[str]
    variants: list[str]
    combos: int
    failed_key: str
    pending_key: str
    prompts: dict[str, str]
    """key -> its positive prompt."""


def _picture(size: tuple[int, int], hue: float, label: str, seed: int) -> Image.Image:
    """A recognisable synthetic render: a gradient, some shapes and a label."""
    w, h = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(h):
        r, g, b = colorsys.hsv_to_rgb(hue, 0.55, 0.35 + 0.55 * y / h)
        draw.line([(0, y), (w, y)], fill=(int(r * 255), int(g * 255), int(b * 255)))
    for i in range(6):
        x = (seed * 37 + i * 97) % w
        y = (seed * 53 + i * 61) % h
        r = 20 + (seed + i * 13) % 50
        shade = colorsys.hsv_to_rgb((hue + 0.5) % 1, 0.4, 0.9)
        fill = tuple(int(c * 255) for c in shade)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    draw.rectangle([0, h - 28, w, h], fill=(0, 0, 0))
    draw.text((8, h - 22), label, fill=(255, 255, 255))
    return image


async def _write(path: Path, events: list[Event]) -> None:
    async with JournalWriter.open(path) as journal:
        await journal.append(*events)


def build_demo_run(root: Path) -> DemoRun:
    """A run dir as `remix run` leaves it: run.json, journal, images, sidecars."""
    refs = root / "job" / "refs"
    refs.mkdir(parents=True)
    _picture((640, 480), 0.58, "harbour", 3).save(refs / "harbour.png")
    _picture((480, 640), 0.30, "forest", 8).save(refs / "forest.png")
    manifest_path = root / "job" / "gallery.toml"
    manifest_path.write_text(MANIFEST.format(nasty=NASTY.replace('"', '\\"')))
    manifest = load_manifest(manifest_path)
    specs = list(expand(manifest))
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "manifest": str(manifest_path),
                "manifest_sha256": hashlib.sha256(
                    manifest_path.read_bytes()
                ).hexdigest(),
                "shard": None,
                "started_at": T0.isoformat(),
                "settings": {},
            }
        )
    )
    failed_key, pending_key = specs[4].key, specs[9].key
    events: list[Event] = [
        RunStartedEvent(
            ts=T0,
            run_id="run",
            manifest_sha256="0" * 64,
            tasks=len(specs),
            images=len(specs),
            estimate_usd=Decimal("0.06") * len(specs),
        )
    ]
    hues = {"neon-noir": 0.85, "watercolour": 0.12, "paper-cut": 0.02}
    for n, spec in enumerate(specs):
        task_uuid = f"00000000-0000-4000-8000-{n:012d}"
        at = T0 + timedelta(seconds=n)
        events.append(
            SubmittedEvent(
                ts=at,
                key=spec.key,
                task_uuid=task_uuid,
                images=1,
                estimate_usd=Decimal("0.06"),
            )
        )
        if spec.key == pending_key:
            continue
        if spec.key == failed_key:
            events.append(
                FailedEvent(
                    ts=at,
                    key=spec.key,
                    task_uuid=task_uuid,
                    code="invalidPositivePrompt",
                    message=FAIL_MESSAGE,
                    retryable=False,
                )
            )
            continue
        relpath = image_relpath(spec.reference_id, spec.variant_id, spec.axes, 0, "jpg")
        target = run_dir / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        strength = dict(spec.axes)["remixStrength"]
        _picture(
            (512, 384),
            hues[spec.variant_id] + (0.04 if strength == "70" else 0),
            f"{spec.reference_id} / {spec.variant_id} / {strength}",
            n,
        ).save(target, quality=88)
        image_uuid = f"11111111-0000-4000-8000-{n:012d}"
        target.with_suffix(".json").write_bytes(
            encode_sidecar(
                {
                    "key": spec.key,
                    "reference": spec.reference_id,
                    "variant": spec.variant_id,
                    "axes": dict(spec.axes),
                    "index": 0,
                    "prompt": spec.params.get("positivePrompt"),
                    "negative_prompt": spec.params.get("negativePrompt"),
                    "params": {**spec.params, "taskUUID": task_uuid},
                    "task_uuid": task_uuid,
                    "image_uuid": image_uuid,
                    "seed": 1000 + n,
                    "cost_usd": Decimal("0.06"),
                    "nsfw_content": False,
                    "path": relpath,
                }
            )
        )
        events.append(
            CompletedEvent(
                ts=at + timedelta(seconds=7),
                key=spec.key,
                task_uuid=task_uuid,
                image_uuid=image_uuid,
                index=0,
                seed=1000 + n,
                cost_usd=Decimal("0.06"),
                path=relpath,
                sha256="0" * 64,
                bytes=target.stat().st_size,
            )
        )
    anyio.run(_write, run_dir / JOURNAL_NAME, events)
    return DemoRun(
        run_dir=run_dir,
        references=[r.id for r in manifest.references],
        variants=[v.id for v in manifest.variants],
        combos=2,
        failed_key=failed_key,
        pending_key=pending_key,
        prompts={s.key: str(s.params["positivePrompt"]) for s in specs},
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One synthetic run dir with its gallery written, shared by this module."""
    run = build_demo_run(tmp_path_factory.mktemp("gallery"))
    write_gallery(run.run_dir)
    return run


class _Collect(html.parser.HTMLParser):
    """Tags with their attributes, and the text of one element by id."""

    def __init__(self, text_of: str = "") -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text_of = text_of
        self._depth = 0
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((tag, found))
        if self._depth:
            self._depth += 1
        elif self.text_of and found.get("id") == self.text_of:
            self._depth = 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.text += data


def _parse(page: str, text_of: str = "") -> _Collect:
    parser = _Collect(text_of)
    parser.feed(page)
    return parser


def _cells(parser: _Collect) -> list[dict[str, str | None]]:
    return [
        a
        for tag, a in parser.tags
        if tag == "td" and "cell" in (a.get("class") or "").split()
    ]


# ---------------------------------------------------------------------------
# Static structure


def test_grid_has_a_cell_per_reference_variant_and_axis_value(demo: DemoRun) -> None:
    """One cell per (reference, variant, axis combination): refs x variants."""
    page = (demo.run_dir / GALLERY_NAME).read_text()
    cells = _cells(_parse(page))
    assert len(cells) == len(demo.references) * len(demo.variants) * demo.combos
    pairs = {(c["data-ref"], c["data-variant"]) for c in cells}
    assert pairs == {(r, v) for r in demo.references for v in demo.variants}


def test_reference_images_are_shown_down_the_side(demo: DemoRun) -> None:
    """Each reference row starts with a thumbnail of the reference image itself."""
    parser = _parse((demo.run_dir / GALLERY_NAME).read_text())
    ref_imgs = [
        a
        for tag, a in parser.tags
        if tag == "img" and "reference" in (a.get("alt") or "")
    ]
    assert len(ref_imgs) == len(demo.references)
    for attrs in ref_imgs:
        assert (demo.run_dir / str(attrs["src"])).is_file()


def test_images_are_lazy_thumbnails_linking_to_full_images(demo: DemoRun) -> None:
    """Every grid image is a lazy thumbnail (<= 320px wide) linking to its file."""
    page = (demo.run_dir / GALLERY_NAME).read_text()
    parser = _parse(page)
    imgs = [a for tag, a in parser.tags if tag == "img" and a.get("src")]
    assert len(imgs) == 12 - 2 + 2  # 10 images + 2 reference thumbnails
    for attrs in imgs:
        assert attrs["loading"] == "lazy"
        src = str(attrs["src"])
        assert src.startswith("thumbs/")
        with Image.open(demo.run_dir / src) as thumb:
            assert thumb.width <= 320
            assert (str(thumb.width), str(thumb.height)) == (
                attrs["width"],
                attrs["height"],
            )
    links = [
        a["href"]
        for tag, a in parser.tags
        if tag == "a" and str(a.get("href", "")).startswith("images/")
    ]
    assert len(links) == 10
    assert all((demo.run_dir / str(h)).is_file() for h in links)


def test_page_is_self_contained(demo: DemoRun) -> None:
    """No http(s) resource, no external script or stylesheet: works from file://."""
    page = (demo.run_dir / GALLERY_NAME).read_text()
    parser = _parse(page)
    for tag, attrs in parser.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert "://" not in value or value.startswith("file://"), (tag, value)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet")
    assert "prefers-color-scheme: dark" in page


def test_user_text_is_escaped(demo: DemoRun) -> None:
    """Prompts and error messages never appear as markup."""
    page = (demo.run_dir / GALLERY_NAME).read_text()
    assert "<script>alert(1)</script>" not in page
    assert "<img src=x onerror" not in page
    assert page.count("<script") == 2  # the JSON data block and the page script
    assert str(markupsafe.escape(FAIL_MESSAGE)) in page  # as Jinja2 escapes it
    data = _parse(page, text_of="data").text
    meta = json.loads(data)
    assert any(NASTY in s for s in meta["strings"])


def test_cell_details_are_stored_once_and_complete(demo: DemoRun) -> None:
    """Each cell has a prompt and shown parameters (sidecar or manifest); texts once."""
    page = (demo.run_dir / GALLERY_NAME).read_text()
    meta = json.loads(_parse(page, text_of="data").text)
    strings = meta["strings"]
    assert len(strings) == len(set(strings))
    assert len(meta["cells"]) == len(_cells(_parse(page)))
    for cell in meta["cells"]:
        assert strings[cell["p"]]
        params = json.loads(strings[cell["q"]])
        assert "positivePrompt" not in params
        assert "taskUUID" not in params


def test_failed_and_pending_tasks_are_shown_as_such(demo: DemoRun) -> None:
    """The failed task's cell says failed with its code; the in-flight one says so."""
    page = (demo.run_dir / GALLERY_NAME).read_text()
    cells = {c["data-key"]: c for c in _cells(_parse(page))}
    assert "failed" in str(cells[demo.failed_key]["class"]).split()
    assert "pending" in str(cells[demo.pending_key]["class"]).split()
    assert "invalidPositivePrompt" in page
    assert "in flight" in page


def test_thumbnails_are_made_once(demo: DemoRun) -> None:
    """A second gallery build keeps thumbnails that are newer than their images."""
    thumbs = sorted((demo.run_dir / "thumbs").rglob("*.jpg"))
    before = {p: p.stat().st_mtime_ns for p in thumbs}
    write_gallery(demo.run_dir)
    assert {p: p.stat().st_mtime_ns for p in thumbs} == before


def test_thumbnail_of_a_transparent_png_keeps_size_ratio(tmp_path: Path) -> None:
    """RGBA sources become RGB JPEGs with the same aspect ratio, at most 320 wide."""
    src = tmp_path / "a.png"
    Image.new("RGBA", (1000, 500), (10, 200, 30, 128)).save(src)
    size = make_thumbnail(src, tmp_path / "t" / "a.jpg")
    assert size == (320, 160)
    with Image.open(tmp_path / "t" / "a.jpg") as thumb:
        assert thumb.mode == "RGB"


def test_make_thumbnails_keeps_the_order_of_many(tmp_path: Path) -> None:
    """Sizes come back in input order across the thread chunks; None if unreadable."""
    pairs: list[tuple[Path, Path]] = []
    for n in range(150):
        src = tmp_path / "src" / f"{n}.png"
        src.parent.mkdir(exist_ok=True)
        if n == 77:
            src.write_text("not an image")
        else:
            Image.new("RGB", (n + 1, 4), (n, 0, 0)).save(src)
        pairs.append((src, tmp_path / "thumbs" / f"{n}.jpg"))
    sizes = make_thumbnails(pairs)
    assert sizes == [None if n == 77 else (n + 1, 4) for n in range(150)]


def test_gallery_without_manifest_degrades(tmp_path: Path) -> None:
    """A moved manifest still gives a grid from the journal, with placeholders."""
    run = build_demo_run(tmp_path)
    info = json.loads((run.run_dir / "run.json").read_text())
    info["manifest"] = str(tmp_path / "gone.toml")
    (run.run_dir / "run.json").write_text(json.dumps(info))
    page = write_gallery(run.run_dir).read_text()
    cells = _cells(_parse(page))
    assert len(cells) == len(demo_keys := {c["data-key"] for c in cells})
    assert len(demo_keys) == 12  # 10 done + 1 failed + 1 pending, all from the journal
    assert 'class="ph"' in page


def test_empty_run_dir_gives_a_page(tmp_path: Path) -> None:
    """A run dir with no journal yet still gets a (nearly empty) page."""
    (tmp_path / "run.json").write_text("{}")
    page = write_gallery(tmp_path).read_text()
    assert "No tasks in this run yet" in page


# ---------------------------------------------------------------------------
# Real headless Chromium


def render_in_chromium(
    gallery: Path, profile: Path, *, screenshot: Path | None = None
) -> dict[str, object]:
    """Load ``gallery#check`` in headless Chromium; return the page's own check JSON.

    With ``screenshot``, also saves a 1400x1000 PNG of the page there.
    """
    binary = chromium()
    assert binary is not None
    url = gallery.resolve().as_uri() + "#check"
    env = {**os.environ, "HOME": str(profile)}
    dom = subprocess.run(
        [*headless_args(binary, profile / "dom"), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    ).stdout
    if screenshot is not None:
        subprocess.run(
            [
                *headless_args(binary, profile / "shot"),
                f"--screenshot={screenshot}",
                "--window-size=1400,1000",
                url,
            ],
            capture_output=True,
            timeout=60,
            check=True,
            env=env,
        )
    text = _parse(dom, text_of="check").text
    assert text, "the page's check script did not run:\n" + textwrap.shorten(dom, 2000)
    result = json.loads(text)
    assert isinstance(result, dict)
    return result


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)",
)
@pytest.mark.timeout(150)
def test_gallery_renders_in_headless_chromium(demo: DemoRun, tmp_path: Path) -> None:
    """Chromium loads every image, shows the full grid, and a cell shows its prompt."""
    shot = demo.run_dir / "gallery.png"
    result = render_in_chromium(demo.run_dir / GALLERY_NAME, tmp_path, screenshot=shot)
    assert result["broken"] == []
    assert result["loaded"] == result["images"] == 12
    assert result["cells"] == len(demo.references) * len(demo.variants) * demo.combos
    assert result["pairs"] == len(demo.references) * len(demo.variants)
    assert result["references"] == len(demo.references)
    assert result["variants"] == len(demo.variants)
    assert result["failed"] == 1
    key = result["selected_key"]
    assert isinstance(key, str)
    assert result["panel_key"] == key
    assert result["panel_prompt"] == demo.prompts[key]
    assert result["panel_seed"]
    assert result["panel_cost"] == "$0.06"
    with Image.open(shot) as png:
        assert png.size == (1400, 1000)


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)",
)
@pytest.mark.timeout(180)
def test_real_demo_run_gallery_in_headless_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox demo run: 24 images + 3 references load, 3x4x2 cells, prompts."""
    from pipeline.cli import main

    monkeypatch.delenv("RUNWARE_API_KEY", raising=False)
    demo_toml = Path(__file__).resolve().parent.parent / "jobs" / "demo.toml"
    run_dir = tmp_path / "demo"
    assert (
        main(["-q", "run", str(demo_toml), "--sandbox", "--run-dir", str(run_dir)]) == 0
    )
    shot = run_dir / "gallery.png"
    result = render_in_chromium(run_dir / GALLERY_NAME, tmp_path, screenshot=shot)
    assert result["broken"] == []
    assert result["loaded"] == result["images"] == 24 + 3  # results + references
    assert result["cells"] == 3 * 4 * 2
    assert result["pairs"] == 3 * 4
    assert result["failed"] == 0
    key = result["selected_key"]
    assert isinstance(key, str)
    sidecars = {
        json.loads(p.read_text())["key"]: json.loads(p.read_text())
        for p in (run_dir / "images").rglob("*.json")
    }
    assert result["panel_prompt"] == sidecars[key]["prompt"]
    assert result["panel_cost"] == "$0.08"


# ---------------------------------------------------------------------------
# Pages


def _journal_only_run(run_dir: Path, refs: int, variants: int) -> set[str]:
    """A run dir without manifest or image files: refs x variants done tasks."""
    run_dir.mkdir()
    events: list[Event] = []
    keys: set[str] = set()
    for n in range(refs * variants):
        key = f"ref{n // variants:02d}/v{n % variants}/s=1"
        keys.add(key)
        task_uuid = f"00000000-0000-4000-8000-{n:012d}"
        events.append(
            SubmittedEvent(
                ts=T0, key=key, task_uuid=task_uuid, images=1, estimate_usd=Decimal(1)
            )
        )
        events.append(
            CompletedEvent(
                ts=T0,
                key=key,
                task_uuid=task_uuid,
                image_uuid=task_uuid,
                index=0,
                path=f"images/{n}.jpg",
                sha256="0" * 64,
                bytes=1,
            )
        )
    anyio.run(_write, run_dir / JOURNAL_NAME, events)
    return keys


def test_big_grid_is_split_into_linked_pages(tmp_path: Path) -> None:
    """7 rows of 3 cells, 6 a page: 4 pages of whole rows, linked, each cell once."""
    run_dir = tmp_path / "run"
    keys = _journal_only_run(run_dir, refs=7, variants=3)
    first = write_gallery(run_dir, page_cells=6)
    assert first == run_dir / GALLERY_NAME
    names = [GALLERY_NAME, "gallery-2.html", "gallery-3.html", "gallery-4.html"]
    assert sorted(p.name for p in run_dir.glob("gallery*.html")) == sorted(names)
    seen: list[str | None] = []
    for number, name in enumerate(names, 1):
        page = (run_dir / name).read_text()
        parser = _parse(page)
        cells = _cells(parser)
        seen += [c["data-key"] for c in cells]
        assert len({c["data-ref"] for c in cells}) == (2 if number < 4 else 1)
        links = {str(a.get("href")) for tag, a in parser.tags if tag == "a"}
        assert set(names) - {name} <= links  # the page list
        rels = {a.get("rel"): a.get("href") for tag, a in parser.tags if tag == "a"}
        if number > 1:
            assert rels["prev"] == names[number - 2]
        if number < len(names):
            assert rels["next"] == names[number]
        assert page.count("image missing or unreadable") == len(cells)
        assert "21 tasks" in page  # the summary covers the whole run
    assert sorted(k or "" for k in seen) == sorted(keys)


def test_fewer_pages_remove_the_stale_ones(tmp_path: Path) -> None:
    """Rebuilt with room for everything, the run dir keeps a single page."""
    run_dir = tmp_path / "run"
    _journal_only_run(run_dir, refs=4, variants=2)
    write_gallery(run_dir, page_cells=2)
    assert len(list(run_dir.glob("gallery*.html"))) == 4
    page = write_gallery(run_dir).read_text()
    assert [p.name for p in run_dir.glob("gallery*.html")] == [GALLERY_NAME]
    assert 'class="pages"' not in page
    assert len(_cells(_parse(page))) == 8
