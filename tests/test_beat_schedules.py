"""Tests of amqtask.beat.schedules: intervals, crontab parsing and next-fire arithmetic, DST, coercion."""

from __future__ import annotations

import functools
from datetime import date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from amqtask.beat.schedules import (
    EPOCH,
    InvalidScheduleError,
    Schedule,
    crontab,
    format_duration,
    interval,
    parse_duration,
    parse_schedule,
)
from amqtask.errors import ConfigurationError

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold)


def fire_times(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    times = []
    moment = start
    for _ in range(count):
        moment = schedule.next_after(moment)
        times.append(moment)
    return times


# --- interval


class TestInterval:
    def test_default_anchor_is_the_epoch(self) -> None:
        every_hour = interval(3600)
        assert every_hour.anchor == EPOCH
        assert every_hour.next_after(utc(2025, 5, 17, 10, 42, 13)) == utc(2025, 5, 17, 11)

    def test_fires_at_anchor_plus_multiples(self) -> None:
        sched = interval(timedelta(minutes=7), anchor=utc(2025, 1, 1, 0, 3))
        assert sched.next_after(utc(2025, 1, 1, 0, 3)) == utc(2025, 1, 1, 0, 10)  # strictly after
        assert sched.next_after(utc(2025, 1, 1, 0, 9, 59, 999999)) == utc(2025, 1, 1, 0, 10)
        # 2025-01-02 00:00 is 1437 minutes after the anchor; 1437 = 7 * 205 + 2, so the next is 205+1 periods.
        assert sched.next_after(utc(2025, 1, 2)) == utc(2025, 1, 1, 0, 3) + 206 * timedelta(minutes=7)

    def test_no_drift_however_late_the_last_run(self) -> None:
        sched = interval(30, anchor=utc(2025, 1, 1))
        # A run that finished 29.9 s late does not shift the next fire time.
        assert sched.next_after(utc(2025, 1, 1, 0, 0, 59, 900000)) == utc(2025, 1, 1, 0, 1)
        assert fire_times(sched, utc(2025, 1, 1), 3) == [
            utc(2025, 1, 1, 0, 0, 30),
            utc(2025, 1, 1, 0, 1),
            utc(2025, 1, 1, 0, 1, 30),
        ]

    def test_future_anchor_is_the_first_fire_time(self) -> None:
        sched = interval(60, anchor=utc(2030, 1, 1))
        assert sched.next_after(utc(2025, 1, 1)) == utc(2030, 1, 1)
        assert sched.next_after(utc(2030, 1, 1)) == utc(2030, 1, 1, 0, 1)

    def test_anchor_and_moment_in_other_zones_return_utc(self) -> None:
        sched = interval(timedelta(days=1), anchor=berlin(2025, 1, 1, 6))  # 05:00 UTC
        result = sched.next_after(berlin(2025, 7, 1, 12))  # 10:00 UTC
        assert result == utc(2025, 7, 2, 5)
        assert result.tzinfo is UTC

    def test_float_seconds_and_sub_second_periods(self) -> None:
        assert interval(0.25).next_after(utc(2025, 1, 1, 0, 0, 0, 300000)) == utc(2025, 1, 1, 0, 0, 0, 500000)

    @pytest.mark.parametrize("every", [0, -1, -0.5, timedelta(0), timedelta(seconds=-5), float("nan"), 1e-9])
    def test_rejects_non_positive_every(self, every: float | timedelta) -> None:
        with pytest.raises(ValueError, match="interval every must be > 0") as info:
            interval(every)
        assert repr(every) in str(info.value)

    @pytest.mark.parametrize("every", [True, "30", None])
    def test_rejects_bad_types(self, every: object) -> None:
        with pytest.raises(ValueError, match="interval every must be a timedelta or a number"):
            interval(every)  # type: ignore[arg-type]

    def test_rejects_naive_datetimes(self) -> None:
        with pytest.raises(ValueError, match="anchor must be timezone-aware"):
            interval(10, anchor=datetime(2025, 1, 1))
        with pytest.raises(ValueError, match="moment must be timezone-aware"):
            interval(10).next_after(datetime(2025, 1, 1))

    def test_describe_and_equality(self) -> None:
        assert interval(90).describe() == "every 1m30s"
        assert interval(timedelta(days=1, hours=2)).describe() == "every 1d2h"
        assert interval(0.5).describe() == "every 0.5s"
        assert interval(60, anchor=utc(2025, 1, 1)).describe() == "every 1m from 2025-01-01T00:00:00+00:00"
        assert interval(60) == interval(timedelta(minutes=1))
        assert interval(60) != interval(60, anchor=utc(2025, 1, 1, 0, 0, 30))
        assert hash(interval(60)) == hash(interval(60.0))

    def test_errors_are_configuration_errors_too(self) -> None:
        with pytest.raises(ConfigurationError):
            interval(0)

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(
        every_us=st.integers(min_value=1, max_value=10 * 86_400 * 10**6),
        anchor=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)),
        moment=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)),
    )
    def test_property_fire_times_are_anchor_multiples(self, every_us: int, anchor: datetime, moment: datetime) -> None:
        every = timedelta(microseconds=every_us)
        result = interval(every, anchor=anchor).next_after(moment)
        assert result > moment
        assert (result - anchor) % every == timedelta(0)
        assert result >= anchor
        assert result == anchor or result - every <= moment


