"""Beat without a broker: entries from every source and their validation, slots, catch-up, the state format."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from amqtask import App, ConfigurationError, crontab, interval
from amqtask.beat.catalog import Catalog
from amqtask.beat.entries import ENTRY_HEADER, SLOT_HEADER, Entry, collect, make_entry
from amqtask.beat.sources import SCHEDULER_ALIASES, resolve_source
from amqtask.beat.state import BeatState, EntryState, _newest, decode_state, encode_state, reconcile

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def app() -> App:
    return App("beat-entries", task_default_queue="default")


def test_the_issue_example_builds(app: App) -> None:
    app.conf.timezone = "Europe/Berlin"
    app.conf.beat_schedule = {
        "add-every-30-seconds": {"task": "tasks.add", "schedule": timedelta(seconds=30), "args": (16, 16)},
        "hourly": {"task": "tasks.report", "schedule": 3600.0},
        "weekly-cleanup": {
            "task": "tasks.clean_log",
            "schedule": crontab(minute=0, hour=3, day_of_week="sunday"),
            "options": {"queue": "maintenance", "priority": 2, "expires": 600},
        },
    }
    entries = collect(app)
    assert list(entries) == ["add-every-30-seconds", "hourly", "weekly-cleanup"]
    assert entries["add-every-30-seconds"].schedule == interval(30)
    assert entries["add-every-30-seconds"].args == (16, 16)
    assert entries["hourly"].schedule.describe() == "every 1h"
    weekly = entries["weekly-cleanup"]
    assert weekly.schedule.describe() == "cron '0 3 * * sunday' (Europe/Berlin)"  # the app's timezone applied
    assert weekly.options == {"queue": "maintenance", "priority": 2, "expires": 600}
    assert weekly.catch_up == "once"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"schedule": 30}, "missing 'task'"),
        ({"task": "t"}, "missing 'schedule'"),
        ({"task": "t", "schedule": 30, "arg": [1]}, "unknown key 'arg' (did you mean 'args'?)"),
        ({"task": "t", "schedule": "*/5 * *"}, "must have 5 fields"),
        ({"task": "t", "schedule": [1]}, "a schedule must be"),
        ({"task": "t", "schedule": -1}, "must be > 0"),
        ({"task": "t", "schedule": 30, "args": "ab"}, "args must be a list or tuple"),
        ({"task": "t", "schedule": 30, "catch_up": "all"}, "catch_up must be 'once' or 'skip'"),
        ({"task": "t", "schedule": 30, "options": {"queues": "q"}}, "unknown option 'queues' (did you mean 'queue'?)"),
        ({"task": "t", "schedule": 30, "options": {"countdown": 5}}, "unknown option 'countdown'"),
        ({"task": "t", "schedule": 30, "options": {"priority": 300}}, "priority must be an integer 0-255"),
        ({"task": "t", "schedule": 30, "options": {"ignore_result": False}}, "needs options.reply_to"),
        ({"task": "t", "schedule": 30, "options": {"serializer": "pickle"}}, "cannot build its message"),
        ({"task": "t", "schedule": 30, "args": [object()]}, "cannot build its message"),
    ],
)
def test_invalid_entries_are_named(app: App, raw: dict[str, Any], problem: str) -> None:
    app.conf.beat_schedule = {"my-entry": raw}
    with pytest.raises(ConfigurationError, match="beat_schedule entry 'my-entry'") as caught:
        collect(app)
    assert problem in str(caught.value)


def test_add_periodic_task_accepts_names_tasks_and_signatures(app: App) -> None:
    @app.task(name="t.add", queue="math")
    def add(x: int, y: int) -> int:
        return x + y

    by_name = app.add_periodic_task(10, "t.report", name="report", kwargs={"full": True})
    by_task = app.add_periodic_task(crontab(minute="*/5"), add, args=(1, 2))
    by_signature = app.add_periodic_task(60, add.s(1).set(priority=3), name="partial", args=(2,))
    duck = SimpleNamespace(task="t.other", args=[1], kwargs={"a": 1}, options={"queue": "q2"})
    by_duck = app.add_periodic_task("0 * * * *", duck, name="duck", kwargs={"b": 2}, catch_up="skip")

    assert (by_name.name, by_name.task, by_name.kwargs) == ("report", "t.report", {"full": True})
    assert (by_task.name, by_task.args) == ("t.add", (1, 2))
    assert (by_signature.args, by_signature.options) == ((1, 2), {"priority": 3})
    assert (by_duck.args, by_duck.kwargs, by_duck.options, by_duck.catch_up) == (
        (1,), {"a": 1, "b": 2}, {"queue": "q2"}, "skip"
    )  # fmt: skip
    assert set(app.periodic_entries) == {"report", "t.add", "partial", "duck"}
    # The task's own routing applies to the entry's message, as for delay().
    _, route, _ = app.build_message("t.add", (1, 2), {}, add, by_task.send_options("a", T0))
    assert route.routing_key == "math"


def test_add_periodic_task_refuses_ambiguity_and_canvas(app: App) -> None:
    app.add_periodic_task(10, "t.report")
    app.add_periodic_task(10, "t.report")  # the same again: fine
    with pytest.raises(ConfigurationError, match=r"'t\.report': another entry is registered under this name"):
        app.add_periodic_task(20, "t.report")
    group = SimpleNamespace(subtask_type="group", task="celery.group")
    with pytest.raises(ConfigurationError, match="not a group"):
        app.add_periodic_task(10, group, name="g")
    with pytest.raises(ConfigurationError, match="expected a task, a task name or a signature"):
        app.add_periodic_task(10, 42)


def test_periodic_task_decorator_registers_task_and_entry(app: App) -> None:
    @app.periodic_task(crontab(minute=0, hour=3), name="t.clean", args=(7,), options={"expires": 600})
    def clean(days: int) -> int:
        return days

    assert app.tasks["t.clean"] is clean
    assert clean(3) == 3
    entry = app.periodic_entries["t.clean"]
    assert (entry.task, entry.args, entry.options) == ("t.clean", (7,), {"expires": 600})


def test_sources_merge_file_over_code_over_settings(app: App) -> None:
    app.conf.beat_schedule = {
        "a": {"task": "from.settings", "schedule": 10},
        "b": {"task": "from.settings", "schedule": 10},
        "c": {"task": "from.settings", "schedule": 10},
    }
    app.add_periodic_task(10, "from.code", name="b")
    app.add_periodic_task(10, "from.code", name="c")
    file_entries = {"c": {"task": "from.file", "schedule": interval(5), "catch_up": "skip"}}
    entries = collect(app, file_entries)
    assert {name: e.task for name, e in entries.items()} == {"a": "from.settings", "b": "from.code", "c": "from.file"}
    assert entries["c"].catch_up == "skip"


def test_latest_slot_interval_and_crontab() -> None:
    every_minute = make_entry("e", "t", 60)
    assert every_minute.latest_slot(T0, T0 + timedelta(seconds=59)) is None
    assert every_minute.latest_slot(T0, T0 + timedelta(seconds=60)) == T0 + timedelta(minutes=1)
    assert every_minute.latest_slot(T0, T0 + timedelta(minutes=90, seconds=5)) == T0 + timedelta(minutes=90)
    nightly = make_entry("n", "t", crontab(minute=30, hour=2, tz=BERLIN))
    # Spring forward in Berlin (2024-03-31): 02:30 does not exist that night, so the latest slot before
    # noon on April 1st is 02:30 CEST on April 1st, and before that 02:30 CET on March 30th.
    noon = datetime(2024, 4, 1, 12, tzinfo=BERLIN)
    assert nightly.latest_slot(T0, noon) == datetime(2024, 4, 1, 2, 30, tzinfo=BERLIN)
    assert nightly.latest_slot(T0, datetime(2024, 3, 31, 12, tzinfo=BERLIN)) == datetime(
        2024, 3, 30, 2, 30, tzinfo=BERLIN
    )


def test_latest_slot_after_a_long_outage_is_cheap() -> None:
    every_second = make_entry("e", "t", 1)
    every_minute_on_sundays = make_entry("s", "t", crontab(minute="*", day_of_week="sun"))
    started = time.perf_counter()
    assert every_second.latest_slot(T0, T0 + timedelta(days=365, microseconds=5)) == T0 + timedelta(days=365)
    # 2024-03-01 is a Friday; a year later the latest Sunday minute is 2025-02-23 23:59.
    assert every_minute_on_sundays.latest_slot(T0, T0 + timedelta(days=365)) == datetime(
        2025, 2, 23, 23, 59, tzinfo=UTC
    )
    assert time.perf_counter() - started < 0.5


def test_task_ids_are_deterministic_per_app_entry_and_slot() -> None:
    entry = make_entry("e", "t", 60, options={"headers": {"mine": 1}})
    ids = {
        entry.task_id("app", T0),
        entry.task_id("app", T0 + timedelta(minutes=1)),
        entry.task_id("other-app", T0),
        make_entry("f", "t", 60).task_id("app", T0),
    }
    assert len(ids) == 4
    assert entry.task_id("app", T0) == entry.task_id("app", T0)
    options = entry.send_options("app", T0)
    assert options["ignore_result"] is True
    assert options["task_id"] == entry.task_id("app", T0)
    assert options["headers"] == {"mine": 1, ENTRY_HEADER: "e", SLOT_HEADER: T0.isoformat()}
    collecting = make_entry("r", "t", 60, options={"ignore_result": False, "reply_to": "results"})
    assert collecting.send_options("app", T0)["ignore_result"] is False


def _entries(**catch_up: str) -> dict[str, Entry]:
    return {name: make_entry(name, "t", 60, catch_up=policy) for name, policy in catch_up.items()}


def test_reconcile_starts_new_and_changed_entries_at_now() -> None:
    entries = _entries(new="once", changed="once", same="once")
    states = {
        "changed": EntryState(T0, "every 2m", T0, T0, "id-1"),
        "same": EntryState(T0, "every 1m"),
    }
    now = T0 + timedelta(minutes=5, seconds=30)
    result = reconcile(entries, states, now, taking_over=True)
    assert result["new"] == EntryState(now, "every 1m")
    assert result["changed"] == EntryState(now, "every 1m", T0, T0, "id-1")  # last run kept for display
    assert result["same"] == states["same"]  # "once": the next tick sends the latest missed slot


def test_reconcile_skip_drops_missed_slots_only_on_takeover() -> None:
    entries = _entries(skipper="skip")
    states = {"skipper": EntryState(T0, "every 1m")}
    now = T0 + timedelta(minutes=5, seconds=30)
    assert reconcile(entries, states, now, taking_over=False) == states
    taken = reconcile(entries, states, now, taking_over=True)
    assert taken["skipper"].slot == T0 + timedelta(minutes=5)
    assert entries["skipper"].latest_slot(taken["skipper"].slot, now) is None


def test_reconcile_keeps_unknown_entries_for_a_while() -> None:
    now = T0 + timedelta(days=40)
    states = {
        "recent": EntryState(now - timedelta(days=29), "every 1m"),
        "ancient": EntryState(now - timedelta(days=31), "every 1m"),
    }
    assert set(reconcile({}, states, now, taking_over=True)) == {"recent"}


def test_state_round_trip_and_newest_wins() -> None:
    state = BeatState(
        7,
        {"a": EntryState(T0, "every 1m", T0, T0 + timedelta(seconds=0.01), "id"), "b": EntryState(T0, "every 5s")},
        T0,
        "host:1",
    )
    assert decode_state(encode_state(state)) == state
    older = encode_state(BeatState(6, {}, T0, "host:1"))
    assert _newest([older, b"junk", encode_state(state)]) == state
    assert _newest([b"{}"]) is None
    for bad in (b"[]", b'{"format": 2}', b'{"format": 1, "seq": 1, "entries": {"a": {"slot": "2024-01-01"}}}'):
        with pytest.raises(ValueError):
            decode_state(bad)


def test_a_schedule_source_is_named_by_alias_or_module_factory(app: App) -> None:
    assert SCHEDULER_ALIASES["django_celery_beat.schedulers:DatabaseScheduler"] == SCHEDULER_ALIASES["django"]
    with pytest.raises(ConfigurationError, match=r"expected one of .* or 'module:factory'"):
        resolve_source(app, "nonsense")
    with pytest.raises(ConfigurationError, match="cannot import 'no_such_module'"):
        resolve_source(app, "no_such_module:make")
    with pytest.raises(ConfigurationError, match="did not return a ScheduleSource"):
        resolve_source(app, "builtins:repr")


class _TableSource:
    """A schedule source as a user would write one (``--scheduler module:factory``), over a dict."""

    name = "the table"

    def __init__(self) -> None:
        self.rows: dict[str, Entry] = {}
        self.version, self.read_version = 0, -1
        self.broken: Exception | None = None

    async def load(self) -> dict[str, Entry]:
        self.read_version = self.version
        return dict(self.rows)

    async def changed(self) -> bool:
        if self.broken is not None:
            raise self.broken
        return self.version != self.read_version

    async def record(self, fired: Any) -> None:
        raise AssertionError("not called by the catalog alone")


def test_a_source_is_merged_last_and_an_unreadable_one_keeps_the_schedule(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.beat_schedule = {"shared": {"task": "from.settings", "schedule": 60}}
    source = _TableSource()
    source.rows = {
        "shared": make_entry("shared", "from.source", 30),
        "bad": make_entry("bad", "t.bad", 30, args=[object()]),  # cannot be encoded: left out, logged
    }
    catalog = Catalog(app, None, source)
    assert catalog.entries["shared"].task == "from.settings"  # the source is read by load_source()

    async def scenario() -> None:
        await catalog.load_source()
        assert {name: entry.task for name, entry in catalog.entries.items()} == {"shared": "from.source"}
        assert "'bad': cannot build its message" in caplog.text
        assert await catalog.refresh() is None  # nothing changed
        source.rows["new"], source.version = make_entry("new", "t.new", 5), 1
        assert await catalog.refresh() == (["new"], [])
        source.broken = OSError("database away")
        caplog.clear()
        for _ in range(3):
            assert await catalog.refresh() is None
        assert set(catalog.entries) == {"shared", "new"}
        assert caplog.text.count("database away") == 1  # once, not on every tick
        source.broken = None
        await catalog.refresh()
        assert "the table can be read again" in caplog.text

    asyncio.run(scenario())
