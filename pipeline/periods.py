"""Calendar periods for cost reports: which day, ISO week or month an instant falls
in, in a chosen time zone, and the ``--since``/``--until`` date window.

Nightly runs straddle midnight, so where a day starts matters: it is cut in an IANA
zone (``zoneinfo``) or, by default, in the machine's local zone, each instant with
its own UTC offset (a DST change moves the cut, not the dates).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from pathlib import Path
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PeriodKind = Literal["day", "week", "month"]
PERIOD_KINDS: Final[tuple[PeriodKind, ...]] = ("day", "week", "month")


@dataclass(frozen=True)
class Zone:
    """Where days start: an IANA zone, or the machine's local zone (``tz`` None)."""

    name: str
    tz: tzinfo | None = None
    """None: the system's local rules, applied per instant (as ``astimezone()``)."""

    def local_date(self, at: datetime) -> date:
        """The calendar date of ``at`` in this zone."""
        return at.astimezone(self.tz).date()


def _local_zone_name() -> str:
    """A readable name for the machine's zone (TZ, /etc/localtime, or its abbrev)."""
    env = os.environ.get("TZ", "").lstrip(":")
    if env:
        return env
    try:
        target = Path("/etc/localtime").resolve(strict=True)
    except OSError:
        target = None
    if target is not None and "zoneinfo" in target.parts:
        parts = target.parts
        return "/".join(parts[len(parts) - parts[::-1].index("zoneinfo") :])
    return time.tzname[0] or "local"


def resolve_zone(name: str | None) -> Zone:
    """The zone named ``name`` (IANA, e.g. ``Europe/Berlin``); None: the local zone.

    Raises:
        ValueError: an unknown zone name.
    """
    if name is None or name.strip().lower() in ("", "local"):
        return Zone(_local_zone_name())
    try:
        return Zone(name.strip(), ZoneInfo(name.strip()))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin, "
            "America/New_York or UTC"
        ) from None


def period_label(day: date, kind: PeriodKind) -> str:
    """``2026-12-05``, ISO week ``2026-W49`` or month ``2026-12`` for ``day``."""
    if kind == "day":
        return day.isoformat()
    if kind == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{day.year:04d}-{day.month:02d}"


def parse_date(text: str) -> date:
    """A ``YYYY-MM-DD`` date.

    Raises:
        ValueError: anything else, saying the expected form.
    """
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


@dataclass(frozen=True)
class Window:
    """``--since``/``--until``: calendar dates in the report's zone, both inclusive
    (``--until 2026-12-05`` keeps everything up to that day's end)."""

    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"--since {self.since} is after --until {self.until}")

    @property
    def open(self) -> bool:
        """True when nothing is cut off."""
        return self.since is None and self.until is None

    def contains(self, day: date | None) -> bool:
        """Whether ``day`` is inside; an unknown day only when the window is open."""
        if day is None:
            return self.open
        if self.since is not None and day < self.since:
            return False
        return self.until is None or day <= self.until


OPEN_WINDOW: Final = Window()
"""No ``--since``, no ``--until``."""