# --- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(minutes=90)),
        ("1h 30m", timedelta(minutes=90)),
        ("1.5d", timedelta(hours=36)),
        ("250ms", timedelta(milliseconds=250)),
        ("2W", timedelta(weeks=2)),
        ("45", timedelta(seconds=45)),
        ("0.5", timedelta(seconds=0.5)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


@pytest.mark.parametrize("text", ["", "s", "5x", "-5s", "5 minutes", "1h-30m", "m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


# --- crontab parsing


class TestCrontabFields:
    def test_defaults_are_every_minute(self) -> None:
        every = crontab()
        assert every.minute == frozenset(range(60))
        assert every.hour == frozenset(range(24))
        assert every.day_of_week == frozenset(range(7))
        assert every.day_of_month == frozenset(range(1, 32))
        assert every.month_of_year == frozenset(range(1, 13))

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("*/15", {0, 15, 30, 45}),
            ("5", {5}),
            (5, {5}),
            ("10-12", {10, 11, 12}),
            ("1,5,10-12", {1, 5, 10, 11, 12}),
            ("0-30/10", {0, 10, 20, 30}),
            ("50/4", {50, 54, 58}),
            ("58-2", {58, 59, 0, 1, 2}),
            ([1, 2, 3], {1, 2, 3}),
            (range(0, 60, 20), {0, 20, 40}),
            (["*/30", 7], {0, 30, 7}),
            (" 7 , 8 ", {7, 8}),
        ],
    )
    def test_minute_syntax(self, spec: object, expected: set[int]) -> None:
        assert crontab(minute=spec).minute == expected  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("sun", {0}),
            ("SUNDAY", {0}),
            ("7", {0}),
            (7, {0}),
            ("0", {0}),
            ("mon-fri", {1, 2, 3, 4, 5}),
            ("Sat,Sun", {6, 0}),
            ("fri-mon", {5, 6, 0, 1}),
            ("5-7", {5, 6, 0}),
            ("*/2", {0, 2, 4, 6}),
            ("thursday", {4}),
        ],
    )
    def test_day_of_week_names_and_sunday(self, spec: object, expected: set[int]) -> None:
        assert crontab(day_of_week=spec).day_of_week == expected  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("jan", {1}),
            ("Dec", {12}),
            ("jun-aug", {6, 7, 8}),
            ("nov-feb", {11, 12, 1, 2}),
            ("*/3", {1, 4, 7, 10}),
        ],
    )
    def test_month_names(self, spec: str, expected: set[int]) -> None:
        assert crontab(month_of_year=spec).month_of_year == expected

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"minute": "61"}, "crontab minute: '61' out of range 0-59"),
            ({"minute": 60}, "crontab minute: '60' out of range 0-59"),
            ({"minute": -1}, "crontab minute: -1 out of range 0-59"),
            ({"minute": "1,61"}, "crontab minute: '61' out of range 0-59 (in '1,61')"),
            ({"hour": "24"}, "crontab hour: '24' out of range 0-23"),
            ({"hour": "*/0"}, "crontab hour: '*/0' has an invalid step"),
            ({"hour": "1-5/x"}, "crontab hour: '1-5/x' has an invalid step"),
            ({"day_of_week": "8"}, "crontab day_of_week: '8' out of range 0-7"),
            ({"day_of_week": "funday"}, "crontab day_of_week: 'funday' is not a number or a name"),
            ({"day_of_month": "0"}, "crontab day_of_month: '0' out of range 1-31"),
            ({"day_of_month": "32"}, "crontab day_of_month: '32' out of range 1-31"),
            ({"month_of_year": "13"}, "crontab month_of_year: '13' out of range 1-12"),
            ({"month_of_year": "0"}, "crontab month_of_year: '0' out of range 1-12"),
            ({"minute": "mon"}, "crontab minute: 'mon' is not a number"),
            ({"minute": "5-"}, "crontab minute: '5-' is not a valid range"),
            ({"minute": ""}, "crontab minute: '' is empty"),
            ({"minute": "1,,2"}, "crontab minute: '1,,2' has an empty list item"),
            ({"minute": []}, "crontab minute: [] is empty"),
            ({"minute": True}, "crontab minute: True is not a valid value"),
            ({"minute": 1.5}, "crontab minute: 1.5 is not a valid value"),
            ({"minute": [1, None]}, "crontab minute: None is not an int or a string"),
            (
                {"day_of_month": 30, "month_of_year": "feb"},
                "day_of_month '30' never occurs in month_of_year 'feb'",
            ),
            ({"day_of_month": 31, "month_of_year": "4,6,9,11"}, "never occurs"),
        ],
    )
    def test_invalid_fields_name_field_and_value(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError) as info:
            crontab(**kwargs)  # type: ignore[arg-type]
        assert message in str(info.value)
        assert isinstance(info.value, InvalidScheduleError)

    def test_expression_order_is_standard_crontab(self) -> None:
        sched = crontab.from_expression("5 4 3 2 1")
        fields = (sched.minute, sched.hour, sched.day_of_month, sched.month_of_year, sched.day_of_week)
        assert fields == (frozenset({5}), frozenset({4}), frozenset({3}), frozenset({2}), frozenset({1}))
        assert sched.expression() == "5 4 3 2 1"
        assert crontab.from_expression("@daily") == crontab(minute=0, hour=0)
        assert crontab.from_expression("@hourly") == crontab(minute=0)
        assert crontab.from_expression("@weekly") == crontab(0, 0, day_of_week="sun")

    @pytest.mark.parametrize("text", ["* * * *", "* * * * * *", "", "*/5"])
    def test_expression_needs_five_fields(self, text: str) -> None:
        with pytest.raises(ValueError, match="must have 5 fields"):
            crontab.from_expression(text)

    def test_expression_errors_name_the_field(self) -> None:
        with pytest.raises(ValueError, match="crontab day_of_week: '9' out of range 0-7"):
            crontab.from_expression("0 0 * * 9")
        with pytest.raises(ValueError, match="crontab month_of_year: 'foo'"):
            crontab.from_expression("0 0 1 foo *")

    def test_unknown_time_zone(self) -> None:
        with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
            crontab(tz="Mars/Olympus")

    def test_describe_equality_and_default_tz(self) -> None:
        sched = crontab.from_expression("0 3 * * sun", tz="Europe/Berlin")
        assert sched.describe() == "cron '0 3 * * sun' (Europe/Berlin)"
        assert sched == crontab(minute=0, hour=3, day_of_week=0, tz=BERLIN)
        assert hash(sched) == hash(crontab(minute=0, hour=3, day_of_week=7, tz="Europe/Berlin"))
        assert sched != crontab(minute=0, hour=3, day_of_week=0)
        naive_zone = crontab(minute=0, hour=3)
        assert naive_zone.tz is None and naive_zone.effective_tz is UTC
        assert naive_zone.describe() == "cron '0 3 * * *' (UTC (default))"
        in_berlin = naive_zone.with_default_tz("Europe/Berlin")
        assert in_berlin.tz is BERLIN and naive_zone.tz is None
        assert sched.with_default_tz("America/New_York") is sched  # its own zone wins


