"""Browsing the gallery in a real headless Chromium: the lightbox and its keys,
picks that survive a reload and come back through ``--picks``, runs compared side
by side, a page that never reaches outside its run dir, and a grid that has the
window to itself until a cell is pinned."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import pytest

from pipeline.cli import main
from pipeline.gallery import GALLERY_NAME, write_gallery
from tests.chromium import Tab, chromium, open_tab
from tests.test_gallery import DemoRun, _cells, _parse, build_demo_run

pytestmark = [
    pytest.mark.skipif(
        chromium() is None,
        reason="no chromium binary (Debian: apt-get install chromium; .ci/run "
        "installs it)",
    ),
    pytest.mark.timeout(180),
]

LIGHTBOX_KEY = "document.getElementById('lightbox').dataset.key"
LIGHTBOX_OPEN = "!document.getElementById('lightbox').hidden"
GRID_KEYS = "Array.from(document.querySelectorAll('td.cell'), td => td.dataset.key)"
PICKED = "Array.from(document.querySelectorAll('td.cell.picked'), td => td.dataset.key)"
URLS = """(function () {
  var found = [];
  document.querySelectorAll('[src], [href]').forEach(function (el) {
    ['src', 'href'].forEach(function (name) {
      var value = el.getAttribute(name);
      if (value !== null) found.push(value);
    });
  });
  var meta = JSON.parse(document.getElementById('data').textContent);
  meta.cells.forEach(function (c) {
    c.i.forEach(function (img) { found.push(img.f); if (img.th) found.push(img.th); });
  });
  return found;
})()"""
LOADED = (
    "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
    ".map(i => i.currentSrc)"
)
"""What the page did load (Resource Timing leaves file: URLs out)."""


@pytest.fixture
def demo(tmp_path: Path) -> DemoRun:
    run = build_demo_run(tmp_path / "demo")
    write_gallery(run.run_dir)
    return run


def _browse(
    profile: Path,
    script: Callable[[Tab], Awaitable[Any]],
    downloads: Path | None = None,
) -> Any:
    """Run ``script(tab)`` in a headless Chromium at 1400 x 900 (its profile kept in
    ``profile``, so localStorage is too)."""

    async def go() -> Any:
        async with open_tab(profile, downloads=downloads) as tab:
            return await script(tab)

    return anyio.run(go)


def test_lightbox_keys_walk_the_cells_in_grid_order(
    demo: DemoRun, tmp_path: Path
) -> None:
    """Click opens the first image large; -> visits every cell in grid order, <-
    steps back, down goes to the same column of the next reference, Esc closes."""
    page = demo.run_dir / GALLERY_NAME
    order = [c["data-key"] for c in _cells(_parse(page.read_text()))]
    per_row = len(demo.variants) * demo.combos

    async def script(tab: Tab) -> Any:
        await tab.goto(page.as_uri())
        await tab.click("td.cell.done img")
        clicked = await tab.eval(LIGHTBOX_KEY)
        await tab.key("Escape")
        await tab.eval("document.querySelector('td.cell').focus()")
        await tab.key("Enter")
        seen = [await tab.eval(LIGHTBOX_KEY)]
        details = await tab.eval("document.getElementById('lb-prompt').textContent")
        for _ in order[1:]:
            await tab.key("ArrowRight")
            seen.append(await tab.eval(LIGHTBOX_KEY))
        await tab.key("ArrowRight")  # past the last cell: stays there
        last = await tab.eval(LIGHTBOX_KEY)
        await tab.key("ArrowLeft")
        back = await tab.eval(LIGHTBOX_KEY)
        await tab.key("Escape")
        await tab.eval("document.querySelector('td.cell').focus()")
        await tab.key("Enter")
        await tab.key("ArrowDown")
        down = await tab.eval(LIGHTBOX_KEY)
        await tab.key("ArrowUp")
        up = await tab.eval(LIGHTBOX_KEY)
        src = await tab.eval("document.getElementById('lb-img').getAttribute('src')")
        await tab.key("Escape")
        return {
            "clicked": clicked,
            "seen": seen,
            "details": details,
            "last": last,
            "back": back,
            "down": down,
            "up": up,
            "src": src,
            "open": await tab.eval(LIGHTBOX_OPEN),
        }

    result = _browse(tmp_path / "profile", script)
    assert isinstance(result, dict)
    assert result["clicked"] == next(
        c["data-key"]
        for c in _cells(_parse(page.read_text()))
        if "done" in str(c["class"]).split()
    )
    assert result["seen"] == order
    assert result["details"] == demo.prompts[str(order[0])]
    assert result["last"] == order[-1]
    assert result["back"] == order[-2]
    assert result["down"] == order[per_row]  # same variant and strength, next ref
    assert result["up"] == order[0]
    assert (demo.run_dir / str(result["src"])).is_file()  # the full image
    assert result["open"] is False


def test_picks_survive_a_reload_and_come_back_through_picks(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Star one cell with `s` in the lightbox, one with `s` on the focused cell and
    one with a click on its star; after a reload they are still starred; the
    exported file lists exactly them, and `remix gallery RUN --picks FILE` marks
    exactly them in the written page."""
    page = demo.run_dir / GALLERY_NAME
    downloads = tmp_path / "downloads"
    order = [str(c["data-key"]) for c in _cells(_parse(page.read_text()))]
    done = [
        str(c["data-key"])
        for c in _cells(_parse(page.read_text()))
        if "done" in str(c["class"]).split()
    ]
    third = f'td.cell[data-key="{done[2]}"] .star'

    async def star(tab: Tab) -> Any:
        await tab.goto(page.as_uri())
        await tab.click("td.cell img")
        await tab.key("ArrowRight")
        await tab.key("s")
        await tab.key("Escape")
        fourth = json.dumps(f'td.cell[data-key="{done[3]}"]')
        await tab.eval(f"document.querySelector({fourth}).focus()")
        await tab.key("s")
        await tab.click(third)
        return await tab.eval(PICKED)

    async def reload_and_export(tab: Tab) -> Any:
        await tab.goto(page.as_uri())
        await tab.reload()
        picked = await tab.eval(PICKED)
        await tab.click("#export-picks")
        for _ in range(200):  # the browser writes the download
            if (downloads / "picks.json").is_file():
                break
            await anyio.sleep(0.05)
        return picked

    starred = _browse(tmp_path / "profile", star)
    assert sorted(starred) == sorted({order[1], done[2], done[3]})
    after = _browse(tmp_path / "profile", reload_and_export, downloads=downloads)
    assert after == starred
    exported = downloads / "picks.json"
    data = json.loads(exported.read_text())
    assert sorted(p["key"] for p in data["picks"]) == sorted(starred)
    for pick in data["picks"]:
        for image in pick["images"]:
            assert (demo.run_dir / image).is_file()

    (demo.run_dir / "thumbs").rename(tmp_path / "old-thumbs")  # a fresh page
    assert main(["gallery", str(demo.run_dir), "--picks", str(exported)]) == 0
    marked = _cells(_parse(page.read_text()))
    assert sorted(
        str(c["data-key"]) for c in marked if "picked" in str(c["class"]).split()
    ) == sorted(starred)

    async def fresh_profile(tab: Tab) -> Any:
        await tab.goto(page.as_uri())
        return await tab.eval(PICKED)

    assert sorted(_browse(tmp_path / "other", fresh_profile)) == sorted(starred)

    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text('{"picks": [{"key": "nowhere/at-all"}]}')
    assert main(["gallery", str(demo.run_dir), "--picks", str(bad)]) == 2
    assert f"picks file {bad}" in capsys.readouterr().err
    bad.write_text("not json")
    assert main(["gallery", str(demo.run_dir), "--picks", str(bad)]) == 2
    assert f"picks file {bad}: not JSON" in capsys.readouterr().err


