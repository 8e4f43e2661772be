"""Every answer shape the API's dialects use, read by ``pipeline.answers`` (pure:
envelopes in, outcomes out), and the settling and poll-batching rules."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.answers import (
    CREDIT_CODES,
    NOT_FOUND_CODES,
    REUSED_UUID_CODES,
    read_poll,
    read_submit,
)
from pipeline.dialect import (
    DIALECT_NAME,
    Dialect,
    PollBatching,
    PollMode,
    UnknownTask,
    cache_path,
    load_dialect,
    save_dialect,
)
from pipeline.settle import Answer, Settling, Step
from pipeline.wire import Envelope

U1, U2, U3 = (str(uuid.uuid4()) for _ in range(3))


def env(body: dict[str, Any]) -> Envelope:
    return Envelope.model_validate_json(json.dumps(body))


def success(task_uuid: str, task_type: str | None = "imageInference") -> dict[str, Any]:
    item: dict[str, Any] = {
        "taskUUID": task_uuid,
        "imageUUID": str(uuid.uuid4()),
        "imageURL": "https://im.example/x.jpg",
        "status": "success",
        "cost": 0.08,
    }
    if task_type is not None:
        item["taskType"] = task_type
    return item


# ------------------------------------------------------------ 1. any taskType


@pytest.mark.parametrize("task_type", ["imageInference", "getResponse", "x", None])
def test_poll_items_of_any_task_type(task_type: str | None) -> None:
    """Results and processing items count whatever taskType they carry."""
    busy: dict[str, Any] = {"taskUUID": U2, "status": "processing"}
    if task_type is not None:
        busy["taskType"] = task_type
    outcome = read_poll(env({"data": [success(U1, task_type), busy]}), [U1, U2])
    assert [r.task_uuid for r in outcome.results] == [U1]
    assert outcome.processing == {U2}
    assert not outcome.unanswered


# ------------------------------------------------------------ 2. failures


@pytest.mark.parametrize("task_type", ["imageInference", "getResponse"])
@pytest.mark.parametrize("form", ["errors", "data"])
def test_failed_generation_in_either_form(form: str, task_type: str) -> None:
    """A failure as an errors item or as a data item with a nested error fails the
    task with its code and message; it is never taken for processing."""
    error = {"code": "inferenceError", "message": "provider failed"}
    body: dict[str, Any]
    if form == "errors":
        body = {"errors": [{**error, "taskUUID": U1, "status": "error"}]}
    else:
        item: dict[str, Any] = {
            "taskType": task_type,
            "taskUUID": U1,
            "status": "error",
        }
        body = {"data": [{**item, "error": error}]}
    outcome = read_poll(env(body), [U1])
    assert outcome.failed[U1].code == "inferenceError"
    assert outcome.failed[U1].message == "provider failed"
    assert outcome.failed[U1].task_uuid == U1
    assert not outcome.processing
    assert not outcome.unanswered


def test_failed_data_item_in_a_submit_answer_fails_the_task() -> None:
    item = {"taskUUID": U1, "status": "error", "error": {"code": "invalidPrompt"}}
    outcome = read_submit(env({"data": [item]}), [U1], request_level=False, status=200)
    assert outcome.failed[U1].code == "invalidPrompt"
    assert not outcome.accepted
    assert not outcome.ambiguous


# ------------------------------------------------------------ 3. unknown tasks


@pytest.mark.parametrize("code", sorted(NOT_FOUND_CODES))
def test_not_found_family(code: str) -> None:
    body = {"errors": [{"code": code, "taskUUID": U1, "status": "error"}]}
    outcome = read_poll(env({**body, "data": [success(U2)]}), [U1, U2])
    assert outcome.not_found == {U1}
    assert not outcome.failed
    assert outcome.answered == {U1, U2}


@pytest.mark.parametrize("code", sorted(NOT_FOUND_CODES))
def test_not_found_as_a_data_item(code: str) -> None:
    item = {"taskUUID": U1, "status": "error", "error": {"code": code}}
    outcome = read_poll(env({"data": [item]}), [U1])
    assert outcome.not_found == {U1}
    assert not outcome.failed


def test_silence_is_unanswered_not_processing() -> None:
    outcome = read_poll(env({"data": []}), [U1, U2])
    assert outcome.unanswered == {U1, U2}
    assert not outcome.processing
    assert not outcome.answered


# ------------------------------------------------------------ 5. reused UUIDs


@pytest.mark.parametrize("code", sorted(REUSED_UUID_CODES))
def test_reused_uuid_means_accepted_earlier(code: str) -> None:
    body = {
        "data": [{"taskType": "imageInference", "taskUUID": U2}],
        "errors": [{"code": code, "taskUUID": U1}],
    }
    outcome = read_submit(env(body), [U1, U2], request_level=False, status=200)
    assert outcome.already_accepted == [U1]
    assert outcome.accepted == [U2]
    assert not outcome.failed
    assert not outcome.ambiguous


def test_a_task_missing_from_the_answer_is_ambiguous() -> None:
    body = {"data": [{"taskType": "imageInference", "taskUUID": U1}]}
    outcome = read_submit(env(body), [U1, U2], request_level=False, status=200)
    assert outcome.accepted == [U1]
    assert outcome.ambiguous == [U2]
    empty = read_submit(env({"data": []}), [U1, U2], request_level=False, status=200)
    assert empty.ambiguous == [U1, U2]


# ------------------------------------------------------------ 6. credit


@pytest.mark.parametrize("code", sorted(CREDIT_CODES))
def test_credit_refusal_beside_acks(code: str) -> None:
    body = {
        "data": [{"taskType": "imageInference", "taskUUID": U1}],
        "errors": [{"code": code, "message": "low", "taskUUID": U2}],
    }
    outcome = read_submit(env(body), [U1, U2], request_level=False, status=200)
    assert outcome.accepted == [U1]
    assert list(outcome.credit_refused) == [U2]
    assert outcome.credit_message == f"{code}: low"


def test_402_refuses_every_task_not_acked() -> None:
    body = {
        "data": [{"taskType": "imageInference", "taskUUID": U1}],
        "errors": [{"code": "somethingElse", "message": "pay up"}],
    }
    outcome = read_submit(env(body), [U1, U2, U3], request_level=True, status=402)
    assert outcome.accepted == [U1]
    assert sorted(outcome.credit_refused) == sorted([U2, U3])
    assert not outcome.ambiguous


def test_request_level_4xx_fails_the_rest_but_keeps_acks() -> None:
    body = {
        "data": [{"taskType": "imageInference", "taskUUID": U1}],
        "errors": [{"code": "invalidRequest", "message": "no"}],
    }
    outcome = read_submit(env(body), [U1, U2], request_level=True, status=400)
    assert outcome.accepted == [U1]
    assert outcome.failed[U2].code == "invalidRequest"


@pytest.mark.parametrize(
    "code", ["styleCreditsInvalid", "BalanceSheet", "quotaParameter", "credits"]
)
def test_credit_words_are_not_credit_codes(code: str) -> None:
    body = {"errors": [{"code": code, "taskUUID": U1}]}
    outcome = read_submit(env(body), [U1], request_level=False, status=400)
    assert outcome.failed[U1].code == code
    assert not outcome.credit_refused


@given(
    fates=st.lists(
        st.sampled_from(["ack", "result", "reused", "credit", "fail", "absent"]),
        min_size=1,
        max_size=8,
    ),
    status=st.sampled_from([200, 400, 402]),
)
def test_every_task_has_exactly_one_fate(fates: list[str], status: int) -> None:
    uuids = [str(uuid.uuid4()) for _ in fates]
    data: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for u, fate in zip(uuids, fates, strict=True):
        if fate == "ack":
            data.append({"taskType": "imageInference", "taskUUID": u})
        elif fate == "result":
            data.append(success(u))
        elif fate == "reused":
            errors.append({"code": "duplicateTaskUUID", "taskUUID": u})
        elif fate == "credit":
            errors.append({"code": "insufficientCredits", "taskUUID": u})
        elif fate == "fail":
            errors.append({"code": "invalidParameter", "taskUUID": u})
    named = any(f in ("reused", "credit", "fail") for f in fates)
    request_level = status == 402 or (status == 400 and not named)
    outcome = read_submit(
        env({"data": data, "errors": errors}),
        uuids,
        request_level=request_level,
        status=status,
    )
    groups = [
        set(outcome.accepted),
        set(outcome.already_accepted),
        set(outcome.failed),
        set(outcome.credit_refused),
        set(outcome.ambiguous),
    ]
    assert sum(len(g) for g in groups) == len(uuids)
    assert set().union(*groups) == set(uuids)
    for u, fate in zip(uuids, fates, strict=True):
        if fate in ("ack", "result"):
            assert u in outcome.accepted
        if fate == "reused":
            assert u in outcome.already_accepted
        if fate == "credit":
            assert u in outcome.credit_refused


# ------------------------------------------------------------ settling


SETTLE = Settling(grace_s=5.0, processing_proves=False)


@pytest.mark.parametrize("answer", list(Answer))
def test_an_unproven_task_is_sent_again_after_the_grace(answer: Answer) -> None:
    """Ambiguous and unanswered, not found or "processing" (which proves nothing
    from an API that may say it of unknown tasks): same taskUUID after the grace."""
    before = SETTLE.step(answer, proven=False, seen_working=False, since_sent_s=4.9)
    after = SETTLE.step(answer, proven=False, seen_working=False, since_sent_s=5.0)
    assert (before, after) == (Step.WAIT, Step.RESEND)


def test_processing_proves_acceptance_only_where_unknown_tasks_say_otherwise() -> None:
    assert not SETTLE.proven(acked=False, answered=False, seen_processing=True)
    knowing = Settling(grace_s=5.0, processing_proves=True)
    assert knowing.proven(acked=False, answered=False, seen_processing=True)
    assert SETTLE.proven(acked=True, answered=False, seen_processing=False)
    assert SETTLE.proven(acked=False, answered=True, seen_processing=False)


def test_a_proven_task_is_waited_for_and_expires_once_gone() -> None:
    for answer in (Answer.PROCESSING, Answer.SILENT):
        assert (
            SETTLE.step(answer, proven=True, seen_working=True, since_sent_s=99)
            is Step.WAIT
        )
    gone = SETTLE.step(Answer.NOT_FOUND, proven=True, seen_working=True, since_sent_s=1)
    assert gone is Step.EXPIRED
    # acked but never seen: maybe not visible yet, then the same UUID again
    early = SETTLE.step(
        Answer.NOT_FOUND, proven=True, seen_working=False, since_sent_s=1
    )
    late = SETTLE.step(
        Answer.NOT_FOUND, proven=True, seen_working=False, since_sent_s=6
    )
    assert (early, late) == (Step.WAIT, Step.RESEND)


# ------------------------------------------------------------ poll batching


def test_a_batch_answering_every_known_task_is_trusted() -> None:
    batching = PollBatching(PollMode.UNKNOWN, 100)
    assert batching.size == 100
    assert batching.judge([U1, U2, U3], {U1, U2, U3}, {U1, U2}, refused=False)
    assert batching.mode is PollMode.BATCHED
    # trusted from now on: a later gap does not unbatch it
    assert not batching.judge([U1, U2], {U1}, {U1, U2}, refused=False)
    assert batching.size == 100


@pytest.mark.parametrize("answered", [{U1}, set()], ids=["first-only", "nothing"])
def test_a_batch_leaving_known_tasks_out_unbatches_in_two(answered: set[str]) -> None:
    batching = PollBatching(PollMode.UNKNOWN, 100)
    assert not batching.judge([U1, U2, U3], answered, {U1, U2, U3}, refused=False)
    assert batching.judge([U1, U2, U3], answered, {U1, U2, U3}, refused=False)
    assert batching.mode is PollMode.SINGLE
    assert batching.size == 1


def test_a_refused_batch_unbatches_at_once() -> None:
    batching = PollBatching(PollMode.UNKNOWN, 100)
    assert batching.judge([U1, U2], set(), set(), refused=True)
    assert batching.size == 1


def test_unknown_tasks_alone_give_no_verdict() -> None:
    """Silence about tasks the API may not hold (ambiguous submits) says nothing
    about batching: an API may be silent about unknown tasks."""
    batching = PollBatching(PollMode.UNKNOWN, 100)
    for _ in range(5):
        assert not batching.judge([U1, U2], set(), set(), refused=False)
    assert batching.mode is PollMode.UNKNOWN
    assert not batching.judge([U1], set(), {U1}, refused=False)  # not a batch


# ------------------------------------------------------------ dialect records


def test_dialect_record_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run dir's record wins over the doctor's cache for the base URL."""
    monkeypatch.setenv("REMIX_CACHE_DIR", str(tmp_path / "cache"))
    url = "https://api.example.test:8443/v1"
    path = cache_path(url)
    assert path == tmp_path / "cache" / "dialects" / "api.example.test_8443.json"
    assert load_dialect(None, url) == Dialect()
    doctor = Dialect(poll_mode=PollMode.SINGLE, unknown_task=UnknownTask.SILENT)
    save_dialect(path, doctor)
    assert load_dialect(tmp_path / "run", url) == doctor
    run = Dialect(poll_mode=PollMode.BATCHED, source="run")
    save_dialect(tmp_path / "run" / DIALECT_NAME, run)
    assert load_dialect(tmp_path / "run", url) == run
    assert doctor.processing_proves_acceptance
    assert not run.processing_proves_acceptance
    (tmp_path / "run" / DIALECT_NAME).write_text("{not json")
    assert load_dialect(tmp_path / "run", url) == doctor


def test_cache_path_without_override(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"XDG_CACHE_HOME": "/x/cache"}
    got = cache_path("https://api.runware.ai/v1", env)
    assert got == Path("/x/cache/remix/dialects/api.runware.ai.json")