# --- crontab next


class TestCrontabNext:
    def test_every_fifteen_minutes(self) -> None:
        sched = crontab(minute="*/15")
        assert sched.next_after(utc(2025, 5, 1, 10, 7)) == utc(2025, 5, 1, 10, 15)
        assert sched.next_after(utc(2025, 5, 1, 10, 15)) == utc(2025, 5, 1, 10, 30)  # strictly after
        assert sched.next_after(utc(2025, 5, 1, 10, 14, 59, 999999)) == utc(2025, 5, 1, 10, 15)
        assert sched.next_after(utc(2025, 5, 1, 10, 45, 0, 1)) == utc(2025, 5, 1, 11, 0)
        assert sched.next_after(utc(2025, 5, 1, 23, 59)) == utc(2025, 5, 2, 0, 0)

    def test_hour_range_rolls_to_next_day(self) -> None:
        sched = crontab(minute=0, hour="9-17")
        assert sched.next_after(utc(2025, 5, 1, 8, 59)) == utc(2025, 5, 1, 9)
        assert sched.next_after(utc(2025, 5, 1, 17, 0)) == utc(2025, 5, 2, 9)
        assert sched.next_after(utc(2025, 5, 1, 12, 30)) == utc(2025, 5, 1, 13)

    def test_minute_list(self) -> None:
        sched = crontab(minute="1,5,10-12", hour=6)
        assert fire_times(sched, utc(2025, 5, 1, 6, 2), 5) == [
            utc(2025, 5, 1, 6, 5),
            utc(2025, 5, 1, 6, 10),
            utc(2025, 5, 1, 6, 11),
            utc(2025, 5, 1, 6, 12),
            utc(2025, 5, 2, 6, 1),
        ]

    def test_weekday_names(self) -> None:
        sched = crontab(minute=30, hour=8, day_of_week="mon-fri")
        # 2025-05-02 is a Friday: the next run after its 08:30 is Monday 2025-05-05.
        assert sched.next_after(utc(2025, 5, 2, 8, 30)) == utc(2025, 5, 5, 8, 30)
        assert crontab(0, 0, day_of_week="sat").next_after(utc(2025, 5, 1)) == utc(2025, 5, 3)

    def test_day_of_month_and_day_of_week_are_anded_like_celery(self) -> None:
        friday_13th = crontab(0, 0, day_of_week="fri", day_of_month=13)
        # 2025: Jan 13 Mon, Feb 13 Thu, Mar 13 Thu, Apr 13 Sun, May 13 Tue, Jun 13 Fri.
        assert friday_13th.next_after(utc(2025, 1, 1)) == utc(2025, 6, 13)
        assert friday_13th.next_after(utc(2025, 6, 13)) == utc(2026, 2, 13)
        assert date(2026, 2, 13).weekday() == 4

    def test_month_boundaries_skip_short_months(self) -> None:
        sched = crontab(0, 0, day_of_month=31)
        assert fire_times(sched, utc(2025, 1, 31, 0, 0, 1), 4) == [
            utc(2025, 3, 31),
            utc(2025, 5, 31),
            utc(2025, 7, 31),
            utc(2025, 8, 31),
        ]
        assert crontab(0, 12, day_of_month="1").next_after(utc(2025, 4, 30, 23)) == utc(2025, 5, 1, 12)

    def test_leap_day(self) -> None:
        sched = crontab(0, 0, day_of_month=29, month_of_year="feb")
        assert sched.next_after(utc(2024, 2, 29)) == utc(2028, 2, 29)
        assert sched.next_after(utc(2023, 3, 1)) == utc(2024, 2, 29)
        assert sched.next_after(utc(2096, 3, 1)) == utc(2104, 2, 29)  # 2100 is not a leap year

    def test_leap_day_on_a_weekday(self) -> None:
        # Feb 29 on a Monday: 2016, then 2044.
        assert crontab(0, 0, day_of_week="mon", day_of_month=29, month_of_year=2).next_after(utc(2016, 3, 1)) == utc(
            2044, 2, 29
        )

    def test_year_boundary(self) -> None:
        assert crontab(0, 0, day_of_month=1, month_of_year=1).next_after(utc(2025, 12, 31, 23, 59)) == utc(2026, 1, 1)
        last_minute = crontab(59, 23, day_of_month=31, month_of_year=12)
        assert last_minute.next_after(utc(2025, 12, 31, 23, 59)) == utc(2026, 12, 31, 23, 59)
        assert crontab(minute="*/20").next_after(utc(2025, 12, 31, 23, 45)) == utc(2026, 1, 1)

    def test_moment_in_another_zone(self) -> None:
        sched = crontab(0, 12)  # UTC noon
        assert sched.next_after(datetime(2025, 5, 1, 13, 30, tzinfo=BERLIN)) == utc(2025, 5, 1, 12)

    def test_naive_moment_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="moment must be timezone-aware"):
            crontab().next_after(datetime(2025, 1, 1))


