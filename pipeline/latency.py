"""The API's latency, learnt from finished tasks: when to first ask about a task and
how soon to ask again (the poller's clock)."""

from __future__ import annotations

from typing import Final


class LatencyEstimate:
    """When to first ask about a task: the API's latency, learnt from finished ones.

    A task that was still processing when asked, then done at the next question,
    finished between the two: a tight sample. One done at the first question
    finished at most then, maybe well before: its sample is a little earlier than
    that question, so an estimate that is too late keeps moving down until first
    questions start to meet unfinished tasks again (an estimate fed only "done by
    then" would ratchet later and later). Samples are absolute times, not
    corrections of the current estimate, so the large cohorts of one submit (all
    asked at once) cannot make it overshoot.
    """

    ALPHA: Final = 0.05
    """Weight of one sample in the running estimate."""
    STEP: Final = 0.01
    """The finest timing that answers can resolve (the engine's shortest re-ask gap by
    default), s. Corrections are steps of the spread of the tight samples, at least
    this: in absolute time, not in shares of the latency, so a slow API is timed as
    finely as a fast one (bench/README.md)."""
    LATE_STREAK: Final = 3
    LATE_CUT: Final = 0.1
    LATE_GROWTH: Final = 4.0
    """After LATE_STREAK questions in a row found every task they first asked about
    done, each further one cuts the estimate by a step that grows LATE_GROWTH-fold
    with the streak, at most LATE_CUT of it: samples alone bring a far too late
    estimate down slowly, and near the right value a streak ends at its first, small
    cuts (bench/README.md)."""
    SPREAD_LEAD: Final = 1.0
    """First questions go this many mean deviations before the estimate: when the
    latency varies, the tasks of one submit finish spread out, and those done early
    would otherwise wait for a question timed for the middle. The deviation comes
    from the tight samples only (a first-time "done" is biased early on purpose)."""
    GAP_SHARE: Final = 0.02
    GAP_SPREADS: Final = 2.0
    """Re-ask after "processing" within GAP_SPREADS deviations, at most GAP_SHARE of
    the latency: a steady API is re-asked at the finest step, a varying one less
    often (its tasks finish across a wide span anyway). 2%, the share a task's re-asks
    grow to (_REASK_AGE_SHARE): fewer requests at the same efficiency than a finer
    share (bench/README.md)."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.spread = 0.0
        """Mean deviation of the tight samples from the estimate."""
        self._late_streak = 0
        self._seen_busy = False
        """Whether any task was ever found processing. Until then every sample is
        "done by then" and the estimate only an upper bound: a late verdict halves
        it, so an API much faster than the first guess is found in a few rounds."""

    @property
    def step(self) -> float:
        """How far apart two timings must be to tell them apart, s."""
        return max(self.spread, self.STEP)

    def first_question(self) -> float | None:
        """How long after a submit to ask about its tasks first (None: no idea)."""
        if self.value is None:
            return None
        return max(0.5 * self.value, self.value - self.SPREAD_LEAD * self.spread)

    def gap(self, floor_s: float) -> float | None:
        """How long to wait before asking again about a task still processing."""
        if self.value is None:
            return None
        return max(
            floor_s, min(self.GAP_SHARE * self.value, self.GAP_SPREADS * self.spread)
        )

    def first_questions(self, *, all_done: bool, asked_after: float) -> bool:
        """One question's verdict on the tasks it asked about for the first time:
        all done already (it may have come late), or some still processing.
        Returns whether it cut the estimate: the caller then re-times the first
        questions not yet asked, so the cut is put to the test at once.

        ``asked_after``: the least time from a task's submit to this question. One
        asked later than the estimate now says (timed before a cut) tells nothing
        new, so cuts do not pile up while their effect is still on its way (a
        question comes a whole latency after its timing).
        """
        if not all_done:
            self._late_streak = 0
            self._seen_busy = True
            return False
        now_first = self.first_question()
        if now_first is not None and asked_after > now_first + self.STEP:
            return False
        if self.value is not None and not self._seen_busy:
            self.value = max(self.STEP, self.value / 2)
            return True
        self._late_streak += 1
        if self.value is None or self._late_streak < self.LATE_STREAK:
            return False
        growth = self.LATE_GROWTH ** min(self._late_streak - self.LATE_STREAK, 20)
        self.value -= min(self.LATE_CUT * self.value, self.step * growth)
        return True

    def observe(self, *, done_by: float, busy_at: float | None) -> None:
        """One finished task: seen done ``done_by`` seconds after it was sent, and
        last seen processing at ``busy_at`` (None: done at its first question)."""
        if busy_at is None:
            # Done by then, maybe long before: it can say "earlier", never "later".
            sample = max(0.5 * done_by, done_by - self.step)
            if self.value is not None:
                sample = min(sample, self.value)
        else:
            self._seen_busy = True
            sample = (busy_at + done_by) / 2
            if self.value is not None:
                deviation = abs(sample - self.value)
                self.spread += self.ALPHA * (deviation - self.spread)
        if self.value is None:
            self.value = sample
        else:
            self.value += self.ALPHA * (sample - self.value)
