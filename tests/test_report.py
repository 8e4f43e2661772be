"""Reports: the ledger CSV, cost reports grouped and merged over run dirs, status,
and how ``remix report`` and ``remix status`` print them."""

from __future__ import annotations

import csv
import fcntl
import json
import re
import tempfile
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli.show import show_report, show_status
from pipeline.costs import (
    TOTAL_LABEL,
    build_report,
    format_report,
    parse_by,
    report_csv,
)
from pipeline.exit_codes import ExitCode
from pipeline.journal import JOURNAL_NAME, JournalWriter, load_state
from pipeline.journal_events import (
    CompletedEvent,
    Event,
    FailedEvent,
    LostEvent,
    RunEndedEvent,
    RunStartedEvent,
    SubmittedEvent,
    encode_events,
)
from pipeline.ledger import (
    LEDGER_NAME,
    build_ledger_rows,
    csv_safe,
    csv_unsafe,
    ledger_columns,
    ledger_csv,
    read_ledger,
    write_ledger,
)
from pipeline.periods import resolve_zone
from pipeline.rundata import load_run
from pipeline.status import run_status

T0 = datetime(2026, 11, 3, 22, 0, tzinfo=UTC)
PRICE = Decimal("0.0625")


def uuid(n: int, kind: int = 0) -> str:
    return f"{kind:08d}-0000-4000-8000-{n:012d}"


def submitted(n: int, key: str, at: datetime, images: int = 1) -> SubmittedEvent:
    return SubmittedEvent(
        ts=at, key=key, task_uuid=uuid(n), images=images, estimate_usd=PRICE * images
    )


def completed(
    n: int, key: str, at: datetime, index: int = 0, cost: Decimal = PRICE
) -> CompletedEvent:
    return CompletedEvent(
        ts=at,
        key=key,
        task_uuid=uuid(n),
        image_uuid=uuid(n * 10 + index, 1),
        index=index,
        seed=100 + n,
        cost_usd=cost,
        path=f"images/{key.replace('/', '_')}-{index + 1}.jpg",
        sha256="0" * 64,
        bytes=1234,
    )


def started(
    tasks: int, images: int, estimate: Decimal, *, shard: str | None = None
) -> RunStartedEvent:
    return RunStartedEvent(
        ts=T0,
        run_id="run",
        manifest_sha256="a" * 64,
        tasks=tasks,
        images=images,
        estimate_usd=estimate,
        shard=shard,
    )


async def _append(path: Path, events: list[Event]) -> None:
    async with JournalWriter.open(path) as journal:
        await journal.append(*events)


