"""The run's accounts: the one writer of the run's summary, its budget and its
progress bar while it runs, and the keeper of which tasks are still open.

Why a room of its own: the stages only say what happened (an image stored, a task
failed, a submit sent); what that means for the counters, the money and the end of
the run is decided here, once. Every task that enters the run gets exactly one
ending (done, failed, unfinished, unsubmitted or lost), and the run is over when
feeding is over and no task is open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from decimal import Decimal

import anyio

from pipeline.expand import TaskSpec
from pipeline.flow import SlotGate
from pipeline.limits import Budget
from pipeline.progress import Progress
from pipeline.records import Flight, Prepared, RunSummary, Stored
from pipeline.wire import ErrorItem

log = logging.getLogger(__name__)


class Accounts:
    """Counts, money and endings of one run; the stages call it, never the summary.

    A task is open from ``entered`` (or ``resumed``) to its one ending, under its
    taskUUID (``replaced`` moves it to a new one). Ending a task that is not open
    is a bug and raises ``AssertionError``.
    """

    def __init__(
        self,
        summary: RunSummary,
        *,
        budget: Budget,
        progress: Progress,
        gate: SlotGate,
        forget: Callable[[Flight], None],
        list_price: Callable[[TaskSpec], Decimal],
        concurrency: int,
    ) -> None:
        self.summary = summary
        self._budget = budget
        self._progress = progress
        self._gate = gate
        self._forget = forget
        """Stops the questions about a task (the poller's)."""
        self._list_price = list_price
        self._max_price_seen = Decimal(0)
        self._open: dict[str, int] = {}
        """Open tasks by taskUUID (a count: a resumed journal may name one twice)."""
        self._feeding = True
        self._admitting = True
        self.all_ended = anyio.Event()
        """Set once feeding is over and every task that entered has its ending."""
        summary.adaptive_floor = concurrency

    # ------------------------------------------------------------ the run

    def start(self) -> None:
        self._progress.start(self.summary.images_total, self.summary.images_done)

    @property
    def feeding(self) -> bool:
        """Whether tasks may still enter."""
        return self._feeding

    def feeding_over(self) -> None:
        """No task enters from now on (the feeder is done, or stopped)."""
        self._feeding = False
        self._check_ended()

    def entered(self, task_uuid: str) -> None:
        """A new task enters the run (prepared, on its way to the journaler)."""
        self._open[task_uuid] = self._open.get(task_uuid, 0) + 1

    def resumed(self, flight: Flight) -> None:
        """A task an earlier run sent is taken over: asked about before anything.

        Its price is reserved first, past the cap if need be: it is paid when it
        finishes, so new tasks may only spend what is left beside it.
        """
        self.entered(flight.task_uuid)
        self.summary.resumed += 1
        flight.reserved_per_image = self.price_per_image(flight.spec)
        self._budget.commit(
            flight.reserved_per_image * (flight.spec.images - flight.stored)
        )

    def replaced(self, flight: Flight, prepared: Prepared) -> None:
        """``flight``'s task goes on under ``prepared``'s new taskUUID (no ending)."""
        self._close(flight.task_uuid)
        self.entered(prepared.task_uuid)

    def stop(self, reason: str, message: str | None = None, *, first: bool) -> bool:
        """Record why the run stops; ``first``: only if no reason is recorded yet.
        Returns whether it was recorded."""
        if first and self.summary.stop_reason is not None:
            return False
        self.summary.stop_reason = reason
        self.summary.stop_message = message
        return True

    def run_over(self, *, wall_s: float, latency_s: float | None, uploads: int) -> None:
        """The run is over: what is still open was sent and not finished (a rerun
        asks about it)."""
        summary = self.summary
        summary.wall_s = wall_s
        summary.max_in_flight = self._gate.peak
        summary.latency_s = latency_s
        summary.uploads = uploads
        summary.tasks_unfinished += sum(self._open.values())
        self._open.clear()
        self._progress.close()

    # ------------------------------------------------------------ money

    def price_per_image(self, spec: TaskSpec) -> Decimal:
        """What to reserve per image: the list price, or the most the API charged."""
        return max(self._list_price(spec), self._max_price_seen)

    @property
    def admitting(self) -> bool:
        """Whether new tasks may still be sent: False once one did not fit the
        budget (what was reserved still goes out)."""
        return self._admitting

    def reserve(self, spec: TaskSpec) -> Decimal | None:
        """Reserve ``spec``'s estimate; returns the price per image reserved, or
        None if it does not fit under the budget (the run then stops admitting)."""
        per_image = self.price_per_image(spec)
        price = per_image * spec.images
        if self._budget.try_reserve(price):
            return per_image
        if self._admitting:
            self._admitting = False
            self._out_of_budget(price)
        return None

    def _out_of_budget(self, price: Decimal) -> None:
        budget = self._budget
        self.summary.budget_next_usd = price
        message = (
            f"budget ${budget.cap_usd} reached: ${budget.remaining_usd} of it is "
            f"left and the next task costs ${price}; raise --budget to continue"
        )
        if self.stop("budget", message, first=True):
            log.warning("%s (the tasks it covers are still sent)", message)

    @property
    def spent_usd(self) -> Decimal:
        return self._budget.spent_usd

    # ------------------------------------------------------------ requests

    def concurrency_now(self, limit: int) -> None:
        """The adaptive limit as a submitter saw it (its floor is reported)."""
        self.summary.adaptive_floor = min(self.summary.adaptive_floor, limit)

    def submit_sent(self, flights: list[Flight]) -> None:
        """One submit request for ``flights`` leaves."""
        resent = sum(f.resend for f in flights)
        summary = self.summary
        summary.submitted += len(flights) - resent
        summary.resent += resent
        summary.resubmitted += sum(1 for f in flights if f.replaces)
        summary.submit_requests += 1

    def poll_sent(self) -> None:
        """One getResponse request leaves."""
        self.summary.poll_requests += 1

    # ------------------------------------------------------------ a task's life

    def free_slot(self, flight: Flight) -> None:
        """The API is done with ``flight`` (or does not hold it): its slot is free."""
        if flight.holds_slot:
            flight.holds_slot = False
            self._gate.release(1)

    def retire(self, flight: Flight) -> None:
        """This taskUUID needs no more questions, no slot and no reservation (its
        task's ending, if any, is recorded separately)."""
        if flight.finished:
            return
        self._forget(flight)
        flight.finished = True
        self.free_slot(flight)
        self._budget.release(
            flight.reserved_per_image * (flight.spec.images - flight.stored)
        )

    def stored(self, item: Stored) -> bool:
        """One image is stored (and journaled); returns whether its task is done."""
        flight, result = item.flight, item.result
        summary = self.summary
        cost = result.cost
        if cost is None:
            summary.missing_cost_images += 1
            cost = flight.reserved_per_image
        else:
            self._max_price_seen = max(self._max_price_seen, cost)
            summary.spent_usd += cost
            summary.spent_this_run_usd += cost
        if not flight.finished:
            self._budget.settle(flight.reserved_per_image, cost)
        flight.stored += 1
        summary.images_done += 1
        summary.images_new += 1
        if flight.stored < flight.spec.images or flight.finished:
            return False
        flight.finished = True
        self.free_slot(flight)
        summary.tasks_done += 1
        self._close(flight.task_uuid)
        return True

    def failed(self, flight: Flight, error: ErrorItem) -> None:
        """Ending: the API failed the task (its ``failed`` line is journaled)."""
        self.retire(flight)
        self.summary.tasks_failed += 1
        self.summary.failures.append((flight.spec.key, error.code, error.message))
        self._close(flight.task_uuid)
        self.report_progress()

    def left_for_rerun(self, flight: Flight) -> None:
        """Ending: unfinished here (deadline, download, a stop); the journal keeps
        it pending, so a rerun asks about it instead of paying for it again."""
        self.retire(flight)
        self.summary.tasks_unfinished += 1
        self._close(flight.task_uuid)

    def unsent(self, items: Iterable[Prepared | Flight]) -> None:
        """Ending: never submitted (a stop); a rerun submits them."""
        for item in items:
            if isinstance(item, Flight):
                self.retire(item)
            self.summary.tasks_unsubmitted += 1
            self._close(item.task_uuid)

    def lost(self, flight: Flight) -> None:
        """Ending: refused outright for credit; a rerun submits it afresh."""
        self.retire(flight)
        self.summary.tasks_unsubmitted += 1
        self.summary.lost += 1
        self._close(flight.task_uuid)

    def report_progress(self) -> None:
        self._progress.update(
            done=self.summary.images_done,
            failed=self.summary.tasks_failed,
            in_flight=self._gate.in_flight,
            spent_usd=self.summary.spent_usd,
        )

    def _close(self, task_uuid: str) -> None:
        count = self._open.get(task_uuid, 0)
        assert count > 0, f"task {task_uuid} ended twice (or never entered)"
        if count == 1:
            del self._open[task_uuid]
        else:
            self._open[task_uuid] = count - 1
        self._check_ended()

    def _check_ended(self) -> None:
        if not self._feeding and not self._open:
            self.all_ended.set()