class TestCrontabTimeZones:
    def test_sunday_three_am_berlin_summer_and_winter(self) -> None:
        sched = crontab.from_expression("0 3 * * sun", tz="Europe/Berlin")
        # 2025-07-06 is a Sunday: 03:00 CEST (UTC+2) = 01:00 UTC.
        assert sched.next_after(utc(2025, 7, 1)) == utc(2025, 7, 6, 1)
        # 2025-12-07 is a Sunday: 03:00 CET (UTC+1) = 02:00 UTC.
        assert sched.next_after(utc(2025, 12, 1)) == utc(2025, 12, 7, 2)

    def test_spring_forward_gap_does_not_fire_that_day(self) -> None:
        # Berlin 2025-03-30: clocks jump from 02:00 CET to 03:00 CEST; 02:30 does not exist.
        sched = crontab(30, 2, tz="Europe/Berlin")
        assert fire_times(sched, utc(2025, 3, 28, 12), 3) == [
            utc(2025, 3, 29, 1, 30),  # 02:30 CET
            utc(2025, 3, 31, 0, 30),  # 02:30 CEST; nothing on the 30th
            utc(2025, 4, 1, 0, 30),
        ]

    def test_spring_forward_every_fifteen_minutes(self) -> None:
        sched = crontab(minute="*/15", tz=BERLIN)
        assert fire_times(sched, utc(2025, 3, 30, 0, 30), 3) == [
            utc(2025, 3, 30, 0, 45),  # 01:45 CET
            utc(2025, 3, 30, 1, 0),  # 03:00 CEST, 15 minutes later
            utc(2025, 3, 30, 1, 15),
        ]

    def test_fall_back_repeated_time_fires_once(self) -> None:
        # Berlin 2025-10-26: 03:00 CEST becomes 02:00 CET; 02:30 happens at 00:30 and again at 01:30 UTC.
        sched = crontab(30, 2, tz="Europe/Berlin")
        assert fire_times(sched, utc(2025, 10, 25, 12), 2) == [
            utc(2025, 10, 26, 0, 30),  # first 02:30 (CEST)
            utc(2025, 10, 27, 1, 30),  # not 2025-10-26 01:30 UTC
        ]
        # Even from inside the repeated hour, after the first 02:30.
        assert sched.next_after(utc(2025, 10, 26, 1, 0)) == utc(2025, 10, 27, 1, 30)
        assert sched.next_after(berlin(2025, 10, 26, 2, 15, fold=1)) == utc(2025, 10, 27, 1, 30)

    def test_fall_back_repeated_hour_runs_once_per_wall_clock_minute(self) -> None:
        sched = crontab(minute="*/30", tz=BERLIN)
        assert fire_times(sched, utc(2025, 10, 25, 23, 15), 4) == [
            utc(2025, 10, 25, 23, 30),  # 01:30 CEST
            utc(2025, 10, 26, 0, 0),  # 02:00 CEST
            utc(2025, 10, 26, 0, 30),  # 02:30 CEST; the repeated 02:00 and 02:30 CET are skipped
            utc(2025, 10, 26, 2, 0),  # 03:00 CET
        ]

    def test_other_hemisphere_and_half_hour_dst(self) -> None:
        # Lord Howe shifts by 30 minutes: on 2025-04-06 at 02:00 (+11) clocks go back to 01:30 (+10:30).
        sched = crontab(minute=45, hour=1, tz="Australia/Lord_Howe")
        assert sched.next_after(utc(2025, 4, 5, 12)) == utc(2025, 4, 5, 14, 45)  # 01:45 +11, once
        assert sched.next_after(utc(2025, 4, 5, 14, 45)) == utc(2025, 4, 6, 15, 15)  # next day, +10:30

    def test_spring_forward_only_time_never_fires(self) -> None:
        # Mar 29 on a Sunday is always the last Sunday of March, so 02:30 Berlin never exists then.
        sched = crontab(30, 2, day_of_month=29, month_of_year=3, day_of_week="sun", tz=BERLIN)
        with pytest.raises(ValueError, match="never fires"):
            sched.next_after(utc(2025, 1, 1))


