"""Cost reports: ledger rows grouped (by reference, variant, matrix axis, run, or a
day, ISO week or month in a chosen time zone) over any number of run dirs (nightly
runs, shards), optionally cut to a date window, the actual cost set beside the plan's
estimate. Dollars of run dirs made against a local sandbox are counted apart as
``sandbox_usd`` and marked, so they are never read as a bill.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Final, cast

from pipeline.ledger import PLAIN_NUMBER, LedgerRow, csv_safe, parse_key
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
from pipeline.shard import Shard

TOTAL_LABEL: Final = "(total)"
"""The grand total's group label; parentheses cannot occur in ids."""
NONE_LABEL: Final = "(none)"
"""The group of rows that lack the grouped-by value (no such axis, no time)."""


@dataclass
class GroupTotals:
    """Totals of one report group (or of the whole report)."""

    group: str
    images: int = 0
    """Stored images (superseded duplicates are paid, so in cost, but not counted)."""
    failed: int = 0
    in_flight: int = 0
    cost_usd: Decimal = Decimal(0)
    estimate_usd: Decimal = Decimal(0)
    """Sum of the submitted tasks' estimates (each task's latest submission)."""
    sandbox_usd: Decimal = Decimal(0)
    """The part of ``cost_usd`` a local sandbox reported (not billed)."""

    @property
    def diff_usd(self) -> Decimal:
        """Actual minus estimated: positive means it cost more than planned."""
        return self.cost_usd - self.estimate_usd

    def add_row(self, row: LedgerRow, *, sandbox: bool = False) -> None:
        """Count one ledger row (of a sandbox run dir when ``sandbox``)."""
        if row.status == "done":
            self.images += 1
        elif row.status == "failed":
            self.failed += 1
        elif row.status == "pending":
            self.in_flight += 1
        if row.cost_usd is not None:
            self.cost_usd += row.cost_usd
            if sandbox:
                self.sandbox_usd += row.cost_usd

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict with exact decimal strings."""
        return {
            "group": self.group,
            "images": self.images,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "cost_usd": str(self.cost_usd),
            "estimate_usd": str(self.estimate_usd),
            "diff_usd": str(self.diff_usd),
            "sandbox_usd": str(self.sandbox_usd),
        }

    @property
    def sandbox_note(self) -> str:
        """``(sandbox)`` when all its dollars are a sandbox's, ``($x sandbox)`` when
        some are, else empty."""
        if not self.sandbox_usd:
            return ""
        if self.sandbox_usd == self.cost_usd:
            return "(sandbox)"
        return f"(${self.sandbox_usd} sandbox)"


@dataclass
class Report:
    """A cost report over one or more run dirs."""

    by: str
    groups: list[GroupTotals]
    total: GroupTotals
    plan_estimate_usd: Decimal | None
    """The plans' estimates (run_started), each job counted once across its shards."""
    runs: list[str]
    spent_usd: Decimal
    """The journals' own spent totals, summed: equals ``total.cost_usd`` unless a
    date window cut some rows off."""
    sandbox_runs: list[str] = field(default_factory=list)
    """The run dirs made against a local sandbox (their dollars: ``sandbox_usd``)."""
    tz: str | None = None
    """The zone days were cut in (time groupings and windows only)."""
    window: Window = OPEN_WINDOW

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict with exact decimal strings."""
        plan = self.plan_estimate_usd
        return {
            "by": self.by,
            "runs": self.runs,
            "sandbox_runs": self.sandbox_runs,
            "sandbox_usd": str(self.total.sandbox_usd),
            "groups": [g.to_json() for g in self.groups],
            "total": self.total.to_json(),
            "plan_estimate_usd": None if plan is None else str(plan),
            "spent_usd": str(self.spent_usd),
            "tz": self.tz,
            "since": None if self.window.since is None else str(self.window.since),
            "until": None if self.window.until is None else str(self.window.until),
        }


_BY_NAMES: Final = ("reference", "variant", *PERIOD_KINDS, "run")


def parse_by(by: str) -> tuple[str, str | None]:
    """``(kind, axis name)`` from ``reference|variant|day|week|month|run|axis:NAME``
    (also ``axis=NAME``).

    Raises:
        ValueError: an unknown grouping, with the accepted spellings.
    """
    text = by.strip()
    for sep in (":", "=", " "):
        head, found, name = text.partition(sep)
        if found and head.strip() == "axis" and name.strip():
            return "axis", name.strip()
    if text in _BY_NAMES:
        return text, None
    raise ValueError(
        f"unknown --by {by!r}: use reference, variant, day, week, month, run or "
        "axis:NAME "
        "(NAME as in the task keys, e.g. axis:remixStrength)"
    )


def _axis_names(runs: Sequence[RunData]) -> set[str]:
    names: set[str] = set()
    for run in runs:
        for key in run.key_estimates.keys() | {r.key for r in run.rows}:
            names.update(n for n, _ in parse_key(key)[2])
    return names


def _resolve_axis(name: str, runs: Sequence[RunData]) -> str:
    """Accept an axis's key name or its full dotted manifest path."""
    if "." not in name:
        return name
    names = _axis_names(runs)
    if name in names:
        return name
    last = name.rsplit(".", 1)[-1]
    return last if last in names else name


