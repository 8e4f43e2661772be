"""The exception hierarchy; retryability is a class attribute, never a string match.

```
PipelineError
├── ConfigError, ManifestError       # user input; exit code 2
├── ApiError                         # .url, .status, .task_id where known
│   ├── TransportError               # connect/read failure           retryable
│   │   ├── RequestTimeoutError      # the HTTP call timed out        retryable
│   │   └── UnreachableError         # name unresolved, never answered run-fatal
│   ├── RateLimitedError             # 429, .retry_after_s            retryable
│   ├── ServerError                  # 5xx                            retryable
│   ├── RequestRejectedError         # other 4xx
│   │   ├── AuthError                # 401/403                        run-fatal
│   │   └── InsufficientCreditError  # 402, credit/balance/quota code run-fatal
│   ├── ProtocolError                # body didn't match the wire     retryable
│   └── DownloadError                # result image not fetched       retryable
│       └── UnusableImageError       # too large or undecodable: not retried
├── TaskTimeoutError                 # poll deadline passed: .task_id, .waited_s
└── StorageError                     # run directory not writable     run-fatal
```

A task's own failure, an ambiguous submit and a budget stop are not exceptions: they are
outcomes (``SubmitOutcome``/``PollOutcome`` fields, journal events, ``RunSummary``),
because a failed task is data, not a crash.
"""

from __future__ import annotations

from typing import ClassVar


class PipelineError(Exception):
    """Base of every error remix raises on purpose."""

    retryable: ClassVar[bool] = False
    run_fatal: ClassVar[bool] = False
    """True when no further task can succeed until the user fixes something."""


class ConfigError(PipelineError):
    """Settings (config.toml, env, flags) are invalid."""


class ManifestError(PipelineError):
    """A job manifest is invalid; carries every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ApiError(PipelineError):
    """An HTTP exchange with the API did not give a usable answer."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        task_id: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.task_id = task_id
        self.code = code


class TransportError(ApiError):
    retryable = True


class RequestTimeoutError(TransportError, TimeoutError):
    retryable = True


class UnreachableError(TransportError):
    """The API's host name does not resolve and it has not answered once this run:
    no network or a wrong base_url, which waiting seconds will not fix. The run
    stops at once (resumable) instead of retrying into the same answer."""

    retryable = False
    run_fatal = True


class _BusyError(ApiError):
    """The API asked us to wait: ``retry_after_s`` is a floor on the next try."""

    retryable = True

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, **kw: object
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class RateLimitedError(_BusyError):
    """429: the account's queue is full."""


class ServerError(_BusyError):
    """5xx (or 408): the API failed or is over capacity."""


class RequestRejectedError(ApiError):
    """A 4xx for the whole request: sending it again gives the same answer."""


class AuthError(RequestRejectedError):
    run_fatal = True


class InsufficientCreditError(RequestRejectedError):
    run_fatal = True


class ProtocolError(ApiError):
    """The body did not match the wire contract (maybe a proxy's error page)."""

    retryable = True


class DownloadError(ApiError):
    retryable = True


class UnusableImageError(DownloadError):
    """A result image that fetching again cannot fix: too large, or not decodable."""

    retryable = False


class TaskTimeoutError(PipelineError):
    def __init__(self, task_id: str, waited_s: float) -> None:
        super().__init__(
            f"task {task_id} timed out after {waited_s:.1f}s waiting for the result; "
            "raise poll.deadline_s or rerun to resume"
        )
        self.task_id = task_id
        self.waited_s = waited_s


class StorageError(PipelineError):
    run_fatal = True
