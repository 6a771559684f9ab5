"""When periodic tasks fire: the pure schedule arithmetic of ``amqtask beat``.

This module gathers the :class:`Schedule` interface (:mod:`~amqtask.beat.schedule_interface`) and its two
implementations, :class:`interval` (fixed period from an anchor, no drift; :mod:`~amqtask.beat.interval`)
and :class:`crontab` (cron fields evaluated in a time zone, correct across daylight-saving changes;
:mod:`~amqtask.beat.crontab`), and holds :func:`parse_schedule`, which with :func:`parse_duration` turns
the values found in ``beat_schedule`` and in schedule files into schedules. Nothing here talks to a broker, reads a
clock or sleeps: every answer is a function of the moment passed in, so all beat processes that share a
schedule agree on the fire times and the code is tested without waiting.

All datetimes taken must be timezone-aware; all datetimes returned are in UTC. Invalid input raises
:class:`InvalidScheduleError`, which is both a :class:`ValueError` and an
:class:`amqtask.errors.ConfigurationError`, with a message naming the field and the bad value.
"""

from __future__ import annotations

from datetime import timedelta, tzinfo

from .crontab import CronField, crontab
from .interval import format_duration, interval, parse_duration
from .schedule_interface import EPOCH, InvalidScheduleError, Schedule, resolve_tz

__all__ = [
    "EPOCH",
    "CronField",
    "InvalidScheduleError",
    "Schedule",
    "crontab",
    "format_duration",
    "interval",
    "parse_duration",
    "parse_schedule",
    "resolve_tz",
]


def parse_schedule(value: Schedule | timedelta | float | str, tz: tzinfo | str | None = None) -> Schedule:
    """Turn a ``beat_schedule`` value into a :class:`Schedule`.

    Accepts a :class:`Schedule` (a :class:`crontab` without its own time zone gets ``tz``), a
    ``timedelta`` or a number of seconds (an :class:`interval` anchored at the epoch), or a 5-field cron
    expression string such as ``"*/5 * * * *"`` (minute hour day_of_month month day_of_week, standard
    crontab order) evaluated in ``tz`` (UTC if None). Raises :class:`InvalidScheduleError` for invalid
    values and :class:`TypeError` for unsupported types.
    """
    if isinstance(value, crontab):
        return value.with_default_tz(tz)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return crontab.from_expression(value, tz=tz)
    if isinstance(value, bool) or not isinstance(value, (timedelta, int, float)):
        raise TypeError(
            "a schedule must be a Schedule, a timedelta, a number of seconds or a cron expression string, "
            f"got {type(value).__name__}: {value!r}"
        )
    return interval(value)
