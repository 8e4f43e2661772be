"""The HTML cost report (``remix report --format html``): spend over nights as charts.

Python hands plain data to a Jinja2 template (``assets/report.html.j2`` with its CSS
and JS inlined); the page draws its charts with Plotly.js in the browser, so the
period (day, week, month) and the stacking axis (variant, reference, run, a matrix
axis) can be switched in the page. Plotly.js comes from the ``plotly`` package and
is written once beside the page as ``plotly-<version>.min.js``, referenced
relatively: the page opens from the file system with no network or CDN, and every
report in that folder shares one cached copy.

Every number comes from :func:`pipeline.costs.build_report` or the same ledger rows
and period labels, so the page agrees with ``remix report --format json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Final

from pipeline.costs import NONE_LABEL, GroupTotals, build_report, parse_by
from pipeline.ledger import parse_key
from pipeline.periods import (
    OPEN_WINDOW,
    PERIOD_KINDS,
    PeriodKind,
    Window,
    Zone,
    period_label,
    resolve_zone,
)
from pipeline.rundata import RunData
from pipeline.storage import write_atomic_sync

COST_PAGE_NAME: Final = "cost-report.html"
TOP_REFERENCES: Final = 15
"""How many of the most expensive references the page lists."""
MAX_FILLED_DAYS: Final = 3 * 366
"""Days without activity are shown as empty bars, unless the span is longer."""


def default_page_path(run_dirs: Sequence[Path]) -> Path:
    """Where the page goes without ``-o``: the folder holding the run dirs (their
    common parent), so nightly runs ``runs/night-*`` give ``runs/cost-report.html``."""
    parents = [str(d.resolve().parent) for d in run_dirs]
    return Path(os.path.commonpath(parents)) / COST_PAGE_NAME


def _all_periods(days: set[date], has_none: bool) -> dict[str, list[str]]:
    """Every period from the first day to the last (gaps as empty bars)."""
    ordered = sorted(days)
    if ordered and (ordered[-1] - ordered[0]).days < MAX_FILLED_DAYS:
        span = (ordered[-1] - ordered[0]).days
        ordered = [ordered[0] + timedelta(days=i) for i in range(span + 1)]
    periods: dict[str, list[str]] = {}
    for kind in PERIOD_KINDS:
        labels = list(dict.fromkeys(period_label(d, kind) for d in ordered))
        periods[kind] = [*labels, NONE_LABEL] if has_none else labels
    return periods


RECORD_FIELDS: Final = (
    "day",
    "run",
    "key",
    "cost",
    "estimate",
    "images",
    "failed",
    "in_flight",
)
"""A record's columns: ``day``, ``run`` and ``key`` index ``days``, ``runs`` and
``keys``; nights of thousands of tasks stay a few bytes per task key and night."""


@dataclass
class _Records:
    """Ledger rows and estimates summed per (day, run, task key), as indexed rows."""

    rows: list[list[object]]
    days: dict[str, list[str]]
    """Per period kind, the label of each day index (``day``, ``week``, ``month``)."""
    keys: list[list[object]]
    """Per key index: ``[reference, variant, {axis: value}]``."""
    active_days: set[date]
    has_none: bool
    axis_names: list[str]


def _records(
    runs: Sequence[RunData], labels: Sequence[str], zone: Zone, window: Window
) -> _Records:
    """One record per (day, run, task key): the page sums them per period and axis."""
    cells: dict[tuple[date | None, int, str], GroupTotals] = {}

    def cell(at: datetime | None, run: int, key: str) -> GroupTotals | None:
        day = None if at is None else zone.local_date(at)
        if not (window.open or window.contains(day)):
            return None
        found = cells.get((day, run, key))
        if found is None:
            found = cells[day, run, key] = GroupTotals(key)
        return found

    for index, run in enumerate(runs):
        for row in run.rows:
            at = row.completed_at or row.submitted_at
            if (c := cell(at, index, row.key)) is not None:
                c.add_row(row)
        for key, sub in run.key_estimates.items():
            if (c := cell(sub.ts, index, key)) is not None:
                c.estimate_usd += sub.estimate_usd
    day_index: dict[date | None, int] = {}
    key_index: dict[str, int] = {}
    keys: list[list[object]] = []
    axis_names: dict[str, None] = {}
    rows: list[list[object]] = []
    for (day, run_index, key), totals in cells.items():
        d = day_index.setdefault(day, len(day_index))
        k = key_index.get(key)
        if k is None:
            k = key_index[key] = len(keys)
            reference, variant, axes = parse_key(key)
            axis_names.update(dict.fromkeys(name for name, _ in axes))
            keys.append([reference, variant, dict(axes)])
        rows.append(
            [
                d,
                run_index,
                k,
                float(totals.cost_usd),
                float(totals.estimate_usd),
                totals.images,
                totals.failed,
                totals.in_flight,
            ]
        )
    days: dict[str, list[str]] = {
        kind: [NONE_LABEL if d is None else period_label(d, kind) for d in day_index]
        for kind in PERIOD_KINDS
    }
    active = {d for d in day_index if d is not None}
    return _Records(rows, days, keys, active, None in day_index, sorted(axis_names))


def _money(value: Decimal | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _usd(value: Decimal | None) -> str:
    """``$0.4900``, ``-$0.0100``; empty for None."""
    if value is None:
        return ""
    return f"-${-value:.4f}" if value < 0 else f"${value:.4f}"


def cost_page_data(
    runs: Sequence[RunData],
    *,
    by: str = "day",
    zone: Zone | None = None,
    window: Window = OPEN_WINDOW,
) -> dict[str, object]:
    """The page's data, plain JSON types only.

    ``by`` picks the page's initial view: a period (day, week, month; stacked by
    variant) or a stacking axis (variant, reference, run, axis:NAME; per day).

    Raises:
        ValueError: ``by`` is not a known grouping.
    """
    kind, axis = parse_by(by)
    zone = zone or resolve_zone(None)
    period: PeriodKind = "day"
    stack = "variant"
    if kind in PERIOD_KINDS:
        period = kind
    else:
        stack = f"axis:{axis}" if kind == "axis" else kind
    report = build_report(runs, by=period, zone=zone, window=window)
    labels = [str(r) for r in report.runs]
    short = [Path(r).name or r for r in labels]
    if len(set(short)) == len(short):
        labels = short
    records = _records(runs, labels, zone, window)
    stacks = ["variant", "reference", "run"]
    stacks += [f"axis:{a}" for a in records.axis_names]
    if stack not in stacks:
        stacks.append(stack)
    refs = build_report(runs, by="reference", zone=zone, window=window).groups
    refs.sort(key=lambda g: (-g.cost_usd, g.group))
    total = report.total
    return {
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "tz": zone.name,
        "since": None if window.since is None else str(window.since),
        "until": None if window.until is None else str(window.until),
        "runs": labels,
        "period": period,
        "stack": stack,
        "stacks": stacks,
        "periods": _all_periods(records.active_days, records.has_none),
        "days": records.days,
        "keys": records.keys,
        "fields": list(RECORD_FIELDS),
        "records": records.rows,
        "total": {
            "cost": _usd(total.cost_usd),
            "estimate": _usd(total.estimate_usd),
            "diff": _usd(total.diff_usd),
            "images": total.images,
            "failed": total.failed,
            "in_flight": total.in_flight,
            "per_image": _usd(total.cost_usd / total.images) if total.images else "",
            "plan_estimate": _usd(report.plan_estimate_usd),
        },
        "by_period": [
            {
                "period": g.group,
                "cost_usd": _money(g.cost_usd),
                "estimate_usd": _money(g.estimate_usd),
                "images": g.images,
                "failed": g.failed,
            }
            for g in report.groups
        ],
        "top_references": [
            {
                "reference": g.group,
                "cost": float(g.cost_usd),
                "cost_usd": _money(g.cost_usd),
                "images": g.images,
                "failed": g.failed,
                "per_image_usd": _money(g.cost_usd / g.images) if g.images else "",
            }
            for g in refs[:TOP_REFERENCES]
        ],
    }


@cache
def _plotly_js() -> tuple[str, str]:
    """``(file name, source)`` of the plotly.js that the ``plotly`` package ships."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js", get_plotlyjs()


def render_cost_page(data: dict[str, object], *, plotly_src: str) -> str:
    """The page's HTML for ``data`` (from :func:`cost_page_data`)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("pipeline", "assets"),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("report.html.j2").render(data=data, plotly_src=plotly_src)


def write_cost_page(
    runs: Sequence[RunData],
    path: Path,
    *,
    by: str = "day",
    zone: Zone | None = None,
    window: Window = OPEN_WINDOW,
) -> Path:
    """Write the page to ``path`` and plotly.js beside it (once per version).

    Raises:
        ValueError: ``by`` is not a known grouping.
        StorageError: the page or the script could not be written.
    """
    data = cost_page_data(runs, by=by, zone=zone, window=window)
    name, source = _plotly_js()
    script = path.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not script.is_file() or script.stat().st_size != len(source.encode()):
        write_atomic_sync(script, source.encode())
    write_atomic_sync(path, render_cost_page(data, plotly_src=name).encode())
    return path
