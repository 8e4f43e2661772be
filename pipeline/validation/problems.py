"""Problem lines and the report that collects them (capped, counted)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, NamedTuple

from pipeline.errors import ManifestError
from pipeline.wire import DEFAULT_PRICE_USD

PROBLEM_LIMIT: Final = 200
"""Problems listed in a report; the rest are counted."""


class Problem(NamedTuple):
    """One problem; `file` overrides the manifest path (a CSV/JSONL line).

    Renders as ``FILE: WHERE: FIELD: message``, e.g. ``jobs/x.toml: variants[1]
    (id=deco): providerSettings.ideogram.remixStrenght: unknown parameter ...``.
    """

    where: str
    field: str
    message: str
    file: str | None = None

    def render(self, manifest_file: str) -> str:
        parts = [self.file or manifest_file, self.where, self.field, self.message]
        return ": ".join(p for p in parts if p)


class ProblemSink:
    """Collects problem lines up to a limit, counting the rest.

    It does not de-duplicate: each check runs once per thing it checks.
    """

    def __init__(self, file: str, limit: int) -> None:
        self.file = file
        self.limit = limit
        self.lines: list[str] = []
        self.count = 0

    def add(self, problem: Problem) -> None:
        self.count += 1
        if len(self.lines) < self.limit:
            self.lines.append(problem.render(self.file))

    def insert(self, at: int, problem: Problem) -> None:
        """Add ``problem`` as the ``at``-th line (one whose count is known only once
        every task was seen, listed where it belongs); the cap still holds."""
        self.count += 1
        if at < self.limit:
            self.lines.insert(at, problem.render(self.file))
            del self.lines[self.limit :]

    def listing(self) -> tuple[str, ...]:
        more = self.count - len(self.lines)
        return (*self.lines, f"... and {more} more") if more else tuple(self.lines)


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """Totals for the plan and every problem found (the listing is capped)."""

    tasks: int
    images: int
    images_by_speed: Mapping[str, int]
    """Images per renderingSpeed ("DEFAULT" when unset, as the API): prices differ."""
    local_files: int
    """Distinct local images that will be uploaded."""
    problems: tuple[str, ...]
    """At most `limit` problem lines, then "... and N more" when there are more."""
    problem_count: int

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def raise_for_problems(self) -> None:
        """Raises ManifestError with the listing when there is any problem."""
        if self.problems:
            raise ManifestError(list(self.problems))

    def estimated_cost_usd(
        self, price_per_image_usd: Mapping[str, Decimal] | None = None
    ) -> Decimal:
        """Images x price per rendering speed (the seed's price where none is given)."""
        prices = price_per_image_usd or {}
        return sum(
            (
                prices.get(speed, DEFAULT_PRICE_USD) * n
                for speed, n in self.images_by_speed.items()
            ),
            Decimal(0),
        )
