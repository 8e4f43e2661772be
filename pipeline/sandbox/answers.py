"""What the sandbox's answers look like: the envelope, its items, and each dialect.

``app.py`` decides *what* happened to each task; this module words it. Every item the
sandbox sends (acks, processing items, failures, refusals, validation errors) is
built here, so each dialect switch of ``SandboxConfig`` (runware-protocol.md §10)
changes one function, not the request flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import web
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from pipeline.wire import ErrorItem, error_body

if TYPE_CHECKING:
    from pipeline.sandbox.state import SandboxTask

JsonObject = dict[str, Any]

# -- the dialects: one type per switch of SandboxConfig (its docstrings say more)

PollTaskType = Literal["imageInference", "getResponse"]
UnknownTask = Literal[
    "taskFailedOrNotFound", "taskNotFound", "taskExpired", "silent", "processing"
]
PollBatch = Literal["all", "first", "reject", "empty"]
FailedAs = Literal["errors", "data"]
ReuseCode = Literal["conflictTaskUUID", "duplicateTaskUUID"]
Ack = Literal["processing", "empty"]

CREDIT_CODE: Final = "insufficientCredits"
_FAILURE_MESSAGE: Final = "the provider failed to generate the image"


@dataclass
class Outcome:
    """The answer to one request, collected task by task."""

    data: list[JsonObject] = field(default_factory=list)
    errors: list[JsonObject] = field(default_factory=list)
    payment_required: bool = False
    """Every imageInference of the request was refused for credit: HTTP 402."""

    def body(self) -> JsonObject:
        if not self.errors:
            return {"data": self.data}
        if not self.data:
            return {"errors": self.errors}
        return {"data": self.data, "errors": self.errors}

    @property
    def status(self) -> int:
        if self.payment_required:
            return 402
        return 400 if self.errors and not self.data else 200


# -- items -------------------------------------------------------------------------


def error_item(
    code: str,
    message: str,
    parameter: str | list[str] | None,
    task_type: str | None,
    task_uuid: str | None,
    *,
    status: str | None = None,
) -> JsonObject:
    item = ErrorItem(
        code=code,
        message=message,
        parameter=parameter,
        task_type=task_type,
        task_uuid=task_uuid,
        status=status,
    )
    return item.model_dump(mode="json", exclude_none=True)


def processing_item(task_uuid: str, task_type: str = "imageInference") -> JsonObject:
    """An ack, or a getResponse item for a task still running."""
    # Never imageUUID or *URL keys here: SDKs read those as a finished result.
    return {"taskType": task_type, "taskUUID": task_uuid, "status": "processing"}


def failure_error(task: SandboxTask, task_type: str = "imageInference") -> JsonObject:
    """A failed generation as an ``errors`` item (the documented form)."""
    return error_item(
        "inferenceError",
        task.failure or _FAILURE_MESSAGE,
        None,
        task_type,
        task.task_uuid,
        status="error",
    )


def failure_item(task: SandboxTask, task_type: str) -> JsonObject:
    """A failed generation as a ``data`` item, the form both new SDKs also read."""
    return {
        "taskType": task_type,
        "taskUUID": task.task_uuid,
        "status": "error",
        "error": {
            "code": "inferenceError",
            "message": task.failure or _FAILURE_MESSAGE,
        },
    }


def add_failure(
    outcome: Outcome, task: SandboxTask, task_type: str, failed_as: FailedAs
) -> None:
    """A failed generation in a getResponse answer, in the dialect's form."""
    if failed_as == "data":
        outcome.data.append(failure_item(task, task_type))
    else:
        outcome.errors.append(failure_error(task, task_type))


def add_unknown_task(
    outcome: Outcome, task_uuid: str, mode: UnknownTask, task_type: str
) -> None:
    """getResponse about a taskUUID the sandbox does not know (never accepted, or
    expired): an error with the mode's code, nothing, or "processing" forever."""
    match mode:
        case "silent":
            pass
        case "processing":
            outcome.data.append(processing_item(task_uuid, task_type))
        case code:
            outcome.errors.append(
                error_item(
                    code,
                    f"no task {task_uuid} is known: "
                    "it was never accepted or has expired",
                    "taskUUID",
                    "getResponse",
                    task_uuid,
                    status="error",
                )
            )


def reuse_refusal(code: ReuseCode, task_uuid: str) -> JsonObject:
    """An imageInference whose taskUUID was accepted before (nothing is billed)."""
    return error_item(
        code,
        f"taskUUID {task_uuid} was already used; every task "
        "needs a new UUID (poll the old one with getResponse)",
        "taskUUID",
        "imageInference",
        task_uuid,
    )


def credit_refusal(task_uuid: str, balance: Decimal, charge: Decimal) -> JsonObject:
    """An imageInference the balance does not cover (not accepted, nothing billed)."""
    return error_item(
        CREDIT_CODE,
        f"the balance (${balance}) does not cover this task (${charge}); "
        "top up to continue",
        "taskUUID",
        "imageInference",
        task_uuid,
    )


# -- request-level answers -----------------------------------------------------------


def poll_batch_refusal() -> web.Response:
    """poll_batch="reject": a request asking about several tasks is refused whole."""
    return web.json_response(
        error_body("invalidRequestBody", "one getResponse task per request"),
        status=400,
    )


def retry_response(
    status: int, code: str, message: str, retry_after_s: float
) -> web.Response:
    """A 429/5xx with ``Retry-After`` (which runware-sdk ignores; remix honours it)."""
    return web.json_response(
        error_body(code, message),
        status=status,
        headers={"Retry-After": f"{retry_after_s:g}"},
    )


# -- validation errors ---------------------------------------------------------------


def _loc_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def validation_error(obj: JsonObject, exc: ValidationError) -> ErrorItem:
    """One Runware-shaped error naming the (first) offending parameter."""
    rank = {"extra_forbidden": 0, "missing": 1}
    errors = sorted(exc.errors(include_url=False), key=lambda e: rank.get(e["type"], 2))
    task_type = obj.get("taskType") if isinstance(obj.get("taskType"), str) else None
    problems: list[str] = []
    first_param: str | list[str] = "taskType"
    first_code = "invalidParameter"
    for n, err in enumerate(errors):
        loc = tuple(err["loc"])
        if loc and loc[0] == task_type:
            loc = loc[1:]
        message = str(err["msg"]).removeprefix("Value error, ")
        parameter: str | list[str]
        code = {
            "extra_forbidden": "unknownParameter",
            "missing": "missingParameter",
        }.get(err["type"], "invalidParameter")
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            parameter = "taskType"
            code = "missingParameter" if err["type"] == "union_tag_not_found" else code
        elif not loc and "width x height" in message:
            parameter = ["width", "height"]
        elif not loc and "ttl" in message:
            parameter = "ttl"
        else:
            parameter = _loc_path(loc) or "taskType"
        if err["type"] == "extra_forbidden" and isinstance(loc[-1], str):
            camel = to_camel(loc[-1]).replace("Uuid", "UUID").replace("Url", "URL")
            if camel != loc[-1]:
                message += f" (parameters are camelCase: did you mean '{camel}'?)"
        shown = ",".join(parameter) if isinstance(parameter, list) else parameter
        problems.append(f"{shown}: {message}")
        if n == 0:
            first_param, first_code = parameter, code
    raw_uuid = obj.get("taskUUID")
    return ErrorItem(
        code=first_code,
        message="; ".join(problems),
        parameter=first_param,
        task_type=task_type,
        task_uuid=raw_uuid if isinstance(raw_uuid, str) else None,
    )