# --- parse_schedule


class TestParseSchedule:
    def test_passes_schedules_through(self) -> None:
        sched = interval(10)
        assert parse_schedule(sched) is sched

    def test_numbers_and_timedeltas_are_intervals(self) -> None:
        assert parse_schedule(30) == interval(30)
        assert parse_schedule(2.5) == interval(2.5)
        assert parse_schedule(timedelta(hours=1)) == interval(3600)

    def test_cron_string_in_the_given_zone(self) -> None:
        sched = parse_schedule("*/5 * * * *", "Europe/Berlin")
        assert sched == crontab(minute="*/5", tz=BERLIN)
        assert parse_schedule("0 3 1 2 mon") == crontab(0, 3, day_of_month=1, month_of_year=2, day_of_week=1)

    def test_crontab_without_zone_gets_the_default(self) -> None:
        assert parse_schedule(crontab(0, 3), BERLIN) == crontab(0, 3, tz=BERLIN)
        own = crontab(0, 3, tz="UTC")
        assert parse_schedule(own, BERLIN) is own

    @pytest.mark.parametrize("value", [True, None, [1, 2], {"every": 3}])
    def test_rejects_other_types(self, value: object) -> None:
        with pytest.raises(TypeError, match="a schedule must be"):
            parse_schedule(value)  # type: ignore[arg-type]

    def test_rejects_bad_values(self) -> None:
        with pytest.raises(ValueError, match="interval every must be > 0"):
            parse_schedule(0)
        with pytest.raises(ValueError, match="must have 5 fields"):
            parse_schedule("30s")


