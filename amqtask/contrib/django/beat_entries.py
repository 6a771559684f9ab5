"""django-celery-beat's rows as beat entries: one ``PeriodicTask`` (with its schedule row) to one :class:`Entry`.

What each column becomes:

* ``interval`` (every N days/hours/minutes/seconds/microseconds): an :class:`~amqtask.beat.schedules.interval`
  anchored at ``start_time`` when there is one, else at the epoch. Fire times are fixed points (every
  beat agrees on them, no drift), not "N after the last run" as in Celery; the period is the same.
* ``crontab``: a :class:`~amqtask.beat.schedules.crontab` evaluated in the row's ``timezone``.
* ``clocked`` (one_off at a moment): fires once at ``clocked_time``.
* ``solar``: not supported; :class:`UnsupportedScheduleError` names the row (beat logs it and leaves the
  row out, the other rows run).
* ``start_time`` / ``expires``: no slot before the first or after the second.
* ``one_off``: the entry is dropped once ``total_run_count`` is above 0 (beat disables the row after
  its run, as django-celery-beat does).
* ``args``/``kwargs``/``headers`` (JSON text), ``queue``, ``exchange``, ``routing_key``, ``priority``:
  the message's, as in Celery; ``expire_seconds`` (or ``expires``) becomes the message's ``expires``
  and the ``periodic_task_name`` header names the row, as Celery's scheduler sets it.

Datetimes stored naive (``USE_TZ = False``) are read in Django's ``TIME_ZONE``, as Django itself
does. Nothing here touches the database: the caller passes rows already read (with their schedule rows).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from django.utils import timezone as django_timezone

from ...beat.entries import Entry, make_entry
from ...beat.schedules import Schedule, crontab, interval
from ...errors import ConfigurationError

__all__ = ["WHERE", "Once", "UnsupportedScheduleError", "Window", "entry_from_row"]

#: How errors and logs name the rows' origin.
WHERE = "django-celery-beat"
# The "next fire" of a schedule that has no more: far enough for any beat, near enough to format in
# every time zone (datetime.max cannot be moved east of UTC).
_NEVER = datetime(9000, 1, 1, tzinfo=timezone.utc)


class UnsupportedScheduleError(ConfigurationError):
    """A django-celery-beat row uses a schedule amqtask beat does not run (solar), or none at all."""


class Window(Schedule):
    """``inner``'s fire times from ``start`` (inclusive) to ``end`` (inclusive); either may be None."""

    def __init__(self, inner: Schedule, start: datetime | None = None, end: datetime | None = None) -> None:
        self.inner, self.start, self.end = inner, start, end

    def next_after(self, moment: datetime) -> datetime:
        """The inner schedule's next fire after ``moment``, not before ``start``, never after ``end``."""
        if self.start is not None and moment < self.start:
            moment = self.start - timedelta(microseconds=1)
        following = self.inner.next_after(moment)
        return _NEVER if self.end is not None and following > self.end else following

    def describe(self) -> str:
        """The inner description, with its bounds."""
        text = self.inner.describe()
        if self.start is not None:
            text += f" from {self.start.astimezone(timezone.utc).isoformat()}"
        if self.end is not None:
            text += f" until {self.end.astimezone(timezone.utc).isoformat()}"
        return text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return (self.inner, self.start, self.end) == (other.inner, other.start, other.end)

    def __hash__(self) -> int:
        return hash((Window, self.inner, self.start, self.end))


class Once(Schedule):
    """A single fire time (django-celery-beat's clocked schedule); a time already past when beat
    first reads the row is not sent (as for any new entry, the first slot is after that moment)."""

    def __init__(self, at: datetime) -> None:
        self.at = at.astimezone(timezone.utc)

    def next_after(self, moment: datetime) -> datetime:
        """``at`` if it is after ``moment``, else never."""
        return self.at if moment < self.at else _NEVER

    def describe(self) -> str:
        """Describe as ``once at <UTC time>``."""
        return f"once at {self.at.isoformat()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Once) and self.at == other.at

    def __hash__(self) -> int:
        return hash((Once, self.at))


def entry_from_row(row: Any) -> Entry | None:
    """The entry of an enabled ``PeriodicTask`` row, or None when it has nothing left to send.

    Raises :class:`~amqtask.errors.ConfigurationError` naming the row for a solar schedule, bad JSON or
    a bad value; the caller leaves such a row out.
    """
    prefix = f"{WHERE} periodic task {row.name!r}"
    if row.one_off and row.total_run_count > 0:
        return None
    options: dict[str, Any] = {
        key: value
        for key in ("queue", "exchange", "routing_key", "priority")
        if (value := getattr(row, key)) is not None and value != ""
    }
    expires = row.expire_seconds or (_aware(row.expires) if row.expires else None)
    if expires:
        options["expires"] = expires
    options["headers"] = {**_json(row.headers, dict, prefix, "headers"), "periodic_task_name": row.name}
    return make_entry(
        row.name, row.task, _schedule(row, prefix),
        args=_json(row.args, list, prefix, "args"), kwargs=_json(row.kwargs, dict, prefix, "kwargs"),
        options=options, where=WHERE,
    )  # fmt: skip


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        return moment
    aware: datetime = django_timezone.make_aware(moment)
    return aware


def _schedule(row: Any, prefix: str) -> Schedule:
    start = _aware(row.start_time) if row.start_time else None
    end = _aware(row.expires) if row.expires else None
    if row.interval is not None:
        period = timedelta(**{row.interval.period: row.interval.every})
        inner: Schedule = interval(period, anchor=start) if start else interval(period)
        return Window(inner, end=end) if end else inner
    if row.crontab is not None:
        cron = row.crontab
        # By name: older django-timezone-field versions give pytz zones, which datetime cannot use directly.
        inner = crontab(
            cron.minute, cron.hour, cron.day_of_week, cron.day_of_month, cron.month_of_year, tz=str(cron.timezone)
        )
    elif row.clocked is not None:
        inner = Once(_aware(row.clocked.clocked_time))
    elif row.solar is not None:
        raise UnsupportedScheduleError(
            f"{prefix}: solar schedules (sunrise, sunset, ...) are not supported by amqtask beat; "
            "use a crontab in the place's time zone"
        )
    else:
        raise UnsupportedScheduleError(f"{prefix}: no schedule (interval, crontab or clocked) is set")
    return Window(inner, start, end) if start or end else inner


def _json(text: str | None, kind: type, prefix: str, column: str) -> Any:
    try:
        value = json.loads(text) if text else kind()
    except ValueError as exc:
        raise ConfigurationError(f"{prefix}: {column} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ConfigurationError(f"{prefix}: {column} must be a JSON {kind.__name__}, got {text!r}")
    return value
