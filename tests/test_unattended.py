"""Nightly runs a team can leave alone: the key from a file, the run dir of the night,
the cron line under cron's bare environment, plain errors and a self-explaining CLI."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import stat
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from aiohttp.test_utils import TestServer

from pipeline.cli import main
from pipeline.cli.parser import build_parser
from pipeline.client import RunwareClient
from pipeline.config import load_settings
from pipeline.errors import ConfigError, TransportError
from pipeline.rundir import remix_version
from pipeline.sandbox import STATE, SandboxConfig, running_sandbox
from pipeline.wire import ALLOWED_SIZES
from tests.jobkit import SANDBOX_KEY, base_url, image_files, write_job

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KEY = "sk-test-0123456789abcdef"
NOWHERE = "remix-test-nowhere.invalid"
"""A name that never resolves (RFC 6761 reserves .invalid)."""


@pytest.fixture(autouse=True)
def _bare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RUNWARE_API_KEY", "RUNWARE_API_KEY_FILE", "REMIX_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


# ---------------------------------------------------------------- the key file


def test_key_comes_from_a_private_file_stripped(tmp_path: Path) -> None:
    """RUNWARE_API_KEY_FILE: the file's content, without its whitespace."""
    path = key_file(tmp_path / "key", f"  {KEY}\n\n")
    settings = load_settings(env={"RUNWARE_API_KEY_FILE": str(path)})
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == KEY
    assert KEY not in repr(settings) + json.dumps(settings.public_dict())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_file_others_can_read_is_refused_naming_the_mode(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: int,
) -> None:
    """Exit 2 before anything is sent, saying which chmod; the key is never shown."""
    path = key_file(tmp_path / "key", KEY + "\n", mode)
    monkeypatch.setenv("RUNWARE_API_KEY_FILE", str(path))
    job = write_job(tmp_path)
    assert main(["run", str(job), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"chmod 600 {path}" in err
    assert f"mode {mode:03o}" in err
    assert KEY not in err
    assert not (tmp_path / "run").exists()


def test_key_file_empty_missing_or_doubled_is_a_plain_error(tmp_path: Path) -> None:
    empty = key_file(tmp_path / "empty", " \n")
    cases = [
        ({"RUNWARE_API_KEY_FILE": str(empty)}, "empty"),
        ({"RUNWARE_API_KEY_FILE": str(tmp_path / "none")}, "cannot read"),
        (
            {"RUNWARE_API_KEY_FILE": str(empty), "RUNWARE_API_KEY": KEY},
            "unset one of them",
        ),
    ]
    for env, words in cases:
        with pytest.raises(ConfigError, match=words) as info:
            load_settings(env=env)
        assert KEY not in str(info.value)


# ------------------------------------------------------- the night's run dir


def _template(tmp_path: Path) -> str:
    return str(tmp_path / "runs" / "nightly-{date}")


def _date_dirs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "runs").iterdir())


def _backdate(run_dir: Path, *, started: datetime, day: str) -> Path:
    """The run dir as if its run had first started at ``started`` on ``day``."""
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text())
    info["started_at"] = started.isoformat()
    info_path.write_text(json.dumps(info))
    moved = run_dir.with_name(f"nightly-{day}")
    run_dir.rename(moved)
    return moved


async def remix(api: TestServer, *argv: str) -> tuple[int, str]:
    """`remix ...` as a process against the test's sandbox: its exit code and
    stdout. (``main`` in a worker thread cannot install its signal handlers, and an
    in-process --sandbox forgets the tasks of the run before.)"""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "REMIX_BASE_URL": base_url(api),
        "RUNWARE_API_KEY": SANDBOX_KEY,
    }
    done = await anyio.run_process(
        [sys.executable, "-m", "pipeline", *argv], env=env, check=False
    )
    return done.returncode, done.stdout.decode()


