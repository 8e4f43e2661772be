"""Page benchmark: what the browser loads for the gallery and the HTML cost report of
a run dir, and how soon each paints.

Two run dirs made in-process against the ``--sandbox`` API, as the tests do: the demo
job (3 references x 4 variants x 2 strengths: 24 images) and a generated one of
``--refs`` x ``--variants`` x ``--strengths`` (default 10 x 25 x 4: 1,000 images).
For each, ``remix gallery`` writes the page, then headless Chromium (over the DevTools
protocol, ``tests/chromium.py``) opens it at 1400 x 900 from the file system and
reports the page weight (the HTML plus every resource fetched by the time the page
has loaded: the lazy thumbnails in view) and the first paint
(``performance.getEntriesByType('paint')``).

    python bench/gallery_page.py
    python bench/gallery_page.py --refs 4 --variants 5 --strengths 2 --shot docs/x.png

The cost report (``remix report RUN --format html``) is measured the same way: its
HTML plus the plotly.js file beside it, and its first paint and the time until every
chart is drawn.

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import anyio  # noqa: E402
from _common import JsonObject, emit, emit_json, scratch_dir  # noqa: E402

from pipeline.cli import main as remix  # noqa: E402
from tests.chromium import open_tab  # noqa: E402
from tests.jobkit import write_job  # noqa: E402

IN_VIEW_LOADED = """(function () {
  // Lazy images do not hold the load event back: wait for those in view.
  var seen = Array.prototype.filter.call(document.images, function (i) {
    var r = i.getBoundingClientRect();
    return i.getAttribute('src') && r.bottom > 0 && r.top < innerHeight &&
      r.right > 0 && r.left < innerWidth;
  });
  return seen.length > 0 && seen.every(function (i) { return i.complete; });
})()"""
MEASURE = """(function () {
  var paint = {};
  performance.getEntriesByType('paint').forEach(function (e) {
    paint[e.name] = e.startTime;
  });
  // Resource Timing leaves file: URLs out: the images that loaded say what was read.
  var loaded = Array.prototype.filter.call(document.images, function (i) {
    return i.complete && i.naturalWidth > 0;
  });
  return {
    paint: paint,
    cells: document.querySelectorAll('td.cell').length,
    img_elements: document.images.length,
    loaded: loaded.map(function (i) { return i.currentSrc; })
  };
})()"""


def _sandbox_run(job: Path, run_dir: Path) -> None:
    code = remix(["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)])
    if code != 0:
        raise SystemExit(f"remix run {job} exited {code}")


def _big_job(root: Path, refs: int, variants: int, strengths: int) -> Path:
    return write_job(
        root,
        refs=refs,
        variants=[
            {"id": f"style-{v:02d}", "positivePrompt": f"a {{thing}} in style {v}"}
            for v in range(variants)
        ],
        defaults={"width": 1344, "height": 768, "outputFormat": "JPG"},
        matrix={
            "providerSettings.ideogram.remixStrength": [
                10 + 80 * s // max(1, strengths - 1) for s in range(strengths)
            ]
        },
        name="gallery-bench",
    )


async def _open(url: str, profile: Path) -> tuple[dict[str, Any], bytes]:
    async with open_tab(profile, width=1400, height=900) as tab:
        await tab.goto(url)
        await tab.wait_for("performance.getEntriesByType('paint').length > 0")
        await tab.wait_for(IN_VIEW_LOADED)
        figures: dict[str, Any] = await tab.eval(MEASURE)
        return figures, await tab.screenshot()


def _save_small_png(png: bytes, path: Path) -> None:
    """The screenshot as a palette PNG: a README image, a fraction of the bytes."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(png)) as shot:
        rgb = shot.convert("RGB")
        small = rgb.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)


