"""The latency estimate that times each task's first question, against a model API.

The model: a cohort of tasks is sent together (one submit), each done after the
latency times a random jitter; the engine asks about the whole cohort when the
estimate says, then again at a growing gap (LatencyEstimate.gap, at least 10 ms,
x1.5) until all are done; an answer arrives one round trip after the question. No
sockets and no clock: the estimate's arithmetic over hundreds of rounds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.latency import LatencyEstimate

STEP = LatencyEstimate.STEP


@dataclass
class Model:
    latency_s: float
    jitter: float = 0.0
    rtt_s: float = 0.005
    cohort: int = 8
    seed: int = 0


@dataclass
class Outcome:
    estimates: list[float]
    lags: list[float]
    """Per task: from done at the API to seen by the client."""
    questions: int


def simulate(model: Model, rounds: int, start_s: float | None = None) -> Outcome:
    rng = random.Random(model.seed)
    estimate = LatencyEstimate()
    if start_s is not None:  # as learnt from a (slow) task seen processing, then done
        estimate.observe(done_by=start_s, busy_at=start_s)
    out = Outcome(estimates=[], lags=[], questions=0)
    for _ in range(rounds):
        first = estimate.first_question()
        guess = first if first is not None else 0.5
        done_at = [
            model.latency_s * (1 + rng.uniform(-model.jitter, model.jitter))
            for _ in range(model.cohort)
        ]
        ask, gap = guess, estimate.gap(0.01) or max(0.01, 0.01 * guess)
        pending = list(range(model.cohort))
        busy_at: dict[int, float] = {}
        first = True
        while pending:
            out.questions += 1
            answer_at = ask + model.rtt_s
            still = [i for i in pending if ask + model.rtt_s / 2 < done_at[i]]
            if first:
                estimate.first_questions(all_done=not still, asked_after=ask)
                first = False
            for i in pending:  # as the engine: timed by when the question left
                if i in still:
                    busy_at[i] = ask
                else:
                    estimate.observe(done_by=ask, busy_at=busy_at.get(i))
                    out.lags.append(answer_at - done_at[i])
            pending = still
            ask += gap
            gap *= 1.5
        assert estimate.value is not None
        out.estimates.append(estimate.value)
    return out


@settings(max_examples=60, deadline=None)
@given(
    latency_s=st.floats(0.02, 60.0),
    jitter=st.floats(0.0, 0.3),
    rtt_share=st.floats(0.0, 0.02),
    cohort=st.integers(1, 64),
    start=st.one_of(st.none(), st.floats(0.3, 10.0)),
    seed=st.integers(0, 2**16),
)
def test_the_estimate_settles_near_the_latency_from_anywhere(
    latency_s: float,
    jitter: float,
    rtt_share: float,
    cohort: int,
    start: float | None,
    seed: int,
) -> None:
    model = Model(latency_s, jitter, rtt_share * latency_s, cohort, seed)
    out = simulate(model, 120, None if start is None else start * latency_s)
    final = out.estimates[-1]
    # answers resolve time to LatencyEstimate.STEP at best, whatever the latency
    assert 0.75 * latency_s - STEP <= final <= (1.1 + jitter) * latency_s + STEP
    recent = out.lags[-20 * cohort :]
    mean_lag = sum(recent) / len(recent)
    assert mean_lag <= (jitter + 0.06) * latency_s + 2 * model.rtt_s + 0.01


@pytest.mark.parametrize("latency_s", [0.02, 0.05, 0.2])
def test_an_api_much_faster_than_the_first_guess_is_found_in_a_few_rounds(
    latency_s: float,
) -> None:
    """Nothing known, the first question goes at 0.5 s and finds every task done:
    until one is found processing, each late verdict halves the estimate: 3 rounds
    to within 1.5x of a 50 ms latency, 5 of a 20 ms one (cuts of at most 10% took 20
    and 27 rounds)."""
    model = Model(latency_s=latency_s, rtt_s=0.002, cohort=8)
    out = simulate(model, 40)
    rounds = next(i for i, e in enumerate(out.estimates) if e <= 1.5 * latency_s)
    assert rounds <= 8
    assert all(0.75 * latency_s <= e <= 1.2 * latency_s for e in out.estimates[20:])


def test_a_slow_first_cohort_is_forgotten_within_rounds() -> None:
    """A first cohort 5x slower than the rest is forgotten within 20 rounds."""
    model = Model(latency_s=10.0, jitter=0.1, rtt_s=0.05, cohort=8)
    out = simulate(model, 20, start_s=50.0)
    assert out.estimates[-1] <= 1.5 * model.latency_s


def test_without_the_streak_cut_the_slow_start_lingers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the cut is for: samples alone leave the estimate far too late."""
    monkeypatch.setattr(LatencyEstimate, "LATE_CUT", 0.0)
    model = Model(latency_s=10.0, jitter=0.1, rtt_s=0.05, cohort=8)
    out = simulate(model, 20, start_s=50.0)
    assert out.estimates[-1] > 2 * model.latency_s


def test_a_good_estimate_is_left_alone() -> None:
    """At a steady latency, the estimate stays within a few percent and most
    cohorts are seen with one or two questions."""
    model = Model(latency_s=0.5, jitter=0.0, rtt_s=0.005, cohort=25)
    out = simulate(model, 300, start_s=0.5)
    assert all(0.45 <= e <= 0.53 for e in out.estimates[100:])
    assert out.questions / 300 <= 2.5


def _mean_lag(out: Outcome, last: int) -> float:
    recent = out.lags[-last:]
    return sum(recent) / len(recent)


def test_a_varying_latency_is_asked_about_before_the_middle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a +-20% latency, first questions lead by the spread: tasks done early in
    their submit wait much less than for a question timed at the middle."""
    model = Model(latency_s=10.0, jitter=0.2, rtt_s=0.05, cohort=8)
    with_lead = _mean_lag(simulate(model, 300), 800)
    monkeypatch.setattr(LatencyEstimate, "SPREAD_LEAD", 0.0)
    without = _mean_lag(simulate(model, 300), 800)
    assert with_lead <= 0.7 * without


def test_a_steady_latency_is_asked_about_at_the_estimate() -> None:
    """Tight samples (a steady API, re-asked 10 ms apart) give next to no lead."""
    estimate = LatencyEstimate()
    estimate.value = 0.5
    for i in range(200):
        estimate.observe(done_by=0.505 + 0.002 * (i % 3), busy_at=0.495)
    first = estimate.first_question()
    assert estimate.value is not None
    assert first is not None
    assert first >= 0.97 * estimate.value


@pytest.mark.parametrize("latency_s", [5.0, 30.0])
def test_a_steady_latency_of_seconds_is_timed_in_absolute_steps(
    latency_s: float,
) -> None:
    """Corrections are steps of the samples' spread, not shares of the latency: at
    5 s and 30 s a steady API's tasks are seen within a few round trips of done
    (shares of 5% and 1% of the latency meant 40 ms and 550 ms here)."""
    model = Model(latency_s=latency_s, jitter=0.0, rtt_s=0.02, cohort=64)
    out = simulate(model, 300, start_s=latency_s)
    assert _mean_lag(out, 100 * 64) <= model.rtt_s + 2 * LatencyEstimate.STEP
    assert out.questions / 300 <= 2.5
    assert all(abs(e - latency_s) <= 0.01 * latency_s for e in out.estimates[100:])