def _period(at: datetime | None, kind: str, zone: Zone) -> str:
    if at is None:
        return NONE_LABEL
    return period_label(zone.local_date(at), cast(PeriodKind, kind))


def _in_window(at: datetime | None, zone: Zone, window: Window) -> bool:
    return window.open or window.contains(None if at is None else zone.local_date(at))


def _run_labels(runs: Sequence[RunData]) -> list[str]:
    names = [r.run_dir.name or str(r.run_dir) for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.run_dir) for r in runs]


def _key_grouper(kind: str, axis: str | None) -> Callable[[str], str]:
    def group(key: str) -> str:
        reference, variant, axes = parse_key(key)
        if kind == "reference":
            return reference
        if kind == "variant":
            return variant
        return dict(axes).get(axis or "", NONE_LABEL)

    return group


def _plan_estimate(runs: Sequence[RunData]) -> Decimal | None:
    """Sum of plan estimates; shards of one job (same manifest hash, same N) once.

    The engine journals the whole job's estimate in every shard's run_started.
    """
    total: Decimal | None = None
    seen: set[tuple[str, int]] = set()
    for run in runs:
        started = run.last_started
        if started is None:
            continue
        if (shard := Shard.read(started.shard)) is not None:
            job = (started.manifest_sha256, shard.count)
            if job in seen:
                continue
            seen.add(job)
        total = started.estimate_usd + (total or Decimal(0))
    return total


def _sort_key(label: str) -> tuple[int, Decimal, str]:
    if label == NONE_LABEL:
        return 2, Decimal(0), label
    if PLAIN_NUMBER.fullmatch(label):
        return 0, Decimal(label), label
    return 1, Decimal(0), label


