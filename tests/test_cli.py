"""The ``remix`` command in process (``main([...])``) plus one subprocess smoke test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.journal import load_state
from tests.jobkit import image_files, write_job

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "jobs" / "demo.toml"


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNWARE_API_KEY", raising=False)
    monkeypatch.delenv("REMIX_BASE_URL", raising=False)


def test_plan_counts_the_demo_without_spending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`remix plan` validates the demo and prints 24 tasks and their estimate."""
    assert main(["plan", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "tasks" in out
    assert "24" in out
    assert "$1.92" in out
    assert "nothing was submitted" in out


def test_plan_json_for_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    """`remix plan --format json` prints one JSON object with counts and cost."""
    assert main(["plan", str(DEMO), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tasks"] == 24
    assert plan["images"] == 24
    assert plan["estimated_cost_usd"] == "1.92"


def test_every_seed_example_manifest_is_valid() -> None:
    """The shipped jobs (demo, nightly, the seed page's examples) all validate."""
    for name in ("demo.toml", "nightly.toml", "seed-examples.toml"):
        assert main(["plan", str(REPO / "jobs" / name)]) == 0, name


def test_run_without_key_or_sandbox_says_how_to_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No key and no --sandbox: exit 2, naming RUNWARE_API_KEY and --sandbox."""
    job = write_job(tmp_path)
    assert main(["run", str(job), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "RUNWARE_API_KEY" in err
    assert "--sandbox" in err
    assert not (tmp_path / "run").exists()


def test_invalid_manifest_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad manifest: exit 2, the file, table and field named, no traceback."""
    job = write_job(tmp_path, defaults={"outputQuality": 100})
    code = main(["run", str(job), "--sandbox", "--run-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    assert "job.toml" in captured.err
    assert "outputQuality" in captured.err
    assert "[defaults]" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_run_resume_status_report_gallery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sandbox run completes; rerunning spends nothing; status/report/gallery work."""
    job = write_job(tmp_path, refs=2, defaults={"numberResults": 2})
    run_dir = tmp_path / "run"
    args = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 of 2 tasks (2 new this run, 0 before)" in out
    assert len(image_files(run_dir)) == 4
    assert (run_dir / "ledger.csv").is_file()
    assert (run_dir / "gallery.html").is_file()

    journal_lines = (run_dir / "journal.jsonl").read_text().count("\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 new" in out
    after = (run_dir / "journal.jsonl").read_text()
    assert '"submitted"' not in "\n".join(after.splitlines()[journal_lines:])

    assert main(["status", str(run_dir)]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--by", "reference", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "0.32" in json.dumps(report)
    assert main(["gallery", str(run_dir)]) == 0
    assert "gallery.html" in capsys.readouterr().out


def test_run_dir_of_another_manifest_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resuming a run dir with a manifest that changed its tasks is refused before any
    request, naming the changed tasks and the ways on."""
    first = write_job(tmp_path / "a")
    other = [{"id": "v0", "positivePrompt": "a {thing} in oil"}]
    second = write_job(tmp_path / "b", refs=3, variants=other)
    run_dir = tmp_path / "run"
    assert main(["-q", "run", str(first), "--sandbox", "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    code = main(["-q", "run", str(second), "--sandbox", "--run-dir", str(run_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "r0/v0, r1/v0" in err
    assert "--rerun-changed" in err


def test_shards_split_the_job_and_report_merges_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--shard 0/2 and 1/2 run disjoint halves; report over both sums the whole job."""
    variants = [{"id": f"v{i}", "positivePrompt": f"style {i}"} for i in range(4)]
    job = write_job(tmp_path, refs=2, variants=variants)
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    for index, run_dir in enumerate(dirs):
        argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
        assert main([*argv, "--shard", f"{index}/2"]) == 0
    capsys.readouterr()
    names = [{p.relative_to(d / "images") for p in image_files(d)} for d in dirs]
    assert not names[0] & names[1]
    assert len(names[0] | names[1]) == 8
    assert main(["report", *map(str, dirs), "--format", "json"]) == 0
    assert "0.64" in capsys.readouterr().out


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed --shard or --budget is refused by argparse with exit 2."""
    for bad in (["--shard", "2/2"], ["--budget", "-1"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["run", str(DEMO), "--sandbox", *bad])
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_sandbox_subprocess_prints_its_url_first() -> None:
    """`remix sandbox --port 0` prints its base URL first and answers the protocol."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        _ask_and_stop(proc)
    assert proc.returncode == 0


def _ask_and_stop(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/v1")
        body = json.dumps(
            [
                {
                    "taskType": "getResponse",
                    "taskUUID": "0" * 8 + "-0000-4000-8000-" + "0" * 12,
                }
            ]
        ).encode()
        request = urllib.request.Request(
            url,
            data=body,
            headers={
                "Authorization": "Bearer sandbox",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # unknown task: a Runware-shaped 400
            payload = json.loads(exc.read())
        assert payload["errors"][0]["code"] == "taskFailedOrNotFound"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_sigterm_drains_in_flight_and_exits_resumable(tmp_path: Path) -> None:
    """SIGTERM: no new submits, in-flight tasks finish, exit 3; a rerun completes."""
    variants = [{"id": f"v{i}", "positivePrompt": f"style {i}"} for i in range(10)]
    job = write_job(tmp_path, refs=4, variants=variants)
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "pipeline", "-q", "run", str(job), "--sandbox"]
    argv += ["--run-dir", str(run_dir), "--concurrency", "4"]
    env = {k: v for k, v in os.environ.items() if k != "RUNWARE_API_KEY"}
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        journal = run_dir / "journal.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and '"completed"' in journal.read_text():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "resume with:" in out
    state = load_state(journal)
    assert not state.pending  # the grace period let every in-flight task finish
    assert 0 < state.images_done < 40
    assert main(["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]) == 0
    assert len(image_files(run_dir)) == 40


@pytest.mark.slow
def test_second_interrupt_stops_at_once_and_stays_resumable(tmp_path: Path) -> None:
    """Two Ctrl-Cs: exit 3 without waiting for in-flight tasks; a rerun finishes."""
    variants = [{"id": f"v{i}", "positivePrompt": f"style {i}"} for i in range(10)]
    job = write_job(tmp_path, refs=4, variants=variants)
    config = tmp_path / "config.toml"
    config.write_text("[poll]\nnot_found_grace_s = 0.2\n[run]\nshutdown_grace_s = 60\n")
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    argv += ["--config", str(config), "--concurrency", "8"]
    env = {k: v for k, v in os.environ.items() if k != "RUNWARE_API_KEY"}
    journal = run_dir / "journal.jsonl"
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and '"submitted"' in journal.read_text():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    assert proc.returncode == 3, err
    assert stopped_in < 10  # not the 60 s grace period
    assert "resume with:" in out
    load_state(journal)  # the journal loads after an abrupt stop
    assert main([*argv]) == 0
    assert len(image_files(run_dir)) == 40


@pytest.mark.parametrize(
    ("choice", "uses_uvloop"), [("asyncio", False), ("uvloop", True)]
)
def test_run_event_loop_setting_picks_the_loop(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    choice: str,
    uses_uvloop: bool,
) -> None:
    """run.event_loop decides the loop the run runs on, and both finish the job."""
    uvloop = pytest.importorskip("uvloop")
    made: list[object] = []
    real_factory = uvloop.new_event_loop

    def spy() -> object:  # the real uvloop loop, counted
        loop = real_factory()
        made.append(loop)
        return loop

    monkeypatch.setattr(uvloop, "new_event_loop", spy)
    job = write_job(tmp_path, refs=2)
    config = tmp_path / "config.toml"
    config.write_text(f'[run]\nevent_loop = "{choice}"\n')
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main([*argv, "--config", str(config)]) == 0
    assert len(image_files(run_dir)) == 2
    assert len(made) == (1 if uses_uvloop else 0)


def test_uvloop_asked_for_but_missing_is_a_config_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 2 naming the setting before anything is sent; "auto" falls back quietly."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    job = write_job(tmp_path, refs=1)
    config = tmp_path / "config.toml"
    config.write_text('[run]\nevent_loop = "uvloop"\n')
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--sandbox", "--run-dir", str(run_dir)]
    assert main([*argv, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "run.event_loop" in err
    assert "uvloop is not installed" in err
    assert not run_dir.exists()
    config.write_text('[run]\nevent_loop = "auto"\n')
    assert main([*argv, "--config", str(config)]) == 0
    assert len(image_files(run_dir)) == 1
