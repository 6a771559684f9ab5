"""Durations (``"1h 30m"``) and :class:`interval`: a fixed period from an anchor, with no drift."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from .schedule_interface import _UTC, EPOCH, InvalidScheduleError, Schedule, _require_aware

_DURATION_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)"
_DURATION_RE = re.compile(rf"\s*(?:{_DURATION_PART}\s*)+", re.IGNORECASE)
_DURATION_PART_RE = re.compile(_DURATION_PART, re.IGNORECASE)
_NUMBER_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``"30s"``, ``"5m"``, ``"1h"``, ``"1h30m"``, ``"1.5d"`` or ``"250ms"``.

    Units: ``ms``, ``s``, ``m``, ``h``, ``d``, ``w`` (case-insensitive). A bare number (``"30"``) is seconds.
    Raises :class:`InvalidScheduleError` for anything else, including negative values.
    """
    if not isinstance(text, str):
        raise InvalidScheduleError(f"duration must be a string, got {type(text).__name__}: {text!r}")
    bare = _NUMBER_RE.fullmatch(text)
    if not bare and not _DURATION_RE.fullmatch(text):
        raise InvalidScheduleError(
            f"invalid duration {text!r}: expected a number of seconds or e.g. '30s', '5m', '1h30m'"
        )
    try:
        if bare:
            return timedelta(seconds=float(bare.group(1)))
        total = timedelta()
        for match in _DURATION_PART_RE.finditer(text):
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        return total
    except OverflowError as exc:
        raise InvalidScheduleError(f"duration {text!r} is too large") from exc


def format_duration(value: timedelta) -> str:
    """Format a timedelta compactly, the inverse of :func:`parse_duration`: ``90s`` → ``"1m30s"``."""
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    parts = []
    for unit, size in (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000)):
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    if micros or not parts:
        seconds = f"{micros / 1_000_000:.6f}".rstrip("0").rstrip(".")
        parts.append(f"{seconds}s")
    return sign + "".join(parts)


def _to_timedelta(every: timedelta | float) -> timedelta:
    if isinstance(every, bool) or not isinstance(every, (timedelta, int, float)):
        raise InvalidScheduleError(
            f"interval every must be a timedelta or a number of seconds, got {type(every).__name__}: {every!r}"
        )
    if isinstance(every, timedelta):
        period = every
    else:
        if not math.isfinite(every) or every <= 0:
            raise InvalidScheduleError(f"interval every must be > 0 seconds, got {every!r}")
        try:
            period = timedelta(seconds=every)
        except OverflowError as exc:
            raise InvalidScheduleError(f"interval every {every!r} seconds is too large") from exc
    if period <= timedelta(0):
        raise InvalidScheduleError(f"interval every must be > 0, got {every!r} ({format_duration(period)})")
    return period


class interval(Schedule):  # lowercase, like Celery's schedule classes
    """Fire every ``every`` (a timedelta or a number of seconds), at ``anchor + k * every`` for k = 0, 1, 2…

    Fire times are computed from the anchor, never from when the previous run happened, so they do not
    drift. The default anchor is the Unix epoch, so every beat process (and every restart) agrees on the
    fire times without coordination: ``interval(3600)`` fires on the hour in UTC. An anchor in the future
    delays the first fire time to the anchor itself. ``every`` must be positive.
    """

    def __init__(self, every: timedelta | float, *, anchor: datetime | None = None) -> None:
        self._every = _to_timedelta(every)
        if anchor is None:
            self._anchor = EPOCH
        else:
            self._anchor = _require_aware(anchor, "interval anchor").astimezone(_UTC)

    @property
    def every(self) -> timedelta:
        """The period."""
        return self._every

    @property
    def anchor(self) -> datetime:
        """The moment, in UTC, from which fire times are counted."""
        return self._anchor

    def next_after(self, moment: datetime) -> datetime:
        """Return the first ``anchor + k * every`` (k >= 0) strictly after ``moment``, in UTC."""
        moment = _require_aware(moment, "moment").astimezone(_UTC)
        if moment < self._anchor:
            return self._anchor
        periods = (moment - self._anchor) // self._every  # exact integer arithmetic on microseconds
        return self._anchor + (periods + 1) * self._every

    def describe(self) -> str:
        """Describe as ``every 30s``, adding the anchor when it is not the epoch."""
        text = f"every {format_duration(self._every)}"
        if self._anchor != EPOCH:
            text += f" from {self._anchor.isoformat()}"
        return text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, interval):
            return NotImplemented
        return (self._every, self._anchor) == (other._every, other._anchor)

    def __hash__(self) -> int:
        return hash((interval, self._every, self._anchor))
