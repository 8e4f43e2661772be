"""A run dir belongs to one API: a sandbox run dir never resumes against the real API
(nor the reverse), and sandbox dollars are marked as such in the ledger and reports."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli.app import main
from pipeline.cli.sandboxed import SANDBOX_KEY
from pipeline.costs import TOTAL_LABEL
from pipeline.ledger import read_ledger
from pipeline.rundir import SANDBOX_API_KEY, api_identity
from pipeline.sandbox import SandboxConfig
from tests.jobkit import write_job

REAL_KEY = "rw-0123456789abcdef-real"


@pytest.mark.parametrize(
    ("base_url", "key", "api"),
    [
        ("https://api.runware.ai/v1", REAL_KEY, "api.runware.ai"),
        ("https://API.runware.ai/v1/", None, "api.runware.ai"),
        ("http://127.0.0.1:41234/v1", REAL_KEY, "sandbox"),
        ("http://localhost:8080/v1", None, "sandbox"),
        ("http://[::1]:8080/v1", REAL_KEY, "sandbox"),
        ("https://sandbox.example.com/v1", "sandbox", "sandbox"),
        ("https://proxy.example.com/v1", REAL_KEY, "proxy.example.com"),
    ],
)
def test_api_identity(base_url: str, key: str | None, api: str) -> None:
    """Loopback hosts (any port) and the sandbox's key are the sandbox; else the
    host."""
    assert api_identity(base_url, key) == api


def test_the_sandbox_key_is_the_sandboxes() -> None:
    assert SANDBOX_API_KEY == SANDBOX_KEY == SandboxConfig().api_key


@pytest.fixture
def real_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A paid key in the environment and the real API's default URL."""
    monkeypatch.chdir(tmp_path)  # no ./config.toml
    monkeypatch.delenv("REMIX_BASE_URL", raising=False)
    monkeypatch.setenv("RUNWARE_API_KEY", REAL_KEY)


def _sandbox_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, list[str]]:
    job = write_job(tmp_path / "job")
    run_dir = tmp_path / "run"
    argv = ["-q", "run", str(job), "--run-dir", str(run_dir)]
    assert main([*argv, "--sandbox"]) == 0
    capsys.readouterr()
    return run_dir, argv


@pytest.mark.usefixtures("real_env")
def test_a_sandbox_run_dir_refuses_a_real_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run.json says "sandbox"; resuming it with a paid key is exit 2, naming both
    APIs, before anything is sent or written (the key named nowhere)."""
    run_dir, argv = _sandbox_run(tmp_path, capsys)
    assert json.loads((run_dir / "run.json").read_text())["api"] == "sandbox"
    before = {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a run against the local sandbox" in err
    assert "the API at api.runware.ai" in err
    assert "--run-dir" in err
    assert REAL_KEY not in err
    after = {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before


def test_a_real_run_dir_refuses_the_sandbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run dir of api.runware.ai is not resumed with --sandbox."""
    run_dir, argv = _sandbox_run(tmp_path, capsys)
    info = json.loads((run_dir / "run.json").read_text())
    info["api"] = "api.runware.ai"
    (run_dir / "run.json").write_text(json.dumps(info))
    assert main([*argv, "--sandbox"]) == 2
    err = capsys.readouterr().err
    assert "holds a run against the API at api.runware.ai" in err
    assert "would use the local sandbox" in err


@pytest.mark.usefixtures("real_env")
def test_an_older_sandbox_run_dir_is_told_by_its_base_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run.json without ``api`` (an older remix): its recorded loopback base URL
    makes it a sandbox run dir, refused with a real key."""
    run_dir, argv = _sandbox_run(tmp_path, capsys)
    info = json.loads((run_dir / "run.json").read_text())
    del info["api"]
    (run_dir / "run.json").write_text(json.dumps(info))
    assert main(argv) == 2
    assert "against the local sandbox" in capsys.readouterr().err


def test_an_older_run_dir_adopts_the_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """run.json naming no API at all: the run's API is adopted, with a warning."""
    run_dir, argv = _sandbox_run(tmp_path, capsys)
    info = json.loads((run_dir / "run.json").read_text())
    del info["api"], info["settings"]
    (run_dir / "run.json").write_text(json.dumps(info))
    assert main([*argv, "--sandbox"]) == 0
    assert "names no API" in caplog.text
    assert json.loads((run_dir / "run.json").read_text())["api"] == "sandbox"


def test_ledger_and_report_mark_sandbox_dollars(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ledger gains a last ``api`` column (the others as they were); the report
    marks sandbox totals in every format, and tells them apart in a mix."""
    run_dir, _ = _sandbox_run(tmp_path, capsys)
    with (run_dir / "ledger.csv").open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0][-2:] == ["error_message", "api"]
    assert table[0][:3] == ["key", "reference", "variant"]
    assert {row[-1] for row in table[1:]} == {"sandbox"}
    assert len(read_ledger(run_dir / "ledger.csv")) == 2

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith(TOTAL_LABEL))
    assert total.endswith("(sandbox)")
    assert "sandbox: $0.16 of the cost is a local sandbox's, not billed" in out
    assert main(["report", str(run_dir), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sandbox_usd"] == data["spent_usd"] == "0.16"
    assert data["sandbox_runs"] == [str(run_dir)]
    assert main(["report", str(run_dir), "--format", "csv"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0][-1] == "sandbox_usd"
    assert rows[-1][0] == TOTAL_LABEL
    assert rows[-1][-1] == "0.16"

    real = tmp_path / "real"
    shutil.copytree(run_dir, real)
    info = json.loads((real / "run.json").read_text())
    info["api"] = "api.runware.ai"
    (real / "run.json").write_text(json.dumps(info))
    assert main(["report", str(run_dir), str(real), "--by", "run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    groups = {line.split()[0]: line for line in lines[2:4]}
    assert groups["run"].endswith("(sandbox)")
    assert groups["real"].endswith("0.00")
    total = next(line for line in lines if line.startswith(TOTAL_LABEL))
    assert total.endswith("($0.16 sandbox)")
