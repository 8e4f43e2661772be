"""The API key leaves the process only in the Authorization header (or auth task).

A distinctive key is used for real runs through ``remix``: a good run, a refused key,
and a hostile server that echoes the key back in every error it sends. Afterwards the
run dir (every file, as bytes), stdout, stderr, every log record at DEBUG, and the
reprs and messages of settings, client and errors are searched for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from anyio.from_thread import start_blocking_portal

from pipeline.cli import main
from pipeline.client import RunwareClient
from pipeline.config import load_settings
from pipeline.errors import ApiError, AuthError
from pipeline.sandbox import STATE, SandboxConfig, create_app
from pipeline.wire import ImageInferenceRequest
from tests.jobkit import write_job

KEY = "sk-test-SECRET-9f8e7d"
NEEDLES = (KEY, "SECRET-9f8e7d", "9f8e7d")
"""The key and telling fragments of it: a truncated echo is a leak too."""
CONFIG = """
[poll]
interval_s = 0.02
min_interval_s = 0.005
max_interval_s = 0.1
deadline_s = 3.0
not_found_grace_s = 0.1

[retry]
wait_initial_s = 0.0
wait_max_s = 0.0
attempts = 2
total_s = 2.0

[limits]
requests_per_s = 10000.0
burst = 1000

[run]
shutdown_grace_s = 1.0
"""
URL_JOB = """
[job]
name = "leak"

[defaults]
width = 1024
height = 1024
outputFormat = "PNG"

[[references]]
id = "r0"
image = "https://example.com/r0.jpg"

[[references]]
id = "r1"
image = "https://example.com/r1.jpg"

[[variants]]
id = "v0"
positivePrompt = "a cat in ink"
"""


def leaks(text: str | bytes) -> list[str]:
    """Which needles occur in text."""
    data = text.encode() if isinstance(text, str) else text
    return [n for n in NEEDLES if n.encode() in data]


def files_under(root: Path) -> Iterator[Path]:
    yield from (p for p in sorted(root.rglob("*")) if p.is_file())


def assert_dir_clean(root: Path) -> None:
    dirty = {str(p): leaks(p.read_bytes()) for p in files_under(root)}
    dirty = {p: found for p, found in dirty.items() if found}
    dirty |= {str(p): ["(in the name)"] for p in root.rglob("*") if leaks(str(p))}
    assert not dirty, dirty


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert not leaks(text), text


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record, formatted, plus its raw args and any exception text."""
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
    return "\n".join(parts)


def config_file(root: Path, extra: str = "") -> Path:
    path = root / "remix.toml"
    path.write_text(CONFIG + extra, encoding="utf-8")
    return path


