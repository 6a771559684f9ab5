"""The :class:`Schedule` interface and what every schedule shares: aware datetimes, time zones, the error.

All datetimes taken must be timezone-aware; all datetimes returned are in UTC.
"""

from __future__ import annotations

import abc
from datetime import datetime, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from amqtask.errors import ConfigurationError

_UTC = timezone.utc

#: The default anchor of :class:`interval`: 1970-01-01T00:00:00Z.
EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


class InvalidScheduleError(ConfigurationError, ValueError):
    """A schedule, a cron field or a duration is invalid; the message names the field and the value."""


def _require_aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidScheduleError(f"{what} must be a datetime, got {type(value).__name__}: {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidScheduleError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value


def resolve_tz(tz: tzinfo | str | None) -> tzinfo | None:
    """Turn a time zone given as a ``tzinfo``, an IANA name (``"Europe/Berlin"``) or ``None`` into a tzinfo.

    ``None`` stays ``None`` (meaning "not given"); an unknown name raises :class:`InvalidScheduleError`.
    """
    if tz is None or isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        if tz.strip().upper() in ("UTC", "Z"):
            return _UTC
        try:
            return ZoneInfo(tz.strip())
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise InvalidScheduleError(f"unknown time zone {tz!r}") from exc
    raise InvalidScheduleError(f"time zone must be a tzinfo or a zone name, got {type(tz).__name__}: {tz!r}")


def _tz_name(tz: tzinfo) -> str:
    if isinstance(tz, ZoneInfo):
        return tz.key
    return str(tz)


class Schedule(abc.ABC):
    """When a periodic task fires.

    A schedule is a pure function from a moment to the next fire time; it holds no state about past
    runs, so any number of beat processes computing it agree without coordination.
    """

    @abc.abstractmethod
    def next_after(self, moment: datetime) -> datetime:
        """Return the first fire time strictly after ``moment`` (timezone-aware), as a UTC datetime."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Return a one-line human description, as shown by ``amqtask beat list``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"