async def test_resume_after_midnight_continues_the_nights_run(
    tmp_path: Path, sandbox: TestServer
) -> None:
    """A run stopped (exit 3) and resumed with the same template after midnight
    continues yesterday's dir: no new dir, no task paid twice."""
    job = write_job(tmp_path, refs=2)
    template = _template(tmp_path)
    args = ["-q", "run", str(job), "--run-dir", template]
    assert (await remix(sandbox, *args, "--budget", "0.08"))[0] == 3
    today = datetime.now().astimezone().date()
    assert _date_dirs(tmp_path) == [f"nightly-{today.isoformat()}"]
    yesterday = (today - timedelta(days=1)).isoformat()
    night = _backdate(
        tmp_path / "runs" / f"nightly-{today.isoformat()}",
        started=datetime.now(UTC) - timedelta(hours=1),
        day=yesterday,
    )

    code, out = await remix(sandbox, *args, "--budget", "0.16")
    assert code == 0, out
    assert f"run dir   {night}\n" in out
    assert _date_dirs(tmp_path) == [f"nightly-{yesterday}"]
    assert len(image_files(night)) == 2
    assert "cost      $0.08 this run, $0.16 in all" in out
    state = sandbox.app[STATE]
    assert state.billed_total_usd == Decimal("0.16")  # each task paid for once
    assert state.content_billed_twice == 0


async def test_next_night_starts_its_own_run_dir(
    tmp_path: Path, sandbox: TestServer
) -> None:
    """A run dir first started more than 20 hours ago is last night's: a new date."""
    job = write_job(tmp_path, refs=1)
    template = _template(tmp_path)
    args = ["-q", "run", str(job), "--run-dir", template]
    assert (await remix(sandbox, *args))[0] == 0
    today = datetime.now().astimezone().date()
    yesterday = (today - timedelta(days=1)).isoformat()
    _backdate(
        tmp_path / "runs" / f"nightly-{today.isoformat()}",
        started=datetime.now(UTC) - timedelta(hours=25),
        day=yesterday,
    )
    assert (await remix(sandbox, *args))[0] == 0
    assert _date_dirs(tmp_path) == [f"nightly-{yesterday}", f"nightly-{today}"]


def test_a_run_dir_without_a_template_is_taken_as_given(tmp_path: Path) -> None:
    from pipeline.nightly import resolve_run_dir  # here: new in this change

    plain = tmp_path / "runs" / "nightly-2020-01-01"
    assert resolve_run_dir(plain) == plain


# ------------------------------------------------------------ no network


async def test_an_unresolvable_api_host_is_said_at_once_in_plain_words() -> None:
    """A name that does not resolve, from a host never reached: one line naming the
    host and the cause, without the retries (~10 s) that cannot change it."""
    settings = load_settings(
        env={"REMIX_BASE_URL": f"https://{NOWHERE}/v1", "RUNWARE_API_KEY": KEY}
    )
    async with RunwareClient(settings) as client:
        with pytest.raises(TransportError) as info:
            await client.poll([str(uuid.uuid4())])
        assert client.retries == 0
    assert str(info.value) == f"cannot reach {NOWHERE}: name does not resolve"
    assert info.value.run_fatal