def write_journal(run_dir: Path, events: list[Event]) -> None:
    """Journal ``events`` the way a run does (one writer, fsynced)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    anyio.run(_append, run_dir / JOURNAL_NAME, events)


def write_run_json(run_dir: Path, manifest: str, shard: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"manifest": manifest, "shard": shard, "started_at": T0.isoformat()}
    (run_dir / "run.json").write_text(json.dumps(info))


HALF_KEYS = [
    "atrium/deco/remixStrength=30",
    "atrium/deco/remixStrength=60",
    "atrium/paper/remixStrength=30",
    "lobby/deco/remixStrength=30",
    "lobby/paper/remixStrength=30",
    "lobby/paper/remixStrength=60",
]


@dataclass(frozen=True)
class HalfRun:
    run_dir: Path
    pending_uuid: str
    failed_key: str


@pytest.fixture
def half_run(tmp_path: Path) -> HalfRun:
    """6 tasks: 3 done (one with 2 images), 1 failed, 1 in flight, 1 never sent;
    the process died mid-write (a torn last line, no run_ended)."""
    run_dir = tmp_path / "runs" / "half"
    write_run_json(run_dir, "/jobs/lobby styles.toml")
    k = HALF_KEYS
    t = [T0 + timedelta(seconds=i) for i in range(20)]
    events: list[Event] = [
        started(6, 7, Decimal("0.4375")),
        submitted(0, k[0], t[1], images=2),
        submitted(1, k[1], t[1]),
        submitted(2, k[2], t[2]),
        submitted(3, k[3], t[2]),
        submitted(4, k[4], t[3]),
        completed(0, k[0], t[5], index=0),
        completed(0, k[0], t[6], index=1, cost=Decimal("0.0700")),
        completed(1, k[1], t[7]),
        FailedEvent(
            ts=t[8],
            key=k[2],
            task_uuid=uuid(2),
            code="invalidPrompt",
            message="=cmd|' /C calc'!A0 is not a prompt",
            retryable=False,
        ),
        completed(3, k[3], t[9]),
    ]
    write_journal(run_dir, events)
    with (run_dir / JOURNAL_NAME).open("ab") as f:
        f.write(b'{"event": "completed", "key": "lobby/pa')  # torn mid-write
    return HalfRun(run_dir, uuid(4), k[2])


# ---------------------------------------------------------------------------
# Ledger


def test_ledger_rows_cover_images_failures_and_in_flight(half_run: HalfRun) -> None:
    """One row per image, one per failed and per in-flight task, axes as columns."""
    state = load_state(half_run.run_dir / JOURNAL_NAME)
    rows = build_ledger_rows(state)
    assert [(r.key, r.status, r.index) for r in rows] == [
        (HALF_KEYS[0], "done", 0),
        (HALF_KEYS[0], "done", 1),
        (HALF_KEYS[1], "done", 0),
        (HALF_KEYS[2], "failed", None),
        (HALF_KEYS[3], "done", 0),
        (HALF_KEYS[4], "pending", None),
    ]
    assert rows[0].latency_s == 4.0
    failed = rows[3]
    assert (failed.error_code, failed.submitted_at) == (
        "invalidPrompt",
        T0 + timedelta(seconds=2),
    )
    columns = ledger_columns(rows)
    assert columns[:4] == ["key", "reference", "variant", "remixStrength"]
    assert {
        "task_uuid",
        "image_uuid",
        "seed",
        "cost_usd",
        "status",
        "latency_s",
    } <= set(columns)


def test_ledger_csv_round_trips_and_totals_to_the_cent(half_run: HalfRun) -> None:
    """Read back with the csv module: same rows, exact decimals, total == spent."""
    path = write_ledger(half_run.run_dir)
    assert path == half_run.run_dir / LEDGER_NAME
    state = load_state(half_run.run_dir / JOURNAL_NAME)
    assert read_ledger(path) == build_ledger_rows(state)
    with path.open(newline="") as f:
        records = list(csv.DictReader(f))
    total = sum((Decimal(r["cost_usd"]) for r in records if r["cost_usd"]), Decimal(0))
    assert total == state.spent_usd == Decimal("0.2575")
    assert {r["remixStrength"] for r in records} == {"30", "60"}
    assert records[0]["reference"] == "atrium"


def test_ledger_cells_are_spreadsheet_safe(half_run: HalfRun) -> None:
    """An error message starting with '=' is written with a leading quote."""
    path = write_ledger(half_run.run_dir)
    with path.open(newline="") as f:
        failed = next(r for r in csv.DictReader(f) if r["status"] == "failed")
    assert failed["error_message"] == "'=cmd|' /C calc'!A0 is not a prompt"
    assert read_ledger(path)[3].error_message == "=cmd|' /C calc'!A0 is not a prompt"


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("-1", "-1"),
        ("-0.0625", "-0.0625"),
        ("'=x", "''=x"),
        ("'plain", "'plain"),
        ("plain", "plain"),
    ],
)
def test_csv_safe_examples(text: str, safe: str) -> None:
    """Formula starts get a quote; numbers and plain text do not."""
    assert csv_safe(text) == safe
    assert csv_unsafe(safe) == text


@given(st.text())
def test_csv_safe_is_reversible_and_safe(text: str) -> None:
    """csv_unsafe(csv_safe(x)) == x, and the result never starts a formula: a cell
    starting ``= + - @``, tab or CR is quoted unless it is a plain number (``+0``,
    ``-1.5e3``), which a spreadsheet reads as that number."""
    safe = csv_safe(text)
    assert csv_unsafe(safe) == text
    plain_number = re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", safe)
    if safe[:1] in set("=+-@\t\r") and not plain_number:
        pytest.fail(f"formula start kept: {safe!r}")


# ---------------------------------------------------------------------------
# Random journals: group totals always add up


REFS = ("atrium", "lobby", "-odd")
VARIANTS = ("deco", "paper")


@st.composite
def journals(draw: st.DrawFn) -> list[list[Event]]:
    """One or two run dirs' events: random keys, outcomes, costs, days, resubmits."""
    runs: list[list[Event]] = []
    n = 0
    for _ in range(draw(st.integers(1, 2))):
        events: list[Event] = [started(0, 0, Decimal(draw(st.integers(0, 500))) / 100)]
        for _ in range(draw(st.integers(0, 12))):
            n += 1
            ref, variant = draw(st.sampled_from(REFS)), draw(st.sampled_from(VARIANTS))
            axes = draw(st.sampled_from(["", "/s=1", "/s=2", "/s=1,t=x"]))
            key = f"{ref}/{variant}{axes}"
            at = T0 + timedelta(hours=draw(st.integers(0, 60)))
            images = draw(st.integers(1, 2))
            events.append(submitted(n, key, at, images))
            outcome = draw(
                st.sampled_from(["done", "failed", "pending", "lost", "dup"])
            )
            if outcome == "failed":
                msg = draw(st.text(min_size=1, max_size=20))
                events.append(
                    FailedEvent(
                        ts=at,
                        key=key,
                        task_uuid=uuid(n),
                        code="x",
                        message=msg,
                        retryable=True,
                    )
                )
            elif outcome == "lost":
                events.append(LostEvent(ts=at, key=key, task_uuid=uuid(n)))
            elif outcome != "pending":
                for index in range(images):
                    cents = draw(st.integers(0, 10_000))
                    event = completed(n, key, at, index, Decimal(cents) / 10_000)
                    events.append(event)
                    if outcome == "dup":
                        events.append(event)  # journaled twice: billed once
        runs.append(events)
    return runs