def _assert_stays_home(
    tab_urls: object, loaded: object, page: Path, home: Path
) -> None:
    """Every URL is relative, resolves to an existing file under ``home``, and
    every image the browser loaded is such a file."""
    assert isinstance(tab_urls, list)
    assert tab_urls
    for url in tab_urls:
        parts = urlsplit(url)
        assert not parts.scheme, url
        assert not parts.netloc, url
        assert not url.startswith("/"), url
        if not parts.path:
            continue  # a fragment
        target = (page.parent / unquote(parts.path)).resolve()
        assert target.is_file(), url
        assert target.is_relative_to(home.resolve()), url
    assert isinstance(loaded, list)
    assert loaded
    for name in loaded:
        parts = urlsplit(name)
        assert parts.scheme in {"file", "blob", "data"}, name
        if parts.scheme == "file":
            assert Path(unquote(parts.path)).resolve().is_relative_to(home.resolve())


def test_no_request_leaves_the_run_dir(demo: DemoRun, tmp_path: Path) -> None:
    """Every src and href of the page (and every image in its data) is relative and
    exists inside the run dir, reference images included; nothing else loads."""
    page = demo.run_dir / GALLERY_NAME

    async def script(tab: Tab) -> Any:
        await tab.goto(page.as_uri() + "#check")
        await tab.wait_for("document.documentElement.dataset.checked")
        await tab.click("td.cell img")
        return await tab.eval(URLS), await tab.eval(LOADED)

    urls, loaded = _browse(tmp_path / "profile", script)
    _assert_stays_home(urls, loaded, page, demo.run_dir)
    refs = [u for u in urls if "references/" in u]
    assert len(refs) == len(demo.references)


