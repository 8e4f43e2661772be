"""One shard of a job: which task keys it runs, and how it is written (``I/N``).

A task key's shard comes from sha256 of the key, so it is the same on every machine
and every run, whatever the order the manifest lists its tasks in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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

    def contains(self, key: str) -> bool:
        return shard_index(key, self.count) == self.index

    def __str__(self) -> str:
        return self.label
