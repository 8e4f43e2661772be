"""One shard of a job: which task keys it runs, and how it is written (``I/N``).

A task key's shard comes from sha256 of the key, so it is the same on every machine
and every run, whatever the order the manifest lists its tasks in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Final

ENV_K8S_INDEX: Final = "JOB_COMPLETION_INDEX"
"""Set by Kubernetes in each pod of an Indexed Job: its 0-based completion index."""
ENV_SLURM_ID: Final = "SLURM_ARRAY_TASK_ID"
"""Set by Slurm in each task of a job array: the array index."""
ENV_SLURM_MIN: Final = "SLURM_ARRAY_TASK_MIN"
"""Set by Slurm: the array's first index (``--array=1-4`` starts at 1)."""
BUDGET_STEP: Final = Decimal("0.000001")
"""A shard's share of the job's budget is rounded down to this: the shares never
add up to more than the budget."""


def shard_index(key: str, count: int) -> int:
    """The shard (of ``count``) that the task ``key`` belongs to."""
    if count < 1:
        raise ValueError(f"shards must be at least 1, not {count}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): ``Shard.parse("0/4")``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"a shard I/N needs 0 <= I < N, not {self.label}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` as written on the command line and in ``run.json``."""
        index, sep, count = text.strip().partition("/")
        try:
            if not sep:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError:
            raise ValueError(
                f"a shard is written I/N with 0 <= I < N, e.g. 0/4: {text!r}"
            ) from None

    @classmethod
    def resolve(cls, text: str, environ: Mapping[str, str]) -> Shard:
        """``I/N``, or ``auto/N`` with I from a scheduler's environment.

        ``auto`` reads Kubernetes' ``JOB_COMPLETION_INDEX`` (0-based), else Slurm's
        ``SLURM_ARRAY_TASK_ID`` less ``SLURM_ARRAY_TASK_MIN`` when that is set: one
        command line for every pod or array task.

        Raises:
            ValueError: malformed, neither variable set, or the index out of range.
        """
        index, sep, count = text.strip().partition("/")
        if index.strip().lower() != "auto":
            return cls.parse(text)
        try:
            n = int(count)
            if not sep or n < 1:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"auto is written auto/N with N the number of shards: {text!r}"
            ) from None
        if (k8s := environ.get(ENV_K8S_INDEX)) is not None:
            where, i = f"{ENV_K8S_INDEX}={k8s}", _env_int(ENV_K8S_INDEX, k8s)
            fix = f"the Indexed Job's completions must be {n}"
        elif (slurm := environ.get(ENV_SLURM_ID)) is not None:
            i = _env_int(ENV_SLURM_ID, slurm)
            where = f"{ENV_SLURM_ID}={slurm}"
            if (low := environ.get(ENV_SLURM_MIN)) is not None:
                i -= _env_int(ENV_SLURM_MIN, low)
                where += f" ({ENV_SLURM_MIN}={low})"
            fix = f"submit the array with --array=0-{n - 1}"
        else:
            raise ValueError(
                f"auto/{n} takes the shard index from {ENV_K8S_INDEX} (a Kubernetes "
                f"Indexed Job) or {ENV_SLURM_ID} (a Slurm job array), and neither "
                f"is set; outside those, write the shard as I/{n}"
            )
        if not 0 <= i < n:
            raise ValueError(
                f"{where} is shard {i}, not one of 0..{n - 1} of auto/{n}: {fix}"
            )
        return cls(i, n)

    @classmethod
    def read(cls, text: object) -> Shard | None:
        """The shard a run dir records, or None (no shard, or not readable)."""
        if not isinstance(text, str) or not text:
            return None
        try:
            return cls.parse(text)
        except ValueError:
            return None

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dir_suffix(self) -> str:
        """Appended to the job's name for the shard's default run dir."""
        return f"-shard{self.index}of{self.count}"

    def budget_share(self, budget_usd: Decimal) -> Decimal:
        """This shard's part of the job's budget: budget / N, rounded down, so N
        shards running at once never spend more than the job's cap."""
        share = (budget_usd / self.count).quantize(BUDGET_STEP, rounding=ROUND_DOWN)
        cents = share.quantize(Decimal("0.01"))
        return cents if cents == share else share.normalize()

    def contains(self, key: str) -> bool:
        return shard_index(key, self.count) == self.index

    def __str__(self) -> str:
        return self.label


def _env_int(name: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None


def missing_shards(shards: Sequence[Shard | None]) -> list[Shard]:
    """The shards of one job that ``shards`` (one per run dir) leave out.

    Several run dirs show as one job only when they are distinct shards of one N:
    counting a whole run beside a shard, or one shard twice, would count tasks twice.

    Raises:
        ValueError: a whole (unsharded) run among several, shards of different N, or
            the same shard twice.
    """
    if len(shards) == 1 and shards[0] is None:
        return []
    seen: set[int] = set()
    counts = {s.count for s in shards if s is not None}
    if any(s is None for s in shards):
        raise ValueError(
            "a run dir without --shard holds a whole job: show it alone, not with "
            "other run dirs"
        )
    if len(counts) > 1:
        raise ValueError(
            "these run dirs hold shards of different splits "
            f"({', '.join(f'N={n}' for n in sorted(counts))}): pass one job's shards"
        )
    for shard in shards:
        assert shard is not None
        if shard.index in seen:
            raise ValueError(f"shard {shard} is given twice: pass each shard once")
        seen.add(shard.index)
    (count,) = counts
    return [Shard(i, count) for i in range(count) if i not in seen]