def test_runs_compared_side_by_side(tmp_path: Path) -> None:
    """Two runs of one job (not shards): each cell shows both runs' images, labelled
    by run; the page beside them links relatively into both."""
    a = build_demo_run(tmp_path / "a")
    b = build_demo_run(tmp_path / "b")
    night_a = a.run_dir.rename(tmp_path / "night-1")
    night_b = b.run_dir.rename(tmp_path / "night-2")
    out = tmp_path / "site" / "compare.html"
    out.parent.mkdir()
    assert main(["gallery", str(night_a), str(night_b), "--out", str(out)]) == 0
    cells = _cells(_parse(out.read_text()))
    assert len(cells) == len(a.references) * len(a.variants) * a.combos

    async def script(tab: Tab) -> Any:
        await tab.goto(out.as_uri() + "#check")
        await tab.wait_for("document.documentElement.dataset.checked")
        runs = await tab.eval(
            "Array.from(document.querySelectorAll('td.cell.done'), td => "
            "[td.dataset.key, Array.from(td.querySelectorAll('a[data-run]'), "
            "a => a.querySelector('.run').textContent)])"
        )
        return runs, await tab.eval(URLS), await tab.eval(LOADED)

    runs, urls, loaded = _browse(tmp_path / "profile", script)
    assert isinstance(runs, list)
    assert len(runs) == 10  # the done tasks of the demo run, in both nights
    for _key, labels in runs:
        assert labels == ["night-1", "night-2"]
    _assert_stays_home(urls, loaded, out, tmp_path)
    assert any(u.startswith("../night-1/") for u in urls)
    assert any(u.startswith("../night-2/") for u in urls)


def test_details_panel_takes_no_room_until_a_cell_is_pinned(
    demo: DemoRun, tmp_path: Path
) -> None:
    """At 1400 px the grid has the window: the panel is 0 wide until a cell is
    pinned, then opens, and Esc folds it again; wide grids scroll in their area."""
    page = demo.run_dir / GALLERY_NAME
    width = "document.getElementById('panel').getBoundingClientRect().width"

    async def script(tab: Tab) -> Any:
        await tab.goto(page.as_uri())
        before = await tab.eval(width)
        await tab.eval("document.querySelector('td.cell.failed').click()")
        pinned = await tab.eval(width)
        await tab.key("Escape")
        after = await tab.eval(width)
        body = await tab.eval("document.documentElement.scrollWidth")
        return [before, pinned, after, body]

    before, pinned, after, body = _browse(tmp_path / "profile", script)
    assert before == 0
    assert pinned > 300
    assert after == 0
    assert body == 1400  # the page never scrolls sideways; the grid area does
