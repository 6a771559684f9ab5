""":class:`crontab`: cron fields evaluated in a time zone, correct across daylight-saving changes."""

from __future__ import annotations

import calendar
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from datetime import date, datetime, time, tzinfo
from typing import TypeAlias

from .schedule_interface import (
    _UTC,
    InvalidScheduleError,
    Schedule,
    _require_aware,
    _tz_name,
    resolve_tz,
)

_DAY_NAMES = {
    name: number
    for number, names in enumerate(
        [
            ("sun", "sunday"),
            ("mon", "monday"),
            ("tue", "tues", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thur", "thurs", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
        ]
    )
    for name in names
}
_MONTH_NAMES = {
    name: number
    for number in range(1, 13)
    for name in (calendar.month_abbr[number].lower(), calendar.month_name[number].lower())
}
_MONTH_NAMES["sept"] = 9

# The Gregorian calendar repeats every 400 years, so a date pattern that has no match in 401 years
# never matches.
_CALENDAR_CYCLE_YEARS = 401


class _Field:
    """The range and names of one cron field."""

    def __init__(self, name: str, low: int, high: int, names: dict[str, int] | None = None) -> None:
        self.name = name
        self.low = low
        self.high = high  # inclusive; 7 for day_of_week, folded to 0 after parsing
        self.names = names or {}

    def error(self, token: object, problem: str, whole: object = None) -> InvalidScheduleError:
        text = f"crontab {self.name}: {token!r} {problem}"
        if whole is not None and whole != token:
            text += f" (in {whole!r})"
        return InvalidScheduleError(text)

    def number(self, token: str, whole: str) -> int:
        token = token.strip()
        if token in self.names:
            return self.names[token]
        if not token.isdigit():
            raise self.error(token, f"is not a number{self._name_hint()}", whole)
        value = int(token)
        if not self.low <= value <= self.high:
            raise self.error(token, f"out of range {self.low}-{self.high}", whole)
        return value

    def _name_hint(self) -> str:
        if self.names:
            return " or a name such as " + ", ".join(repr(n) for n in list(self.names)[:2])
        return ""

    def expand_range(self, first: int, last: int) -> list[int]:
        if first <= last:
            return list(range(first, last + 1))
        # Wrap around like Celery: 22-2 for hours is 22, 23, 0, 1, 2.
        return list(range(first, self.high + 1)) + list(range(self.low, last + 1))

    def parse_part(self, part: str, whole: str) -> list[int]:
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.strip().isdigit() or int(step_text) < 1:
                raise self.error(part, "has an invalid step (must be an integer >= 1)", whole)
            step = int(step_text)
        base = base.strip()
        if base == "*":
            values = list(range(self.low, self.high + 1))
        elif "-" in base:
            first_text, _, last_text = base.partition("-")
            if not first_text.strip() or not last_text.strip():
                raise self.error(part, "is not a valid range", whole)
            values = self.expand_range(self.number(first_text, whole), self.number(last_text, whole))
        else:
            first = self.number(base, whole)
            # 'a/s' means from a to the end of the range in steps of s; plain 'a' is just a.
            values = list(range(first, self.high + 1)) if slash else [first]
        return values[::step]

    def parse(self, spec: object) -> frozenset[int]:
        if isinstance(spec, bool):
            raise self.error(spec, "is not a valid value (use an int, a string or an iterable of ints)")
        if isinstance(spec, int):
            values = [self.number(str(spec), str(spec))] if spec >= 0 else []
            if not values:
                raise self.error(spec, f"out of range {self.low}-{self.high}")
        elif isinstance(spec, str):
            values = self._parse_text(spec)
        elif isinstance(spec, Iterable):
            values = self._parse_iterable(spec)
        else:
            raise self.error(spec, "is not a valid value (use an int, a string or an iterable of ints)")
        return frozenset(0 if (self.high == 7 and v == 7) else v for v in values)

    def _parse_text(self, spec: str) -> list[int]:
        whole = spec.strip().lower()
        if not whole:
            raise self.error(spec, "is empty")
        values: list[int] = []
        for part in whole.split(","):
            if not part.strip():
                raise self.error(spec, "has an empty list item")
            values.extend(self.parse_part(part, whole))
        return values

    def _parse_iterable(self, spec: Iterable[object]) -> list[int]:
        values: list[int] = []
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise self.error(item, "is not an int or a string", spec)
            values.extend(self.parse(item))
        if not values:
            raise self.error(spec, "is empty")
        return values


_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DAY_OF_WEEK = _Field("day_of_week", 0, 7, _DAY_NAMES)
_DAY_OF_MONTH = _Field("day_of_month", 1, 31)
_MONTH_OF_YEAR = _Field("month_of_year", 1, 12, _MONTH_NAMES)

# Longest each month can be (February in a leap year), to reject patterns that can never match.
_MAX_MONTH_DAYS = {month: 29 if month == 2 else calendar.monthrange(2001, month)[1] for month in range(1, 13)}

#: What a crontab field accepts: a cron-syntax string, an int, or an iterable of ints (or strings).
CronField: TypeAlias = "str | int | Iterable[int | str]"

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _spec_text(spec: CronField) -> str:
    if isinstance(spec, (str, int)):
        return str(spec).strip()
    return ",".join(str(item) for item in spec)


def _first_occurrence_utc(wall: datetime, tz: tzinfo) -> datetime | None:
    """Map a naive wall-clock time in ``tz`` to UTC: None if the time does not exist there (DST gap),
    otherwise its first occurrence (``fold=0``) when the time is repeated (DST fall-back)."""
    instant = wall.replace(tzinfo=tz, fold=0).astimezone(_UTC)
    if instant.astimezone(tz).replace(tzinfo=None) != wall:
        return None
    return instant


class crontab(Schedule):  # lowercase, like Celery's crontab
    """Fire at the minutes matching cron-style fields, evaluated on the wall clock of time zone ``tz``.

    Each field accepts what Celery's ``crontab`` accepts: an int, an iterable of ints, or a string in
    cron syntax: ``*``, ``*/15``, ``a``, ``a-b``, ``a-b/s``, ``a/s`` (a to the end of the range in steps
    of s), and comma-separated lists of those (``1,5,10-12``). A range whose start is above its end wraps
    around (``hour="22-2"`` is 22, 23, 0, 1, 2). ``day_of_week`` takes 0-7 (0 and 7 are both Sunday) and
    names (``sun``..``sat``, ``sunday``..``saturday``, case-insensitive); ``month_of_year`` takes 1-12 and
    names (``jan``..``dec``, ``january``..``december``).

    **Day of month and day of week combine with AND, as in Celery** (and unlike Vixie cron, which fires
    when either matches when both are restricted): ``crontab(0, 0, day_of_month=13, day_of_week="fri")``
    fires only on Friday the 13th.

    ``tz`` is a tzinfo or an IANA zone name. When it is not given the schedule uses the default the
    caller supplies through :meth:`with_default_tz` (beat passes the app's timezone), and UTC if none.

    Daylight-saving changes, evaluated on the wall clock:

    * a wall-clock time skipped by a spring-forward gap does not fire that day (in Europe/Berlin,
      ``30 2 * * *`` does not fire on the last Sunday of March; it fires again at 02:30 the next day);
    * a wall-clock time repeated by a fall-back fires once, at its first occurrence (in Europe/Berlin,
      02:30 on the last Sunday of October fires at 02:30 CEST = 00:30 UTC, not again at 02:30 CET). This
      applies to every minute of the repeated hour, so ``*/15 * * * *`` pauses for that hour.

    A pattern that cannot match any date (``day_of_month=30, month_of_year=2``) is rejected.
    """

    def __init__(
        self,
        minute: CronField = "*",
        hour: CronField = "*",
        day_of_week: CronField = "*",
        day_of_month: CronField = "*",
        month_of_year: CronField = "*",
        *,
        tz: tzinfo | str | None = None,
    ) -> None:
        self.minute = _MINUTE.parse(minute)
        self.hour = _HOUR.parse(hour)
        self.day_of_week = _DAY_OF_WEEK.parse(day_of_week)
        self.day_of_month = _DAY_OF_MONTH.parse(day_of_month)
        self.month_of_year = _MONTH_OF_YEAR.parse(month_of_year)
        self._tz = resolve_tz(tz)
        self._texts = tuple(_spec_text(s) for s in (minute, hour, day_of_month, month_of_year, day_of_week))
        self._minutes = sorted(self.minute)
        self._hours = sorted(self.hour)
        self._doms = sorted(self.day_of_month)
        self._months = sorted(self.month_of_year)
        if not any(dom <= _MAX_MONTH_DAYS[m] for m in self._months for dom in self._doms):
            raise InvalidScheduleError(
                f"crontab day_of_month {self._texts[2]!r} never occurs in month_of_year {self._texts[3]!r}"
            )

    @classmethod
    def from_expression(cls, expression: str, tz: tzinfo | str | None = None) -> crontab:
        """Build from a 5-field crontab line, ``"minute hour day_of_month month day_of_week"``.

        Also accepts the aliases ``@yearly``, ``@annually``, ``@monthly``, ``@weekly``, ``@daily``,
        ``@midnight`` and ``@hourly``.
        """
        if not isinstance(expression, str):
            raise InvalidScheduleError(f"cron expression must be a string, got {expression!r}")
        text = _ALIASES.get(expression.strip().lower(), expression)
        fields = text.split()
        if len(fields) != 5:
            raise InvalidScheduleError(
                f"cron expression {expression!r} must have 5 fields "
                f"(minute hour day_of_month month day_of_week), got {len(fields)}"
            )
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        return cls(minute, hour, day_of_week, day_of_month, month_of_year, tz=tz)

    @property
    def tz(self) -> tzinfo | None:
        """The time zone given at construction, or None when the caller's default applies."""
        return self._tz

    @property
    def effective_tz(self) -> tzinfo:
        """The time zone the fields are evaluated in: :attr:`tz`, or UTC when none was given."""
        return self._tz if self._tz is not None else _UTC

    def with_default_tz(self, tz: tzinfo | str | None) -> crontab:
        """Return this schedule if it has its own time zone, otherwise a copy evaluated in ``tz``."""
        resolved = resolve_tz(tz)
        if self._tz is not None or resolved is None:
            return self
        copy = object.__new__(crontab)
        copy.__dict__.update(self.__dict__)
        copy._tz = resolved
        return copy

    def next_after(self, moment: datetime) -> datetime:
        """Return the first matching minute strictly after ``moment``, in UTC.

        Walks only the candidate dates (matching month, day of month and day of week) and, within them,
        the candidate hours and minutes, so the cost does not depend on how far away the next match is.
        """
        moment = _require_aware(moment, "moment").astimezone(_UTC)
        tz = self.effective_tz
        start = moment.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0)
        for day in self._dates_from(start.date()):
            for hour, minute in self._times_on(day, start):
                fire = _first_occurrence_utc(datetime.combine(day, time(hour, minute)), tz)
                # On an existing wall-clock time, fold=0 is the earliest instant, and wall-clock order is
                # UTC order over first occurrences, so the first candidate after moment is the answer.
                if fire is not None and fire > moment:
                    return fire
        raise InvalidScheduleError(f"{self.describe()} never fires after {moment.isoformat()}")

    def _dates_from(self, start: date) -> Iterator[date]:
        last_year = min(start.year + _CALENDAR_CYCLE_YEARS, datetime.max.year)
        for year in range(start.year, last_year + 1):
            for month in self._months:
                if (year, month) < (start.year, start.month):
                    continue
                yield from self._dates_in_month(year, month, start)

    def _dates_in_month(self, year: int, month: int, start: date) -> Iterator[date]:
        length = calendar.monthrange(year, month)[1]
        first_dom = start.day if (year, month) == (start.year, start.month) else 1
        for dom in self._doms[bisect_left(self._doms, first_dom) :]:
            if dom > length:
                return
            day = date(year, month, dom)
            if day.isoweekday() % 7 in self.day_of_week:
                yield day

    def _times_on(self, day: date, start: datetime) -> Iterator[tuple[int, int]]:
        same_day = day == start.date()
        hours = self._hours[bisect_left(self._hours, start.hour) :] if same_day else self._hours
        for hour in hours:
            from_minute = start.minute if same_day and hour == start.hour else 0
            for minute in self._minutes[bisect_left(self._minutes, from_minute) :]:
                yield hour, minute

    def expression(self) -> str:
        """The schedule as a 5-field crontab line (``minute hour day_of_month month day_of_week``)."""
        return " ".join(self._texts)

    def describe(self) -> str:
        """Describe as ``cron '0 3 * * sun' (Europe/Berlin)``."""
        zone = _tz_name(self._tz) if self._tz is not None else "UTC (default)"
        return f"cron {self.expression()!r} ({zone})"

    def _key(self) -> tuple[object, ...]:
        zone = _tz_name(self._tz) if self._tz is not None else None
        return (self.minute, self.hour, self.day_of_week, self.day_of_month, self.month_of_year, zone)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, crontab):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((crontab, *self._key()))
