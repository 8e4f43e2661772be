"""Settings: config.toml, then environment, then command-line flags, in that order.

The API key comes only from the environment: ``RUNWARE_API_KEY``, or a file named by
``RUNWARE_API_KEY_FILE`` (for cron and systemd, whose environment is bare). It is held
as a ``SecretStr`` so it never reaches a repr, a log line or ``run.json``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    ValidationError,
)

from pipeline.errors import ConfigError
from pipeline.wire import DEFAULT_PRICE_USD

DEFAULT_BASE_URL: Final = "https://api.runware.ai/v1"
ENV_API_KEY: Final = "RUNWARE_API_KEY"
ENV_API_KEY_FILE: Final = "RUNWARE_API_KEY_FILE"
ENV_BASE_URL: Final = "REMIX_BASE_URL"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]


class Section(BaseModel):
    """Config sections: frozen, and a typo in config.toml is an error."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True
    )


class ApiSettings(Section):
    base_url: str = DEFAULT_BASE_URL
    """Where task arrays are POSTed; REMIX_BASE_URL overrides it."""
    request_timeout_s: PositiveFloat = 60.0
    """Total time for one HTTP call."""
    connect_timeout_s: PositiveFloat = 10.0
    download_timeout_s: PositiveFloat = 120.0
    max_download_bytes: PositiveInt = 64 * 1024 * 1024
    """A result image larger than this is refused (a guard against a runaway body)."""
    auth_in_body: StrictBool = False
    """Send the key as an authentication task instead of the Bearer header."""


class LimitSettings(Section):
    concurrency: PositiveInt = 64
    """Most tasks in flight at the API at once (submitted, not yet finished)."""
    min_concurrency: PositiveInt = 4
    """Floor for the adaptive (AIMD) concurrency after 429/503/504 answers."""
    requests_per_s: PositiveFloat = 100.0
    """Most API requests started per second for the whole account (submits, polls
    and uploads together; downloads are not API requests)."""
    burst: PositiveInt = 50
    submit_batch: PositiveInt = 50
    """Most tasks in one submit request."""
    poll_batch: PositiveInt = 100
    """Most taskUUIDs in one getResponse request."""
    download_concurrency: PositiveInt = 64


class PollSettings(Section):
    interval_s: PositiveFloat = 0.5
    """When to first ask about a task before any latency has been observed; later
    questions follow the observed latency."""
    min_interval_s: PositiveFloat = 0.01
    """Shortest gap between two questions about the same task."""
    first_after_s: NonNegativeFloat = 0.25
    """No task is asked about sooner than this after it was sent (or sent again),
    whatever latency is learnt: a floor against an estimate gone wrong. Ideogram
    takes seconds, so it binds only on a much faster API."""
    max_interval_s: PositiveFloat = 10.0
    deadline_s: PositiveFloat = 900.0
    """A task still unfinished this long after submit fails as timed out (resumable)."""
    outage_s: PositiveFloat = 300.0
    """Every poll failing (after retries) this long stops the run, resumable."""
    not_found_grace_s: NonNegativeFloat = 5.0
    """A just-accepted task may not be visible yet: wait this long before believing
    'not found' for an ambiguous submit."""


class RetrySettings(Section):
    attempts: PositiveInt = 6
    wait_initial_s: NonNegativeFloat = 0.5
    wait_max_s: NonNegativeFloat = 30.0
    total_s: NonNegativeFloat = 120.0
    """Bound on the time spent retrying one HTTP call."""
    jitter: StrictBool = True


class RunSettings(Section):
    runs_dir: Path = Path("runs")
    shutdown_grace_s: NonNegativeFloat = 30.0
    """After the first Ctrl-C, how long in-flight tasks may still finish."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """The event loop: "auto" takes uvloop when it is installed (it is a dependency
    on Linux and macOS): the client's HTTP and queue work then costs ~15% less CPU."""


class Settings(Section):
    api: ApiSettings = ApiSettings()
    limits: LimitSettings = LimitSettings()
    poll: PollSettings = PollSettings()
    retry: RetrySettings = RetrySettings()
    run: RunSettings = RunSettings()
    prices_usd: dict[str, Decimal] = Field(
        default_factory=lambda: {
            "TURBO": DEFAULT_PRICE_USD,
            "DEFAULT": DEFAULT_PRICE_USD,
            "QUALITY": DEFAULT_PRICE_USD,
        }
    )
    """Estimated USD per image by renderingSpeed. Only 0.08 is documented (the seed's
    examples); the ledger always records what the API reports."""
    api_key: SecretStr | None = Field(default=None, exclude=True)

    def price_for(self, rendering_speed: str | None) -> Decimal:
        """Estimated cost of one image at this rendering speed."""
        return self.prices_usd.get(rendering_speed or "DEFAULT", DEFAULT_PRICE_USD)

    def public_dict(self) -> dict[str, Any]:
        """Settings for run.json: everything but the key."""
        return self.model_dump(mode="json", exclude={"api_key"})


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    config_path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from a TOML file (if any), the environment and flag overrides.

    Args:
        config_path: a file that must exist, or None for ./config.toml if any.
        env: the environment to read (os.environ by default).
        overrides: nested section values from command-line flags.

    Raises:
        ConfigError: the file is unreadable or a value is invalid.
    """
    env = os.environ if env is None else env
    path = config_path
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if base_url := env.get(ENV_BASE_URL):
        data = _merge(data, {"api": {"base_url": base_url}})
    if overrides:
        data = _merge(data, overrides)
    if key := api_key_from(env):
        data["api_key"] = key
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path else "settings"
        problems = [
            f"{where}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError("\n".join(problems)) from None


def api_key_from(env: Mapping[str, str]) -> str | None:
    """The key from ``RUNWARE_API_KEY`` or the file ``RUNWARE_API_KEY_FILE`` names.

    Raises:
        ConfigError: both are set, or the file is unreadable, empty, or open to
            group or others (a key file is a password: mode 600). The key itself
            is never part of a message.
    """
    key = env.get(ENV_API_KEY)
    file = env.get(ENV_API_KEY_FILE)
    if not file:
        return key or None
    if key:
        raise ConfigError(
            f"both {ENV_API_KEY} and {ENV_API_KEY_FILE} are set: unset one of them"
        )
    path = Path(file).expanduser()
    try:
        mode = path.stat().st_mode
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(
                f"{ENV_API_KEY_FILE}={path}: the key file is open to group or others "
                f"(mode {mode & 0o777:03o}); run: chmod 600 {path}"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise ConfigError(
            f"{ENV_API_KEY_FILE}={path}: cannot read the key file: {why}"
        ) from None
    if not (key := text.strip()):
        raise ConfigError(f"{ENV_API_KEY_FILE}={path}: the key file is empty")
    return key


def loop_options(choice: str) -> dict[str, Any]:
    """``anyio.run`` backend options for a ``run.event_loop`` value.

    Raises:
        ConfigError: "uvloop" was asked for and is not installed.
    """
    if choice == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401  (only whether it imports matters here)
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                'run.event_loop = "uvloop" but uvloop is not installed: '
                'pip install uvloop, or set run.event_loop = "auto"'
            ) from None
        return {}
    return {"use_uvloop": True}