Serve = Callable[[web.Application], TestServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start aiohttp apps on an event loop in another thread.

    ``remix run`` must own the main thread (anyio.run, signal handlers), so these
    tests are synchronous and the servers live behind a blocking portal.
    """
    with (
        start_blocking_portal(backend="asyncio") as portal,
        contextlib.ExitStack() as stack,
    ):

        def start(app: web.Application) -> TestServer:
            server = portal.call(TestServer, app)
            stack.enter_context(portal.wrap_async_context_manager(server))
            return server

        yield start


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> Path:
    """The key in the environment, DEBUG logging captured, a clean cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNWARE_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    return tmp_path


def test_successful_run_and_every_command_keep_the_key_secret(
    env: Path,
    serve: Serve,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """run (with an upload), plan, status, report (the HTML page too) and gallery
    never show the key."""
    server = serve(
        create_app(SandboxConfig(seed=0, latency_s=0, api_key=KEY, render_scale=0.1))
    )
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    job = write_job(env / "job", refs=2)
    run_dir = env / "run"
    config = config_file(env)
    code = main(
        ["-vv", "run", str(job), "--run-dir", str(run_dir), "--config", str(config)]
    )
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    assert server.app[STATE].uploads == 2  # the key did work: it reached the API
    outputs = [out, err]
    for argv in (
        ["plan", str(job), "--config", str(config)],
        ["plan", str(job), "--format", "json"],
        ["status", str(run_dir)],
        ["status", str(run_dir), "--format", "json"],
        ["report", str(run_dir), "--format", "json"],
        ["report", str(run_dir), "--format", "csv"],
        ["report", str(run_dir), "--format", "html"],
        ["gallery", str(run_dir)],
    ):
        assert main(["-vv", *argv]) == 0, argv
        outputs += capsys.readouterr()
    assert (run_dir / "run.json").is_file()
    assert_dir_clean(env)
    assert_clean(*outputs, log_text(caplog))


def test_refused_key_stops_the_run_without_showing_it(
    env: Path,
    serve: Serve,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 401 stops the run (exit 3); the message and the run dir hold no key."""
    server = serve(create_app(SandboxConfig(seed=0, latency_s=0, api_key="other")))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    job = write_job(env / "job", refs=1)
    run_dir = env / "run"
    code = main(
        [
            "-vv",
            "run",
            str(job),
            "--run-dir",
            str(run_dir),
            "--config",
            str(config_file(env)),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 3, (out, err)
    assert "key" in (out + err).lower()
    assert server.app[STATE].http_requests >= 1
    assert_dir_clean(env)
    assert_clean(out, err, log_text(caplog))


# ---------------------------------------------------------------------------
# A hostile server that echoes the credentials back


class Echo:
    """What the stub answers; it quotes the Authorization header and the body.

    ``mode`` is a comma-separated list of answers, one per request, the last one
    repeated: "500,401" answers 500 once, then 401 for ever (so the run ends fast).
    """

    def __init__(self, mode: str) -> None:
        self.modes = mode.split(",")
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        mode = self.modes[min(self.requests, len(self.modes) - 1)]
        self.requests += 1
        raw = await request.text()
        echo = f"you sent {request.headers.get('Authorization', '')!r} and {raw[:300]}"
        if mode == "401":
            return self.errors(401, "invalidApiKey", echo, parameter="apiKey")
        if mode == "403":
            return self.errors(403, "forbidden", echo)
        if mode == "request-400":
            return self.errors(400, "invalidParameter", echo)
        if mode == "500":
            return self.errors(500, "internalError", echo)
        if mode == "html":
            return web.Response(text=f"<html>{echo}</html>", content_type="text/html")
        if mode == "task-errors":
            tasks = json.loads(raw)
            items = [
                {
                    "code": "invalidParameter",
                    "message": echo,
                    "taskType": t.get("taskType"),
                    "taskUUID": t.get("taskUUID"),
                    "parameter": "positivePrompt",
                }
                for t in tasks
                if isinstance(t, dict) and "taskUUID" in t
            ]
            return web.json_response({"errors": items}, status=400)
        raise AssertionError(mode)

    @staticmethod
    def errors(status: int, code: str, message: str, **extra: Any) -> web.Response:
        return web.json_response(
            {"errors": [{"code": code, "message": message, **extra}]}, status=status
        )


def echo_app(mode: str) -> tuple[web.Application, Echo]:
    echo = Echo(mode)
    app = web.Application()
    app.router.add_post("/v1", echo.handle)
    return app, echo


MODES = ["401", "403", "request-400", "task-errors", "500,500,401", "html,html,401"]


def mode_param(mode: str) -> Any:
    return pytest.param(mode, id=mode)


@pytest.mark.parametrize("auth_in_body", [False, True], ids=["header", "body"])
@pytest.mark.parametrize("mode", [mode_param(m) for m in MODES])
def test_echoed_key_is_redacted_everywhere(
    mode: str,
    auth_in_body: bool,
    env: Path,
    serve: Serve,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server quoting the key in its errors: remix redacts it before any output."""
    app, echo = echo_app(mode)
    server = serve(app)
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    job = env / "job.toml"
    job.write_text(URL_JOB, encoding="utf-8")
    extra = "\n[api]\nauth_in_body = true\n" if auth_in_body else ""
    run_dir = env / "run"
    argv = ["-vv", "run", str(job), "--run-dir", str(run_dir)]
    code = main([*argv, "--config", str(config_file(env, extra))])
    out, err = capsys.readouterr()
    assert echo.requests >= 1
    assert code != 0, (out, err)
    for follow_up in (["status", str(run_dir)], ["report", str(run_dir)]):
        main(follow_up)
        out2, err2 = capsys.readouterr()
        assert_clean(out2, err2)
    assert_dir_clean(env)
    assert_clean(out, err, log_text(caplog))


def inference_task() -> ImageInferenceRequest:
    return ImageInferenceRequest.model_validate(
        {
            "taskType": "imageInference",
            "taskUUID": uuid.uuid4(),
            "model": "ideogram:3@2",
            "positivePrompt": "a cat",
            "width": 1024,
            "height": 1024,
            "deliveryMethod": "async",
            "inputs": {"referenceImages": ["https://example.com/a.jpg"]},
        },
        by_alias=True,
        by_name=False,
    )


def describe(exc: BaseException) -> str:
    """Everything an error shows: str, repr, args, and its cause chain."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args), repr(vars(seen))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("mode", ["401", "403", "500", "html"])
async def test_client_errors_and_reprs_hold_no_key(
    mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings, client and every raised error render without the key."""
    caplog.set_level(logging.DEBUG)
    app, _ = echo_app(mode)
    server = TestServer(app)
    async with server:
        config = config_file(tmp_path)
        settings = load_settings(
            config,
            env={"RUNWARE_API_KEY": KEY, "REMIX_BASE_URL": str(server.make_url("/v1"))},
        )
        client = RunwareClient(settings)
        shown = [
            repr(settings),
            str(settings),
            repr(settings.api_key),
            str(settings.api_key),
            json.dumps(settings.public_dict()),
            settings.model_dump_json(),
            repr(settings.model_dump()),
            repr(client),
        ]
        async with client:
            shown.append(repr(client))
            with pytest.raises(ApiError) as poll_error:
                await client.poll([str(uuid.uuid4())])
            shown.append(describe(poll_error.value))
            with pytest.raises(ApiError) as upload_error:
                await client.upload_image("https://example.com/a.jpg")
            shown.append(describe(upload_error.value))
            try:
                outcome = await client.submit([inference_task()])
            except AuthError as exc:
                shown.append(describe(exc))
            else:
                shown.append(repr(outcome))
    assert_clean(*shown, log_text(caplog))


async def test_config_errors_do_not_echo_the_key(tmp_path: Path) -> None:
    """A broken config file with the key in the environment: the message hides it."""
    config = tmp_path / "bad.toml"
    config.write_text('[api]\nrequest_timeout_s = "soon"\nnope = 1\n', encoding="utf-8")
    with pytest.raises(Exception, match="request_timeout_s") as info:
        load_settings(config, env={"RUNWARE_API_KEY": KEY})
    assert_clean(describe(info.value))