def test_a_run_with_no_network_stops_with_one_plain_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 3 (resumable), the cause in words, no exception repr, no key."""
    monkeypatch.setenv("REMIX_BASE_URL", f"https://{NOWHERE}/v1")
    monkeypatch.setenv("RUNWARE_API_KEY", KEY)
    job = write_job(tmp_path)
    assert main(["-q", "run", str(job), "--run-dir", str(tmp_path / "run")]) == 3
    captured = capsys.readouterr()
    assert (
        f"stopped early, 2 of 2 tasks left: cannot reach {NOWHERE}: name does not "
        f"resolve; check the network and https://{NOWHERE}/v1, then rerun to resume"
    ) in captured.out
    assert "Error(" not in captured.out + captured.err
    assert KEY not in captured.out + captured.err


# ----------------------------------------------------------------- the CLI


def test_plan_sizes_lists_every_allowed_pair(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--sizes"]) == 0
    out = capsys.readouterr().out
    for width, height in ALLOWED_SIZES:
        assert f"{width}x{height}" in out
    assert main(["plan", "--sizes", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(s["width"], s["height"]) for s in listed} == ALLOWED_SIZES


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_option_has_help_and_its_default_and_every_command_examples() -> None:
    """Each option says what it does and what it is when not given; each command's
    help ends with examples."""
    parser = build_parser()
    commands = _subparsers(parser)
    for name, command in [("remix", parser), *commands.items()]:
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or isinstance(
                action, argparse._HelpAction | argparse._VersionAction
            ):
                continue
            shown = formatter._get_help_string(action) or ""  # as --help shows it
            assert action.help, f"{name} {action.option_strings}: no help text"
            if not isinstance(action, argparse._StoreTrueAction):
                assert "default" in shown, f"{name} {action.option_strings}: {shown}"
        text = command.format_help()
        assert "\nexamples:\n" in text, name
        assert "remix " in text.rstrip().splitlines()[-1], name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"remix {remix_version()}"


# ------------------------------------------------------------ deploy/


def cron_command() -> str:
    """The command of deploy/remix-nightly.cron's one schedule line."""
    lines = [
        line
        for line in (DEPLOY / "remix-nightly.cron").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1, lines
    return lines[0].split(None, 5)[5]


def test_readme_and_the_nightly_job_say_what_deploy_does() -> None:
    readme = (REPO / "README.md").read_text()
    assert cron_command() in readme
    nightly = (REPO / "jobs" / "nightly.toml").read_text()
    assert "deploy/remix-nightly.cron" in nightly
    assert "--run-dir 'runs/nightly-{date}'" in nightly
    assert "$(date" not in nightly + cron_command()


def test_the_systemd_unit_retries_exit_3_only_a_bounded_number_of_times() -> None:
    unit = (DEPLOY / "remix-nightly.service").read_text()
    settings = dict(
        line.split("=", 1)
        for line in unit.splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"].split() == ["1", "2"]
    assert int(settings["StartLimitBurst"]) > 1
    assert settings["EnvironmentFile"]
    run = shlex.split(settings["ExecStart"])
    cron_run = cron_command().split(".venv/bin/remix ", 1)[1].split(";")[0]
    assert run[1:] == shlex.split(cron_run)
    assert "OnCalendar=" in (DEPLOY / "remix-nightly.timer").read_text()


@pytest.mark.slow
async def test_the_cron_line_runs_under_crons_bare_environment(tmp_path: Path) -> None:
    """deploy/'s cron line, /srv/remix moved to tmp, run by sh under `env -i` with
    only cron's PATH: the key comes from the key file, the API URL from the
    project's config.toml; exit 0 and every image of the nightly job."""
    home = tmp_path / "srv-remix"
    shutil.copytree(REPO / "jobs", home / "jobs", ignore=shutil.ignore_patterns("*.md"))
    remix = home / ".venv" / "bin" / "remix"
    remix.parent.mkdir(parents=True)
    # The project's venv: this interpreter running this checkout.
    remix.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} "
        f'exec {shlex.quote(sys.executable)} -m pipeline "$@"\n'
    )
    remix.chmod(remix.stat().st_mode | stat.S_IXUSR)
    key_file(home / "runware.key", KEY + "\n")
    command = cron_command().replace("/srv/remix", str(home))
    assert str(home) in command
    sandbox = SandboxConfig(seed=0, latency_s=0, api_key=KEY)
    async with running_sandbox(sandbox) as url:
        (home / "config.toml").write_text(f'[api]\nbase_url = "{url}"\n')
        done = await anyio.run_process(
            ["env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", command],
            check=False,
        )
    log = (home / "logs" / "nightly.log").read_text()
    assert done.returncode == 0, log
    run_dirs = list((home / "runs").iterdir())
    today = datetime.now().astimezone().date().isoformat()
    assert [d.name for d in run_dirs] == [f"nightly-{today}"]
    assert len(image_files(run_dirs[0])) == 108
    for path in [home / "logs" / "nightly.log", *run_dirs[0].rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
