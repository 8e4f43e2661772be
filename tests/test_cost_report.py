"""Cost over time: ``remix report --by day|week|month`` with ``--tz``, ``--since``
and ``--until`` on nights that span midnight and a DST change, and the HTML cost
report (``--format html``) checked in headless Chromium against ``--format json``."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import textwrap
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.cost_page import (
    COST_PAGE_NAME,
    cost_page_data,
    default_page_path,
    render_cost_page,
)
from pipeline.costs import build_report
from pipeline.journal_events import Event, FailedEvent, RunEndedEvent, SubmittedEvent
from pipeline.periods import Window, parse_date, period_label, resolve_zone
from pipeline.rundata import load_run
from tests.chromium import chromium, headless_args
from tests.test_report import PRICE, completed, started, submitted, uuid, write_journal

BERLIN = "Europe/Berlin"
ROOT = Path(__file__).resolve().parent.parent


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _done(n: int, key: str, at: str, cost: str) -> list[Event]:
    """A task submitted at ``at`` (UTC) and stored a minute later."""
    t = _at(at)
    return [
        submitted(n, key, t),
        completed(n, key, t.replace(minute=t.minute + 1), cost=Decimal(cost)),
    ]


def _night(run_dir: Path, events: list[Event]) -> None:
    tasks = sum(isinstance(e, SubmittedEvent) for e in events)
    write_journal(
        run_dir,
        [
            started(tasks, tasks, PRICE * tasks),
            *events,
            RunEndedEvent(
                ts=events[-1].ts, reason="finished", done=tasks, failed=0,
                spent_usd=Decimal(0),
            ),
        ],
    )  # fmt: skip


@pytest.fixture
def nights(tmp_path: Path) -> list[Path]:
    """Four nightly run dirs around Europe/Berlin's DST end (2026-10-25 03:00 CEST
    -> 02:00 CET), their tasks finishing near local midnight.

    In Berlin: 10-23 $0.0625; 10-24 $0.08 + a failure; 10-25 $0.1950 (one at 23:31
    CET, which a fixed +02:00 would put on 10-26); 10-26 $0.09; 11-01 $0.0625.
    In UTC: 10-23 $0.1425 + the failure; 10-24 $0.0625; 10-25 $0.2225; 10-31 $0.0625.
    """
    root = tmp_path / "runs"
    failed_at = _at("2026-10-23T22:41:00")
    _night(
        root / "night-1",
        [
            *_done(1, "atrium/deco/s=1", "2026-10-23T21:30:00", "0.0625"),
            *_done(2, "lobby/paper/s=2", "2026-10-23T22:30:00", "0.08"),
            submitted(3, "lobby/deco/s=1", _at("2026-10-23T22:40:00")),
            FailedEvent(
                ts=failed_at, key="lobby/deco/s=1", task_uuid=uuid(3), code="x",
                message="-bad", retryable=False,
            ),
        ],
    )  # fmt: skip
    _night(
        root / "night-2",
        [
            *_done(4, "atrium/paper/s=1", "2026-10-24T22:30:00", "0.0625"),
            *_done(5, "atrium/deco/s=2", "2026-10-25T01:30:00", "0.07"),
        ],
    )
    _night(
        root / "night-3",
        [
            *_done(6, "lobby/deco/s=1", "2026-10-25T22:30:00", "0.0625"),
            *_done(7, "lobby/paper/s=2", "2026-10-25T23:30:00", "0.09"),
        ],
    )
    _night(
        root / "night-4", _done(8, "atrium/deco/s=1", "2026-10-31T23:30:00", "0.0625")
    )
    return sorted(root.iterdir())


def _groups(
    dirs: list[Path], by: str, tz: str, **window: date
) -> list[tuple[str, str, int, int]]:
    report = build_report(
        [load_run(d) for d in dirs],
        by=by,
        zone=resolve_zone(tz),
        window=Window(**window),
    )
    return [(g.group, str(g.cost_usd), g.images, g.failed) for g in report.groups]


# ---------------------------------------------------------------------------
# Periods and zones


def test_period_labels() -> None:
    """Days ISO, weeks ISO 8601 (2027-01-01 is in 2026's week 53), months YYYY-MM."""
    day = date(2026, 12, 5)
    assert [period_label(day, k) for k in ("day", "week", "month")] == [
        "2026-12-05",
        "2026-W49",
        "2026-12",
    ]
    assert period_label(date(2027, 1, 1), "week") == "2026-W53"
    assert period_label(date(2026, 1, 5), "week") == "2026-W02"
    assert parse_date(" 2026-10-25 ") == date(2026, 10, 25)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_date("25.10.2026")
    with pytest.raises(ValueError, match="IANA"):
        resolve_zone("Mars/Olympus")
    with pytest.raises(ValueError, match="after --until"):
        Window(date(2026, 10, 26), date(2026, 10, 25))


def test_days_are_cut_in_the_zone_across_dst(nights: list[Path]) -> None:
    """Berlin days follow CEST then CET; UTC days differ; a fixed +02:00 is wrong
    after the change (23:31 CET on 10-25 is not 10-26)."""
    assert _groups(nights, "day", BERLIN) == [
        ("2026-10-23", "0.0625", 1, 0),
        ("2026-10-24", "0.08", 1, 1),
        ("2026-10-25", "0.1950", 3, 0),
        ("2026-10-26", "0.09", 1, 0),
        ("2026-11-01", "0.0625", 1, 0),
    ]
    assert _groups(nights, "day", "UTC") == [
        ("2026-10-23", "0.1425", 2, 1),
        ("2026-10-24", "0.0625", 1, 0),
        ("2026-10-25", "0.2225", 3, 0),
        ("2026-10-31", "0.0625", 1, 0),
    ]
    fixed = {g[0]: g[1] for g in _groups(nights, "day", "Etc/GMT-2")}
    assert fixed["2026-10-25"] == "0.1325"
    assert fixed["2026-10-26"] == "0.1525"


def test_by_week_and_month(nights: list[Path]) -> None:
    """ISO weeks and months, in Berlin and in UTC."""
    assert _groups(nights, "week", BERLIN) == [
        ("2026-W43", "0.3375", 5, 1),
        ("2026-W44", "0.1525", 2, 0),
    ]
    assert _groups(nights, "month", BERLIN) == [
        ("2026-10", "0.4275", 6, 1),
        ("2026-11", "0.0625", 1, 0),
    ]
    assert _groups(nights, "month", "UTC") == [("2026-10", "0.4900", 7, 1)]
    assert _groups(nights, "week", "UTC") == [
        ("2026-W43", "0.4275", 6, 1),
        ("2026-W44", "0.0625", 1, 0),
    ]


def test_since_and_until_are_inclusive_local_dates(nights: list[Path]) -> None:
    """--since D --until D keeps all of local day D (both ends), costs and estimates."""
    one_day = {"since": date(2026, 10, 25), "until": date(2026, 10, 25)}
    assert _groups(nights, "day", BERLIN, **one_day) == [("2026-10-25", "0.1950", 3, 0)]
    assert _groups(nights, "day", "UTC", **one_day) == [("2026-10-25", "0.2225", 3, 0)]
    report = build_report(
        [load_run(d) for d in nights],
        by="variant",
        zone=resolve_zone(BERLIN),
        window=Window(since=date(2026, 10, 24), until=date(2026, 10, 25)),
    )
    assert (report.total.cost_usd, report.total.failed) == (Decimal("0.2750"), 1)
    assert report.total.estimate_usd == PRICE * 5  # tasks 2-6, by submission date
    assert report.spent_usd == Decimal("0.4900")  # the journals' whole total
    assert report.to_json()["since"] == "2026-10-24"
    assert report.to_json()["tz"] == BERLIN
    since_only = _groups(nights, "month", BERLIN, since=date(2026, 10, 26))
    assert since_only == [("2026-10", "0.09", 1, 0), ("2026-11", "0.0625", 1, 0)]
    until_only = _groups(nights, "run", BERLIN, until=date(2026, 10, 23))
    assert until_only == [("night-1", "0.0625", 1, 0)]


@pytest.fixture
def berlin_local() -> Iterator[None]:
    """This process's local zone set to Europe/Berlin (TZ and tzset)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = BERLIN
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("berlin_local")
def test_default_zone_is_the_machines(nights: list[Path]) -> None:
    """Without --tz, days start at local midnight (not UTC's), DST included."""
    report = build_report([load_run(d) for d in nights], by="day")
    assert [g.group for g in report.groups] == [
        "2026-10-23",
        "2026-10-24",
        "2026-10-25",
        "2026-10-26",
        "2026-11-01",
    ]
    assert report.tz == BERLIN


def test_report_command_with_periods(
    nights: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The flags reach the report; bad zones, dates and windows exit 2."""
    args = ["report", *map(str, nights), "--tz", BERLIN, "--format", "json"]
    assert main([*args, "--by", "week", "--since", "2026-10-24"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(g["group"], g["cost_usd"]) for g in data["groups"]] == [
        ("2026-W43", "0.2750"),
        ("2026-W44", "0.1525"),
    ]
    assert (data["tz"], data["since"], data["until"]) == (BERLIN, "2026-10-24", None)
    assert main(["report", str(nights[0]), "--by", "day", "--until", "2026-10-23",
                 "--tz", "UTC"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "dates start to 2026-10-23 (UTC, inclusive): $0.1425" in table
    assert main([*args, "--tz", "Mars/Olympus"]) == 2
    assert "unknown time zone 'Mars/Olympus'" in capsys.readouterr().err
    assert main([*args, "--since", "2026-10-26", "--until", "2026-10-25"]) == 2
    assert "is after --until" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*args, "--since", "yesterday"])
    assert exc.value.code == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_report_output_file(
    nights: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-o writes the CSV (or table, JSON) to a file and prints its path."""
    out = tmp_path / "costs.csv"
    assert main(["report", *map(str, nights), "--by", "month", "--tz", "UTC",
                 "--format", "csv", "-o", str(out)]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().splitlines()[1].startswith("2026-10,7,1,0,0.4900")


# ---------------------------------------------------------------------------
# The HTML page


class _Page(HTMLParser):
    """Collects script sources, link targets and the text of one element by id."""

    def __init__(self, text_of: str = "") -> None:
        super().__init__()
        self.text_of, self.inside, self.text = text_of, 0, ""
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.srcs += [v for k, v in attrs if k in ("src", "href") and v]
        if self.inside or (self.text_of and a.get("id") == self.text_of):
            self.inside += 1

    def handle_endtag(self, tag: str) -> None:
        if self.inside:
            self.inside -= 1

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.text += data


def test_html_page_is_written_beside_the_runs(
    nights: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Default: the run dirs' common parent; plotly.js beside it; nothing remote;
    user text escaped; the template's JS and CSS inlined verbatim."""
    assert main(["report", *map(str, nights), "--format", "html", "--tz", BERLIN]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == default_page_path(nights) == tmp_path / "runs" / COST_PAGE_NAME
    html = page.read_text()
    parser = _Page()
    parser.feed(html)
    assert len(parser.srcs) == 1
    assert parser.srcs[0].startswith("plotly-")
    assert (page.parent / parser.srcs[0]).stat().st_size > 1_000_000
    assert "http://" not in html.replace("http://www.w3.org", "")
    assert "https://" not in html
    assets = files("pipeline") / "assets"
    assert assets.joinpath("report.js").read_text() in html
    assert assets.joinpath("report.css").read_text() in html
    other = tmp_path / "elsewhere" / "nightly.html"
    assert main(["report", str(nights[0]), "--format", "html", "-o", str(other)]) == 0
    assert capsys.readouterr().out.strip() == str(other)
    assert (other.parent / parser.srcs[0]).is_file()


def test_html_page_escapes_user_text(tmp_path: Path) -> None:
    """References are user input: markup in one stays text, in the tables and in
    the page's JSON (which cannot close its script element)."""
    evil = "<img src=x onerror=alert(1)></script><script>alert(2)<!--"
    run_dir = tmp_path / "night"
    _night(run_dir, _done(1, f"{evil}/deco", "2026-10-23T21:30:00", "0.0625"))
    data = cost_page_data([load_run(run_dir)], zone=resolve_zone("UTC"))
    html = render_cost_page(data, plotly_src="plotly.min.js")
    assert "<img" not in html
    assert "alert(2)" in html  # as text
    assert "<script>alert" not in html
    assert html.count("</script>") == 3  # the JSON, plotly.js and the page's own
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_report_assets_are_package_data() -> None:
    """pyproject's package-data patterns cover every file in pipeline/assets."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["pipeline"]
    assets = [p for p in (ROOT / "pipeline" / "assets").iterdir() if p.is_file()]
    assert any(p.name == "report.html.j2" for p in assets)
    for path in assets:
        name = f"assets/{path.name}"
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name


# ---------------------------------------------------------------------------
# Real headless Chromium


def _console_messages(stderr: str) -> list[str]:
    """The page's console messages in Chromium's log (logged at INFO, whatever
    their level; uncaught exceptions too): the page logs nothing when all is well."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def render_report(page: Path, profile: Path, screenshot: Path) -> dict[str, Any]:
    """Open ``page#check`` in headless Chromium: the page's own account of what its
    charts drew (values and SVG bar heights), with no console errors; and a
    1400x1600 screenshot."""
    binary = chromium()
    assert binary is not None
    url = page.resolve().as_uri() + "#check"
    env = {**os.environ, "HOME": str(profile)}
    run = subprocess.run(
        [*headless_args(binary, profile / "dom"), "--dump-dom", url],
        capture_output=True, text=True, timeout=90, check=True, env=env,
    )  # fmt: skip
    assert _console_messages(run.stderr) == []
    subprocess.run(
        [*headless_args(binary, profile / "shot"), f"--screenshot={screenshot}",
         "--window-size=1400,1600", page.resolve().as_uri()],
        capture_output=True, timeout=90, check=True, env=env,
    )  # fmt: skip
    parser = _Page(text_of="check")
    parser.feed(run.stdout)
    assert parser.text, "the check did not run:\n" + textwrap.shorten(run.stdout, 2000)
    result = json.loads(parser.text)
    assert isinstance(result, dict)
    return result


def _json_report(
    dirs: list[Path], by: str, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    args = ["report", *map(str, dirs), "--by", by, "--tz", BERLIN, "--format", "json"]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _near(a: float | None, b: str | float | Decimal) -> bool:
    return a is not None and abs(a - float(b)) < 1e-9


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)",
)
@pytest.mark.timeout(200)
def test_html_report_in_headless_chromium(
    nights: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's drawn bars carry report --format json's numbers: per day (stacks
    summed), per variant (a stack's bars summed), failures, estimate vs actual, the
    cumulative line; the SVG bar heights agree; switching to weeks by reference
    redraws with the weekly numbers."""
    assert main(["report", *map(str, nights), "--format", "html", "--tz", BERLIN]) == 0
    page = Path(capsys.readouterr().out.strip())
    shot = tmp_path / "cost-report.png"
    result = render_report(page, tmp_path / "profile", shot)
    assert result["errors"] == []
    assert (result["period"], result["stack"]) == ("day", "variant")
    charts = result["charts"]
    assert isinstance(charts, dict)

    by_day = _json_report(nights, "day", capsys)
    days = {g["group"]: g for g in by_day["groups"]}
    spend = charts["spend"]
    bars = [t for t in spend if t["type"] == "bar"]
    x = bars[0]["x"]
    assert x[0] == "2026-10-23"
    assert x[-1] == "2026-11-01"
    assert len(x) == 10  # every day of the span, quiet ones as empty bars
    for i, day in enumerate(x):
        drawn = sum(t["y"][i] for t in bars)
        assert _near(drawn, days[day]["cost_usd"] if day in days else 0), day
        svg = sum(t["svg"][i] for t in bars)
        assert abs(svg - drawn) < 0.002, day  # SVG heights, within a pixel
    by_variant = _json_report(nights, "variant", capsys)
    assert sorted(t["name"] for t in bars) == sorted(
        g["group"] for g in by_variant["groups"]
    )
    for group in by_variant["groups"]:
        trace = next(t for t in bars if t["name"] == group["group"])
        assert _near(sum(trace["y"]), group["cost_usd"]), group["group"]
    line = next(t for t in spend if t["name"] == "cumulative")
    assert _near(line["y"][-1], by_day["total"]["cost_usd"])

    failures = charts["failures"]
    for i, day in enumerate(x):
        failed = sum(t["y"][i] for t in failures)
        assert failed == (days[day]["failed"] if day in days else 0), day
    estimate = {t["name"]: t for t in charts["estimate"]}
    for i, day in enumerate(x):
        if day in days:
            assert _near(estimate["estimate"]["y"][i], days[day]["estimate_usd"])
            assert _near(estimate["actual"]["y"][i], days[day]["cost_usd"])
    per_image = next(t for t in charts["per-image"] if t["name"] == "all")
    assert _near(per_image["y"][x.index("2026-10-25")], Decimal("0.1950") / 3)

    by_reference = _json_report(nights, "reference", capsys)
    refs = charts["references"][0]
    assert dict(zip(refs["x"], refs["y"], strict=True)) == pytest.approx(
        {g["group"]: float(g["cost_usd"]) for g in by_reference["groups"]}
    )

    switched = result["switched"]
    assert (switched["period"], switched["stack"]) == ("week", "reference")
    weekly = [t for t in switched["spend"] if t["type"] == "bar"]
    by_week = _json_report(nights, "week", capsys)
    assert weekly[0]["x"] == [g["group"] for g in by_week["groups"]]
    for i, group in enumerate(by_week["groups"]):
        assert _near(sum(t["y"][i] for t in weekly), group["cost_usd"])
    assert {t["name"] for t in weekly} == {"atrium", "lobby"}
    with Image.open(shot) as png:
        assert png.size == (1400, 1600)


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)",
)
@pytest.mark.timeout(200)
def test_empty_html_report_in_headless_chromium(tmp_path: Path) -> None:
    """A run that spent nothing yet still gives a page without errors."""
    write_journal(tmp_path / "runs" / "night", [started(1, 1, PRICE)])
    page = tmp_path / "page" / "report.html"
    assert main(["report", str(tmp_path / "runs" / "night"), "--format", "html",
                 "-o", str(page)]) == 0  # fmt: skip
    result = render_report(page, tmp_path / "profile", tmp_path / "empty.png")
    assert result["errors"] == []
    assert result["charts"]["failures"] == []
    assert "Nothing was spent" in page.read_text()