BYS = ("reference", "variant", "day", "run", "axis:s", "axis=t")


def _run_dirs(root: Path, runs: list[list[Event]]) -> list[Path]:
    dirs = []
    for i, events in enumerate(runs):
        run_dir = root / f"night-{i}"
        run_dir.mkdir()
        (run_dir / JOURNAL_NAME).write_bytes(encode_events(events))
        dirs.append(run_dir)
    return dirs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journals())
def test_group_totals_always_sum_to_the_grand_total(runs: list[list[Event]]) -> None:
    """For every --by, groups add up to the total, and the total to the journals."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [load_run(d) for d in _run_dirs(Path(tmp), runs)]
    spent = sum((r.state.spent_usd for r in loaded), Decimal(0))
    estimates = sum(
        (s.estimate_usd for r in loaded for s in r.key_estimates.values()), Decimal(0)
    )
    images = sum(r.state.images_done for r in loaded)
    for by in BYS:
        report = build_report(loaded, by=by)
        total = report.total
        assert total.cost_usd == report.spent_usd == spent, by
        assert total.estimate_usd == estimates, by
        assert total.images == images, by
        groups = report.groups
        assert sum((g.cost_usd for g in groups), Decimal(0)) == total.cost_usd, by
        assert sum((g.estimate_usd for g in groups), Decimal(0)) == total.estimate_usd
        assert sum(g.images for g in groups) == total.images, by
        assert sum(g.failed for g in groups) == total.failed, by
        assert sum(g.in_flight for g in groups) == total.in_flight, by
        assert len({g.group for g in groups}) == len(groups), by
        rows = list(csv.reader(report_csv(report).splitlines()))
        assert rows[-1][0] == TOTAL_LABEL
        assert Decimal(rows[-1][4]) == spent


@settings(max_examples=40, deadline=None)
@given(journals())
def test_random_ledgers_round_trip(runs: list[list[Event]]) -> None:
    """Any journal's ledger, written (streamed from line offsets) then read, gives
    the rows of the fold that keeps every event, and the same total."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = _run_dirs(Path(tmp), runs[:1])[0]
        path = write_ledger(run_dir)
        rows = read_ledger(path)
        state = load_state(run_dir / JOURNAL_NAME)
    assert rows == build_ledger_rows(state)
    assert sum((r.cost_usd or Decimal(0) for r in rows), Decimal(0)) == state.spent_usd


# ---------------------------------------------------------------------------
# Reports over several run dirs


