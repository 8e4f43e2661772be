"""Each task's fingerprint, kept in the run dir: what a resume compares the manifest by.

A run dir belongs to a job's *tasks*, not to its manifest's bytes: a comment or a
reformatted table changes nothing, a new reference row only adds tasks, and a changed
parameter changes exactly the tasks it reaches. ``RUN_DIR/task_fingerprints.txt`` holds
one line per task, ``<fingerprint> <+|-> <key as JSON>`` (``-``: the task left the
manifest and its results were kept). A 100k-task job is a few MB on disk and is compared
in one streaming pass: only the stored fingerprints are held (16 bytes each), and the
new file is written as the manifest's tasks go by, committed only once accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pipeline.errors import ConfigError, StorageError

PRINTS_NAME: Final = "task_fingerprints.txt"
_HEADER: Final = "# remix task fingerprints v1: <fingerprint> <+|-> <key>\n"
_ACTIVE: Final = "+"
_KEPT: Final = "-"
"""A task no longer in the manifest whose results stay in the run dir."""


@dataclass
class StoredPrints:
    """The fingerprints a run dir remembers."""

    prints: dict[str, bytes] = field(default_factory=dict)
    """key -> its fingerprint (16 bytes)."""
    kept: set[str] = field(default_factory=set)
    """Keys that left the manifest, their results kept (``--rerun-changed``)."""


def read_prints(run_dir: Path) -> StoredPrints | None:
    """The run dir's task fingerprints; None when it has none (new, or older remix).

    Raises:
        ConfigError: the file is unreadable or not ours.
    """
    path = run_dir / PRINTS_NAME
    stored = StoredPrints()
    try:
        with path.open(encoding="utf-8") as f:
            if f.readline() != _HEADER:
                raise ConfigError(f"{path}: not a remix task fingerprint file")
            for lineno, line in enumerate(f, 2):
                try:
                    key = json.loads(line[35:])
                    stored.prints[key] = bytes.fromhex(line[:32])
                except ValueError as exc:
                    raise ConfigError(f"{path}:{lineno}: unreadable: {exc}") from exc
                if line[33] == _KEPT:
                    stored.kept.add(key)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise ConfigError(f"{path}: unreadable task fingerprints: {exc}") from exc
    return stored


def _line(key: str, digest: bytes, mark: str) -> str:
    return f"{digest.hex()} {mark} {json.dumps(key)}\n"


@dataclass
class ManifestChanges:
    """How the manifest's tasks differ from the run dir's, and the new fingerprint
    file (written, not yet committed: nothing changes until the run accepts them)."""

    run_dir: Path
    added: int = 0
    """Tasks the run dir never had (or left unsent before)."""
    changed: dict[str, bytes] = field(default_factory=dict)
    """key -> new fingerprint, for the tasks whose wire parameters changed."""
    removed: dict[str, bytes] = field(default_factory=dict)
    """key -> stored fingerprint, for the tasks no longer in the manifest (not kept
    before)."""
    kept: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Tasks kept from earlier removals, still absent: they stay kept."""

    @property
    def part(self) -> Path:
        return self.run_dir / (PRINTS_NAME + ".part")

    def commit(self, keep: Iterable[str] = ()) -> None:
        """Make the new fingerprints the run dir's, with ``keep`` (removed keys whose
        results stay) marked kept. Atomic: a crash leaves the old file.

        Raises:
            StorageError: the file cannot be written.
        """
        path = self.run_dir / PRINTS_NAME
        try:
            with self.part.open("a", encoding="utf-8") as f:
                for key, digest in self.kept.items():
                    f.write(_line(key, digest, _KEPT))
                for key in keep:
                    f.write(_line(key, self.removed[key], _KEPT))
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.part, path)
        except OSError as exc:
            msg = f"{path}: cannot write task fingerprints: {exc}"
            raise StorageError(msg) from exc

    def discard(self) -> None:
        """Drop the new fingerprints (the run was refused)."""
        self.part.unlink(missing_ok=True)


def compare_prints(
    run_dir: Path, stored: StoredPrints | None, prints: Iterable[tuple[str, bytes]]
) -> ManifestChanges:
    """Stream the manifest's ``(key, fingerprint)`` pairs against ``stored``, writing
    the new fingerprint file beside the old one (see :meth:`ManifestChanges.commit`).

    Raises:
        StorageError: the new file cannot be written.
    """
    old = {} if stored is None else stored.prints
    kept = set() if stored is None else stored.kept
    changes = ManifestChanges(run_dir)
    try:
        with changes.part.open("w", encoding="utf-8") as f:
            f.write(_HEADER)
            for key, digest in prints:
                before = old.pop(key, None)
                if before is None:
                    changes.added += 1
                elif before != digest:
                    changes.changed[key] = digest
                f.write(_line(key, digest, _ACTIVE))
    except OSError as exc:
        changes.discard()
        msg = f"{changes.part}: cannot write task fingerprints: {exc}"
        raise StorageError(msg) from exc
    for key, digest in old.items():
        if key in kept:
            changes.kept[key] = digest
        else:
            changes.removed[key] = digest
    return changes