# --- properties

ZONES = [UTC, BERLIN, ZoneInfo("America/New_York"), ZoneInfo("Australia/Lord_Howe"), ZoneInfo("Asia/Kolkata")]


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    single = number.map(str)
    step = st.integers(1, high - low + 1).map(lambda s: f"*/{s}")
    span = st.tuples(number, number, st.integers(1, 5)).map(lambda t: f"{t[0]}-{t[1]}/{t[2]}")
    listed = st.lists(single | span, min_size=1, max_size=3).map(",".join)
    return st.sampled_from(["*"]) | single | step | span | listed


def _matches(spec: crontab, local: datetime) -> bool:
    return (
        local.minute in spec.minute
        and local.hour in spec.hour
        and local.day in spec.day_of_month
        and local.month in spec.month_of_year
        and local.isoweekday() % 7 in spec.day_of_week
    )


MOMENTS = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC))
# Hours at which the test zones change their clocks, drawn often so that gaps and repeats are exercised.
HOURS = _field(0, 23) | st.sampled_from(["1", "2", "3", "1-2", "2,4", "0-2/2", "1,3", "2-3"])


@functools.cache
def _transitions(zone: tzinfo) -> list[datetime]:
    """The UTC instants in 2020-2031 at which ``zone`` changes its offset (to the minute)."""
    found = []
    day = datetime(2020, 1, 1, tzinfo=UTC)
    while day.year < 2032:
        following = day + timedelta(days=1)
        if day.astimezone(zone).utcoffset() != following.astimezone(zone).utcoffset():
            low, high = day, following  # offset(low) != offset(high): bisect to the minute
            while high - low > timedelta(minutes=1):
                middle = low + (high - low) / 2
                middle = middle.replace(second=0, microsecond=0)
                if middle.astimezone(zone).utcoffset() == low.astimezone(zone).utcoffset():
                    low = middle
                else:
                    high = middle
            found.append(high)
        day = following
    return found