def measure(run_dir: Path, profile: Path, shot: Path | None = None) -> JsonObject:
    """Write the gallery of ``run_dir`` and open it; its weight and first paint."""
    started = time.perf_counter()
    if remix(["-q", "gallery", str(run_dir)]) != 0:
        raise SystemExit(f"remix gallery {run_dir} failed")
    write_s = time.perf_counter() - started
    page = run_dir / "gallery.html"
    seen, png = anyio.run(_open, page.resolve().as_uri(), profile)
    if shot is not None:
        _save_small_png(png, shot)
    loaded = [
        Path(unquote(urlsplit(name).path))
        for name in seen["loaded"]
        if name.startswith("file://")
    ]
    html_bytes = page.stat().st_size
    resource_bytes = sum(p.stat().st_size for p in loaded if p.is_file())
    thumbs = sorted((run_dir / "thumbs").rglob("*.jpg"))
    return {
        "cells": seen["cells"],
        "images": len(list((run_dir / "images").rglob("*.jpg")))
        + len(list((run_dir / "images").rglob("*.png"))),
        "gallery_write_s": round(write_s, 2),
        "html_kb": round(html_bytes / 1024, 1),
        "img_elements": seen["img_elements"],
        "initial_images_loaded": len(loaded),
        "initial_images_kb": round(resource_bytes / 1024, 1),
        "initial_page_weight_kb": round((html_bytes + resource_bytes) / 1024, 1),
        "all_thumbnails_kb": round(sum(p.stat().st_size for p in thumbs) / 1024, 1),
        "first_paint_ms": seen["paint"].get("first-paint"),
        "first_contentful_paint_ms": seen["paint"].get("first-contentful-paint"),
    }


CHARTS_DRAWN = """(function () {
  var plots = document.querySelectorAll('.js-plotly-plot');
  return plots.length > 0 && Array.prototype.every.call(plots, function (p) {
    return p.querySelector('.main-svg') !== null;
  });
})()"""


async def _open_report(url: str, profile: Path) -> dict[str, Any]:
    async with open_tab(profile, width=1400, height=900) as tab:
        await tab.goto(url)
        await tab.wait_for("performance.getEntriesByType('paint').length > 0")
        await tab.wait_for(CHARTS_DRAWN)
        figures: dict[str, Any] = await tab.eval(
            "(function () { var p = {}; performance.getEntriesByType('paint')"
            ".forEach(function (e) { p[e.name] = e.startTime; });"
            " return {paint: p, charts_drawn_ms: performance.now(),"
            " charts: document.querySelectorAll('.js-plotly-plot').length}; })()"
        )
        return figures


def measure_report(run_dir: Path, profile: Path) -> JsonObject:
    """Write the HTML cost report of ``run_dir`` and open it; weight and paint."""
    page = run_dir / "cost-report.html"
    started = time.perf_counter()
    if remix(["-q", "report", str(run_dir), "--format", "html", "-o", str(page)]):
        raise SystemExit(f"remix report {run_dir} failed")
    write_s = time.perf_counter() - started
    seen = anyio.run(_open_report, page.resolve().as_uri(), profile)
    script_bytes = sum(p.stat().st_size for p in run_dir.glob("plotly-*.min.js"))
    html_bytes = page.stat().st_size
    return {
        "report_write_s": round(write_s, 2),
        "html_kb": round(html_bytes / 1024, 1),
        "plotly_js_kb": round(script_bytes / 1024, 1),
        "page_weight_kb": round((html_bytes + script_bytes) / 1024, 1),
        "charts": seen["charts"],
        "first_paint_ms": seen["paint"].get("first-paint"),
        "first_contentful_paint_ms": seen["paint"].get("first-contentful-paint"),
        "charts_drawn_ms": round(seen["charts_drawn_ms"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", type=int, default=10)
    parser.add_argument("--variants", type=int, default=25)
    parser.add_argument("--strengths", type=int, default=4)
    parser.add_argument(
        "--shot", type=Path, help="save a 1400x900 PNG of the demo gallery here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    figures: JsonObject = {}
    with scratch_dir("gallery-page-", keep=args.keep) as work:
        demo = work / "demo"
        _sandbox_run(ROOT / "jobs" / "demo.toml", demo)
        figures["demo"] = measure(demo, work / "profile-demo", args.shot)
        emit(f"demo: {figures['demo']}")
        figures["demo_report"] = measure_report(demo, work / "profile-demo-report")
        emit(f"demo report: {figures['demo_report']}")
        big = work / "big"
        job = _big_job(work / "job", args.refs, args.variants, args.strengths)
        _sandbox_run(job, big)
        figures["big"] = measure(big, work / "profile-big")
        emit(f"big: {figures['big']}")
        figures["big_report"] = measure_report(big, work / "profile-big-report")
        emit(f"big report: {figures['big_report']}")
    emit_json(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