def build_report(
    runs: Sequence[RunData],
    *,
    by: str,
    zone: Zone | None = None,
    window: Window = OPEN_WINDOW,
) -> Report:
    """Group the ledger rows of ``runs`` (merged) and total them.

    Days (weeks, months) are cut in ``zone`` (None: the machine's local zone); a row
    counts on its completion's date (else its submission's), an estimate on its
    submission's. ``window`` keeps only rows and estimates dated inside it.

    Raises:
        ValueError: ``by`` is not a known grouping.
    """
    kind, axis = parse_by(by)
    zone = zone or resolve_zone(None)
    if axis is not None:
        axis = _resolve_axis(axis, runs)
    groups: dict[str, GroupTotals] = {}
    total = GroupTotals(TOTAL_LABEL)

    def get(label: str) -> GroupTotals:
        found = groups.get(label)
        if found is None:
            found = groups[label] = GroupTotals(label)
        return found

    key_group = _key_grouper(kind, axis)
    for label, run in zip(_run_labels(runs), runs, strict=True):
        cache: dict[str, str] = {}
        sandbox = run.is_sandbox
        for row in run.rows:
            at = row.completed_at or row.submitted_at
            if not _in_window(at, zone, window):
                continue
            if kind == "run":
                name = label
            elif kind in PERIOD_KINDS:
                name = _period(at, kind, zone)
            else:
                name = cache.get(row.key) or cache.setdefault(
                    row.key, key_group(row.key)
                )
            get(name).add_row(row, sandbox=sandbox)
            total.add_row(row, sandbox=sandbox)
        for key, sub in run.key_estimates.items():
            if not _in_window(sub.ts, zone, window):
                continue
            if kind == "run":
                name = label
            elif kind in PERIOD_KINDS:
                name = _period(sub.ts, kind, zone)
            else:
                name = cache.get(key) or key_group(key)
            get(name).estimate_usd += sub.estimate_usd
            total.estimate_usd += sub.estimate_usd
    ordered = sorted(groups.values(), key=lambda g: _sort_key(g.group))
    return Report(
        by=f"axis:{axis}" if kind == "axis" else kind,
        groups=ordered,
        total=total,
        plan_estimate_usd=_plan_estimate(runs),
        runs=[str(r.run_dir) for r in runs],
        spent_usd=sum((r.state.spent_usd for r in runs), Decimal(0)),
        sandbox_runs=[str(r.run_dir) for r in runs if r.is_sandbox],
        tz=zone.name if kind in PERIOD_KINDS or not window.open else None,
        window=window,
    )


_REPORT_COLUMNS: Final = (
    "images",
    "failed",
    "in_flight",
    "cost_usd",
    "estimate_usd",
    "diff_usd",
)


def _numbers(g: GroupTotals) -> list[str]:
    return [
        str(g.images),
        str(g.failed),
        str(g.in_flight),
        str(g.cost_usd),
        str(g.estimate_usd),
        str(g.diff_usd),
    ]


def report_csv(report: Report) -> str:
    """The report as CSV: one row per group, then the total with the plan estimate;
    a last ``sandbox_usd`` column when a run dir is a sandbox's."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    sandbox = bool(report.sandbox_runs)
    extra = ["sandbox_usd"] if sandbox else []
    writer.writerow([report.by, *_REPORT_COLUMNS, "plan_estimate_usd", *extra])
    for g in report.groups:
        more = [str(g.sandbox_usd)] if sandbox else []
        writer.writerow([csv_safe(g.group), *_numbers(g), "", *more])
    plan = report.plan_estimate_usd
    more = [str(report.total.sandbox_usd)] if sandbox else []
    writer.writerow(
        [TOTAL_LABEL, *_numbers(report.total), "" if plan is None else str(plan), *more]
    )
    return buf.getvalue()


def format_report(report: Report) -> str:
    """The report as an aligned text table with a total line."""
    header = [report.by, "images", "failed", "in flight", "cost $", "est. $", "diff $"]
    body = [[g.group, *_numbers(g)] for g in report.groups]
    total = [TOTAL_LABEL, *_numbers(report.total)]
    widths = [
        max(len(r[i]) for r in (header, *body, total)) for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    def marked(cells: Sequence[str], g: GroupTotals) -> str:
        return f"{line(cells)}  {g.sandbox_note}".rstrip()

    rule = "-" * len(line(header))
    rows = (marked(r, g) for r, g in zip(body, report.groups, strict=True))
    lines = [line(header), rule, *rows, rule, marked(total, report.total)]
    plan = report.plan_estimate_usd
    if plan is not None:
        runs = len(report.runs)
        lines.append(
            f"plan estimate ${plan} for {runs} run dir{'s' if runs != 1 else ''}; "
            f"spent ${report.spent_usd} (${plan - report.spent_usd} of the plan left)"
        )
    if report.sandbox_runs:
        lines.append(
            f"sandbox: ${report.total.sandbox_usd} of the cost is a local sandbox's, "
            f"not billed ({', '.join(report.sandbox_runs)})"
        )
    if not report.window.open:
        since, until = report.window.since, report.window.until
        lines.append(
            f"dates {since or 'start'} to {until or 'now'} ({report.tz}, inclusive): "
            f"${report.total.cost_usd} of ${report.spent_usd} spent in all"
        )
    return "\n".join(lines)