@st.composite
def zone_and_moment(draw: st.DrawFn) -> tuple[tzinfo, datetime]:
    """A zone and a moment; half the time within a day or two of one of the zone's DST transitions."""
    zone = draw(st.sampled_from(ZONES))
    transitions = _transitions(zone)
    near_transition: bool = draw(st.booleans())
    if transitions and near_transition:
        near = draw(st.sampled_from(transitions))
        offset = draw(st.integers(min_value=-2 * 86_400 * 10**6, max_value=86_400 * 10**6))
        return zone, near + timedelta(microseconds=offset)
    return zone, draw(MOMENTS)


def _check_next(
    spec: crontab, moment: datetime, brute_force_window: timedelta, always_brute_force: bool = False
) -> None:
    tz = spec.effective_tz
    result = spec.next_after(moment)
    assert result > moment
    assert result.tzinfo is UTC and result.second == 0 and result.microsecond == 0
    local = result.astimezone(tz)
    assert _matches(spec, local)
    assert local.fold == 0  # the first occurrence of a repeated wall-clock time
    if result - moment > brute_force_window:
        assert not always_brute_force, f"{spec.describe()} after {moment}: {result} is beyond the window"
        return
    # No matching minute (first occurrence on the wall clock) strictly between moment and result.
    probe = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while probe < result:
        wall = probe.astimezone(tz)
        assert not (wall.fold == 0 and _matches(spec, wall)), f"{spec.describe()} missed {probe} after {moment}"
        probe += timedelta(minutes=1)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(minute=_field(0, 59), hour=HOURS, zone_moment=zone_and_moment())
def test_property_daily_specs_brute_force(minute: str, hour: str, zone_moment: tuple[tzinfo, datetime]) -> None:
    zone, moment = zone_moment
    spec = crontab(minute=minute, hour=hour, tz=zone)
    # Fires at least daily (every day has an existing matching minute, or the day after does), so the
    # next fire time is within two days and the window is brute-forced minute by minute.
    _check_next(spec, moment, brute_force_window=timedelta(days=3), always_brute_force=True)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    minute=_field(0, 59),
    hour=HOURS,
    day_of_month=_field(1, 31),
    month_of_year=_field(1, 12),
    day_of_week=_field(0, 7),
    zone_moment=zone_and_moment(),
)
def test_property_any_spec(
    minute: str,
    hour: str,
    day_of_month: str,
    month_of_year: str,
    day_of_week: str,
    zone_moment: tuple[tzinfo, datetime],
) -> None:
    zone, moment = zone_moment
    try:
        spec = crontab(minute, hour, day_of_week, day_of_month, month_of_year, tz=zone)
    except ValueError:
        assume(False)  # e.g. day 31 of February only
        raise
    _check_next(spec, moment, brute_force_window=timedelta(days=2))


def test_far_away_fire_time_is_computed_quickly() -> None:
    # Friday Feb 29 with a single minute: the search walks candidate dates, not minutes (28 years here).
    spec = crontab(minute=7, hour=13, day_of_month=29, month_of_year=2, day_of_week="fri")
    assert spec.next_after(utc(2008, 3, 1)) == utc(2036, 2, 29, 13, 7)