@pytest.fixture
def two_nights(tmp_path: Path) -> list[Path]:
    """Two nightly run dirs of one job: 3 images + 1 failure, then 2 images."""
    night1, night2 = tmp_path / "night-1", tmp_path / "night-2"
    day2 = T0 + timedelta(days=1)
    write_journal(
        night1,
        [
            started(4, 4, Decimal("0.25")),
            submitted(1, "atrium/deco/s=1", T0),
            submitted(2, "atrium/paper/s=1", T0),
            submitted(3, "lobby/deco/s=2", T0),
            submitted(4, "lobby/paper/s=2", T0),
            completed(1, "atrium/deco/s=1", T0),
            completed(2, "atrium/paper/s=1", T0),
            completed(3, "lobby/deco/s=2", T0),
            FailedEvent(
                ts=T0,
                key="lobby/paper/s=2",
                task_uuid=uuid(4),
                code="timeout",
                message="+took too long",
                retryable=True,
            ),
            RunEndedEvent(
                ts=T0, reason="finished", done=3, failed=1, spent_usd=PRICE * 3
            ),
        ],
    )
    write_journal(
        night2,
        [
            started(2, 2, Decimal("0.125")),
            submitted(5, "atrium/deco/s=1", day2),
            submitted(6, "lobby/paper/s=2", day2),
            completed(5, "atrium/deco/s=1", day2, cost=Decimal("0.07")),
            completed(6, "lobby/paper/s=2", day2),
            RunEndedEvent(
                ts=day2,
                reason="finished",
                done=2,
                failed=0,
                spent_usd=Decimal("0.1325"),
            ),
        ],
    )
    return [night1, night2]


def test_report_merges_run_dirs(two_nights: list[Path]) -> None:
    """Two nights merge per reference; the plan estimate is each run's, summed."""
    report = build_report([load_run(d) for d in two_nights], by="reference")
    assert [(g.group, g.images, g.failed, g.cost_usd) for g in report.groups] == [
        ("atrium", 3, 0, Decimal("0.1950")),
        ("lobby", 2, 1, Decimal("0.1250")),
    ]
    assert report.total.cost_usd == Decimal("0.3200")
    assert report.total.estimate_usd == PRICE * 6
    assert report.plan_estimate_usd == Decimal("0.375")


def test_report_by_run_day_and_axis(two_nights: list[Path]) -> None:
    """--by run labels groups by run dir; day by UTC date; axis by its value."""
    runs = [load_run(d) for d in two_nights]
    by_run = build_report(runs, by="run")
    assert [(g.group, g.images) for g in by_run.groups] == [
        ("night-1", 3),
        ("night-2", 2),
    ]
    by_day = build_report(runs, by="day", zone=resolve_zone("UTC"))
    assert [g.group for g in by_day.groups] == ["2026-11-03", "2026-11-04"]
    assert by_day.groups[1].cost_usd == Decimal("0.1325")
    by_axis = build_report(runs, by="axis:s")
    assert [(g.group, g.images) for g in by_axis.groups] == [("1", 3), ("2", 2)]
    dotted = build_report(runs, by="axis=providerSettings.ideogram.s")
    assert [g.group for g in dotted.groups] == ["1", "2"]


def test_shards_of_one_job_count_the_plan_once(tmp_path: Path) -> None:
    """Shards journal the whole job's estimate: the report counts it once."""
    dirs = []
    for i in range(2):
        run_dir = tmp_path / f"job-shard{i}of2"
        run_dir.mkdir()
        event = started(2, 2, Decimal("1.00"), shard=f"{i}/2")
        (run_dir / JOURNAL_NAME).write_bytes(encode_events([event]))
        dirs.append(run_dir)
    report = build_report([load_run(d) for d in dirs], by="run")
    assert report.plan_estimate_usd == Decimal("1.00")


def test_parse_by_accepts_axis_spellings() -> None:
    """axis:NAME, axis=NAME and 'axis NAME' all name an axis; junk is refused."""
    assert parse_by("axis:remixStrength") == ("axis", "remixStrength")
    assert parse_by("axis=remixStrength") == ("axis", "remixStrength")
    assert parse_by("axis remixStrength") == ("axis", "remixStrength")
    assert parse_by("day") == ("day", None)
    with pytest.raises(ValueError, match=r"unknown --by 'colour'.*axis:NAME"):
        parse_by("colour")


