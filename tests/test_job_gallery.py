"""``remix gallery S0 S1 [--out PAGE]``: one page for the run dirs of one job's
shards, every link relative to wherever the page is written."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from pipeline.cli import main
from pipeline.gallery import write_job_gallery
from tests.jobkit import write_job


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNWARE_API_KEY", raising=False)
    monkeypatch.delenv("REMIX_BASE_URL", raising=False)


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """An 8-task job run as shards 0/2 and 1/2 into runs/s0 and runs/s1."""
    variants = [{"id": f"v{i}", "positivePrompt": f"style {i}"} for i in range(4)]
    job = write_job(tmp_path / "job", refs=2, variants=variants, name="nightly")
    dirs = []
    for index in range(2):
        run_dir = tmp_path / "runs" / f"s{index}"
        argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
        assert main([*argv, "--shard", f"{index}/2"]) == 0
        dirs.append(run_dir)
    return dirs


def links(page: Path) -> list[str]:
    """Every href/src of the page and every image path in its cell data."""
    text = page.read_text()
    found = re.findall(r'(?:href|src)="([^"#]+)"', text)
    found += [f.replace("\\/", "/") for f in re.findall(r'"(?:f|th)":"([^"]+)"', text)]
    return [unquote(html.unescape(f)) for f in found if not f.startswith("file:")]


def assert_links_resolve(page: Path, expected_images: int) -> None:
    targets = links(page)
    images = {t for t in targets if "images/" in t and "thumbs/" not in t}
    assert len(images) == expected_images
    for target in targets:
        assert (page.parent / target).is_file(), target


def test_one_page_shows_every_shard(
    shards: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """gallery S0 S1 writes JOB-gallery.html beside them: all 8 cells, done, with
    images and thumbnails that open from there."""
    capsys.readouterr()
    assert main(["gallery", *map(str, shards)]) == 0
    page = shards[0].parent / "nightly-gallery.html"
    assert capsys.readouterr().out.strip() == str(page)
    text = page.read_text()
    keys = set(re.findall(r'data-key="([^"]+)"', text))
    assert keys == {f"r{r}/v{v}" for r in range(2) for v in range(4)}
    assert text.count('class="cell done') == 8
    assert "8 tasks · 8 images · shards 0/2, 1/2 · $0.64 spent" in text
    assert_links_resolve(page, 8)


def test_out_puts_the_page_anywhere(
    shards: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out site/night.html: links climb back to the run dirs; later pages are
    site/night-2.html..."""
    out = tmp_path / "site with space" / "night.html"
    out.parent.mkdir()
    assert main(["gallery", *map(str, shards), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_links_resolve(out, 8)
    assert "../runs/s0/images/" in out.read_text()
    write_job_gallery(shards, out=out, page_cells=4)
    assert (out.parent / "night-2.html").is_file()
    assert 'href="night-2.html"' in out.read_text()
    write_job_gallery(shards, out=out)
    assert not (out.parent / "night-2.html").exists()


def test_one_shard_alone_keeps_its_own_page(
    shards: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """gallery S0: S0/gallery.html, that shard's cells only (as before)."""
    assert main(["gallery", str(shards[0])]) == 0
    page = shards[0] / "gallery.html"
    assert capsys.readouterr().out.strip() == str(page)
    cells = set(re.findall(r'data-key="([^"]+)"', page.read_text()))
    other = set(
        re.findall(r'data-key="([^"]+)"', (shards[1] / "gallery.html").read_text())
    )
    assert cells
    assert other
    assert not cells & other
    assert len(cells | other) == 8
    assert_links_resolve(page, len(cells))


def test_gallery_refuses_what_is_not_one_jobs_shards(
    shards: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same shard twice, or a directory that is not a run dir: exit 2."""
    assert main(["gallery", str(shards[0]), str(shards[0])]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["gallery", str(shards[0]), str(tmp_path / "nope")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_the_same_shard_on_two_nights_is_compared(
    shards: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shard 0/2 run on two nights is not one job's shards: one page compares them,
    each done cell with both nights' images."""
    job = tmp_path / "job" / "job.toml"
    again = tmp_path / "runs" / "s0-night2"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(again)]
    assert main([*argv, "--shard", "0/2"]) == 0
    assert main(["gallery", str(shards[0]), str(again)]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    text = page.read_text()
    assert "comparing s0 | s0-night2" in text
    cells = re.findall(r'<td class="cell done[^>]*>(.*?)</td>', text)
    assert cells
    for cell in cells:
        assert 'data-run="0"' in cell
        assert 'data-run="1"' in cell
    assert_links_resolve(page, 2 * len(cells))