def test_show_report_formats(
    two_nights: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Table, CSV and JSON output carry the same totals, estimate beside actual."""
    assert show_report(two_nights, by="variant", fmt="table") == ExitCode.OK
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == [
        "variant",
        "images",
        "failed",
        "in",
        "flight",
        "cost",
        "$",
        "est.",
        "$",
        "diff",
        "$",
    ]
    assert lines[5].split() == [
        TOTAL_LABEL,
        "5",
        "1",
        "0",
        "0.3200",
        "0.3750",
        "-0.0550",
    ]
    assert "plan estimate $0.375 for 2 run dirs; spent $0.3200" in table

    assert show_report(two_nights, by="variant", fmt="csv") == ExitCode.OK
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0] == [
        "variant",
        "images",
        "failed",
        "in_flight",
        "cost_usd",
        "estimate_usd",
        "diff_usd",
        "plan_estimate_usd",
    ]
    assert rows[-1] == [
        TOTAL_LABEL,
        "5",
        "1",
        "0",
        "0.3200",
        "0.3750",
        "-0.0550",
        "0.375",
    ]

    assert show_report(two_nights, by="variant", fmt="json") == ExitCode.OK
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["cost_usd"] == "0.3200"
    assert data["plan_estimate_usd"] == "0.375"
    assert [g["group"] for g in data["groups"]] == ["deco", "paper"]


def test_show_report_rejects_bad_input(
    tmp_path: Path, two_nights: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A dir that is not a run dir, or an unknown --by, exits 2 with a message."""
    not_a_run = [*two_nights, tmp_path / "nope"]
    assert show_report(not_a_run, by="day", fmt="table") == ExitCode.INVALID
    assert "nope is not a run directory" in capsys.readouterr().err
    assert show_report(two_nights, by="size", fmt="table") == ExitCode.INVALID
    assert "unknown --by 'size'" in capsys.readouterr().err


def test_format_report_aligns_columns(two_nights: list[Path]) -> None:
    """Every table line has the numbers right-aligned under their headers."""
    text = format_report(build_report([load_run(d) for d in two_nights], by="run"))
    body = [line for line in text.splitlines() if line.startswith("night-")]
    assert len({len(line) for line in body}) == 1


# ---------------------------------------------------------------------------
# Status


def test_status_of_a_half_finished_run(half_run: HalfRun) -> None:
    """Counts, cost, last activity and the exact resume command of a crashed run."""
    status = run_status(half_run.run_dir)
    assert (status.done, status.failed, status.in_flight, status.remaining) == (
        3,
        1,
        1,
        1,
    )
    assert (status.images_done, status.images_total) == (4, 7)
    assert status.spent_usd == Decimal("0.2575")
    assert status.estimate_usd == Decimal("0.4375")
    assert status.pending_task_uuids == (half_run.pending_uuid,)
    assert status.last_activity == T0 + timedelta(seconds=9)
    assert (status.state, status.finished, status.resumable) == (
        "interrupted",
        False,
        True,
    )
    assert status.resume_command == (
        f"remix run '/jobs/lobby styles.toml' --run-dir {half_run.run_dir}"
    )


def test_status_sees_a_running_run(half_run: HalfRun) -> None:
    """While another process holds the run dir's lock, status says running."""
    with (half_run.run_dir / ".lock").open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        status = run_status(half_run.run_dir)
    assert status.state == "running"
    assert status.running_pid is not None
    assert not status.resumable


def test_status_of_finished_runs(tmp_path: Path) -> None:
    """Finished; finished with failures (retry hint); stopped by budget (resumable)."""
    ok, bad, stopped = tmp_path / "ok", tmp_path / "bad", tmp_path / "stopped"
    key = "a/b"
    end = RunEndedEvent(ts=T0, reason="finished", done=1, failed=0, spent_usd=PRICE)
    write_journal(
        ok, [started(1, 1, PRICE), submitted(1, key, T0), completed(1, key, T0), end]
    )
    failure = FailedEvent(
        ts=T0, key=key, task_uuid=uuid(1), code="c", message="m", retryable=False
    )
    write_journal(bad, [started(1, 1, PRICE), submitted(1, key, T0), failure, end])
    budget = RunEndedEvent(ts=T0, reason="budget", done=0, failed=0, spent_usd=PRICE)
    write_journal(stopped, [started(3, 3, PRICE * 3), budget])
    write_run_json(bad, "/j.toml", shard="1/4")

    assert (run_status(ok).state, run_status(ok).resumable) == ("finished", False)
    status = run_status(bad)
    assert (status.state, status.resumable) == ("finished-with-failures", True)
    assert status.resume_command == (
        f"remix run /j.toml --run-dir {bad} --shard 1/4 --retry-failed"
    )
    status = run_status(stopped)
    assert (status.state, status.remaining, status.resumable) == ("stopped", 3, True)
    assert "budget" in status.detail


def test_show_status_table_and_json(
    half_run: HalfRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table names every count and the resume command; JSON is one object."""
    assert show_status(half_run.run_dir) == ExitCode.OK
    out = capsys.readouterr().out
    assert "3 done, 1 failed, 1 in flight, 0 queued, 1 remaining of 6" in out
    assert "cost          $0.2575 so far (plan estimate $0.4375)" in out
    assert f"in flight     {half_run.pending_uuid}" in out
    assert "resume with   remix run '/jobs/lobby styles.toml' --run-dir" in out
    assert show_status(half_run.run_dir, fmt="json") == ExitCode.OK
    data = json.loads(capsys.readouterr().out)
    assert data["spent_usd"] == "0.2575"
    assert data["in_flight"] == 1
    assert data["state"] == "interrupted"


def test_show_status_of_a_non_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory without run.json or journal exits 2 and says why."""
    assert show_status(tmp_path) == ExitCode.INVALID
    assert "is not a run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# A big ledger, streamed

BIG_IMAGES = 20_000
BIG_LEDGER_PEAK = 25 * 1024 * 1024
"""tracemalloc bound for 20k images: streaming (the fold keeping line offsets) takes
~17 MB, holding every event and row at once ~76 MB."""


def _big_journal(run_dir: Path) -> None:
    """20k images over 2 variants x 3 strengths, with every kind of odd line mixed in:
    2-image tasks, duplicates, superseded images, failures, retries, lost and pending
    tasks, completions without submitted_at, and a torn last line."""
    events: list[Event] = [started(BIG_IMAGES, BIG_IMAGES, PRICE * BIG_IMAGES)]
    n = images = 0
    while images < BIG_IMAGES:
        n += 1
        key = f"ref{n // 6:05d}/{('deco', 'paper')[n % 2]}/remixStrength={n % 3 * 30}"
        at = T0 + timedelta(seconds=n)
        count = 2 if n % 50 == 0 else 1
        events.append(submitted(n, key, at, images=count))
        if n % 211 == 0:
            events.append(LostEvent(ts=at, key=key, task_uuid=uuid(n)))
            continue
        if n % 307 == 0:
            events.append(
                FailedEvent(
                    ts=at, key=key, task_uuid=uuid(n), code="x", message="-bad",
                    retryable=True,
                )
            )  # fmt: skip
            continue
        if n % 401 == 0:
            continue  # in flight
        for index in range(count):
            event = completed(n, key, at + timedelta(seconds=3), index)
            if n % 3 == 0:
                event = event.model_copy(update={"submitted_at": at})
            events.append(event)
            images += 1
            if n % 97 == 0:
                events.append(event)  # journaled twice
        if n % 89 == 0:  # a second task fills the same slot: paid, superseded
            events.append(submitted(n + 10**6, key, at))
            events.append(completed(n + 10**6, key, at + timedelta(seconds=4)))
    run_dir.mkdir(parents=True)
    (run_dir / JOURNAL_NAME).write_bytes(
        encode_events(events) + b'{"event": "completed", "key": "ref'
    )


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir whose journal holds 20k images."""
    run_dir = tmp_path_factory.mktemp("big") / "run"
    _big_journal(run_dir)
    return run_dir


def test_big_ledger_matches_the_straightforward_ledger(big_run: Path) -> None:
    """Streaming gives byte for byte the ledger of folding all events in memory."""
    path = write_ledger(big_run)
    expected = ledger_csv(build_ledger_rows(load_state(big_run / JOURNAL_NAME)))
    assert path.read_bytes() == expected.encode()
    statuses = {row.status for row in read_ledger(path)}
    assert statuses == {"done", "superseded", "failed", "pending"}
    assert not list(big_run.glob("*.part"))


def test_big_ledger_memory_stays_small(big_run: Path) -> None:
    """write_ledger of 20k images peaks well under what holding every row took."""
    tracemalloc.start()
    try:
        write_ledger(big_run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BIG_LEDGER_PEAK, f"{peak / 2**20:.1f} MB"
