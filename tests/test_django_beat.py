"""``amqtask beat`` reading django-celery-beat's tables (issue 16), as a Django team runs it.

Real ``python manage.py amqtask beat`` processes on the example project (examples/django, sqlite) send
what the ``PeriodicTask`` rows say to queues this test reads; the rows are edited with the ORM as the
admin does (``save()``, which stamps ``PeriodicTasks``), and the running beat follows. The conversion of
each kind of row (crontab time zones, clocked, start/expiry, one-off, solar) is checked without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
import pytest
from support.django_example import PROJECT, example_env, manage
from support.interop import delete_objects
from support.workers import wait_for

from amqtask.beat.entries import SLOT_HEADER
from amqtask.errors import ConfigurationError

pytest.importorskip("django_celery_beat", reason="needs the django-beat extra")

pytestmark = [pytest.mark.broker, pytest.mark.ecosystem]

TIMEOUT = 20.0
UTC = timezone.utc


@pytest.fixture(scope="module")
def env(broker_url: str) -> dict[str, str]:
    return example_env(broker_url)


@dataclass
class Message:
    task: str
    slot: datetime
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]


class Collector:
    """Consumes queues in a thread of its own, keeping what arrives per queue."""

    def __init__(self, url: str, queues: tuple[str, ...]) -> None:
        self.url, self.queues = url, queues
        self.got: dict[str, list[Message]] = {queue: [] for queue in queues}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Collector:
        self._thread.start()
        assert self._ready.wait(TIMEOUT) and self._failure is None, f"the collector did not start: {self._failure!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)

    def wait(self, queue: str, count: int) -> list[Message]:
        wait_for(lambda: len(self.got[queue]) >= count, TIMEOUT, f"{count} messages in {queue}")
        return list(self.got[queue])

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            for name in self.queues:
                queue = await channel.declare_queue(name, durable=True)
                await queue.consume(functools.partial(self._keep, name), no_ack=True)
            self._ready.set()
            await self._stop.wait()

    async def _keep(self, queue: str, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        args, kwargs, _embed = json.loads(message.body)
        slot = datetime.fromisoformat(str(headers[SLOT_HEADER]))
        self.got[queue].append(Message(str(headers["task"]), slot, args, kwargs, headers))


@pytest.fixture
def names(env: dict[str, str], broker_url: str, unique: str) -> Iterator[str]:
    """A unique prefix for the test's rows and queues; both are deleted afterwards."""
    from django_celery_beat.models import PeriodicTask

    yield unique
    PeriodicTask.objects.filter(name__startswith=unique).delete()
    queues = (f"{unique}-a", f"{unique}-b", f"{unique}-default", f"{unique}.beat.state")
    delete_objects(broker_url, queues)


MANAGE_PY = ("manage.py", "amqtask")
#: The same, outside manage.py: the source sets Django up from DJANGO_SETTINGS_MODULE.
PLAIN_CLI = ("-m", "amqtask", "-A", "proj.amqtask:app")


def _beat(env: dict[str, str], unique: str, log: Path, *args: str, via: tuple[str, ...]) -> subprocess.Popen[bytes]:
    beat_env = {
        **env,
        "EXAMPLE_QUEUE": f"{unique}-default",  # the hourly cleanup row's queue, should it come due
        "AMQTASK_BEAT_LOCK_NAME": f"{unique}.beat.lock",
        "AMQTASK_BEAT_STATE_NAME": f"{unique}.beat.state",
        "AMQTASK_BEAT_LOCK_RETRY_S": "0.2",
        "AMQTASK_BEAT_MAX_LOOP_S": "0.2",  # how soon an edit is seen
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *via, "beat", "-l", "info", *args],
            cwd=PROJECT, env=beat_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


@contextlib.contextmanager
def running_beat(
    env: dict[str, str], unique: str, log: Path, *args: str, via: tuple[str, ...] = MANAGE_PY
) -> Iterator[subprocess.Popen[bytes]]:
    process = _beat(env, unique, log, *args, via=via)
    try:
        yield process
    finally:
        process.terminate()
        assert process.wait(TIMEOUT) == 0, log.read_text()


def _every(seconds: int) -> Any:
    from django_celery_beat.models import IntervalSchedule

    schedule, _ = IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)
    return schedule


def _row(name: str, queue: str, **fields: Any) -> Any:
    from django_celery_beat.models import PeriodicTask

    return PeriodicTask.objects.create(name=name, task="reports.cleanup", queue=queue, **fields)


def _gaps(messages: list[Message]) -> list[timedelta]:
    return [later.slot - earlier.slot for earlier, later in itertools.pairwise(messages)]


def test_a_row_is_sent_on_its_interval_and_its_runs_are_written_back(
    env: dict[str, str], broker_url: str, names: str, tmp_path: Path
) -> None:
    row = _row(f"{names}-a", f"{names}-a", interval=_every(1), kwargs='{"days": 5}', headers='{"team": "ops"}')
    with (
        Collector(broker_url, (f"{names}-a",)) as inbox,
        running_beat(env, names, tmp_path / "beat.log", "-S", "django_celery_beat.schedulers:DatabaseScheduler"),
    ):
        messages = inbox.wait(f"{names}-a", 3)
        wait_for(lambda: row.refresh_from_db() or (row.total_run_count >= 3), TIMEOUT, "total_run_count written")
    first = messages[0]
    assert (first.task, first.args, first.kwargs) == ("reports.cleanup", [], {"days": 5})
    assert first.headers["team"] == "ops" and first.headers["periodic_task_name"] == row.name
    assert set(_gaps(messages[:3])) == {timedelta(seconds=1)}
    assert row.last_run_at is not None and row.last_run_at >= messages[0].slot
    listed = manage({**env, "AMQTASK_BEAT_STATE_NAME": f"{names}.beat.state"}, "amqtask", "beat", "list")
    assert any(line.split()[:3] == [row.name, "reports.cleanup", "every"] for line in listed.splitlines()), listed


def test_edits_in_the_tables_take_effect_without_restarting_beat(
    env: dict[str, str], broker_url: str, names: str, tmp_path: Path
) -> None:
    a, b = f"{names}-a", f"{names}-b"
    log = tmp_path / "beat.log"
    row = _row(a, a, interval=_every(1))
    with Collector(broker_url, (a, b)) as inbox, running_beat(env, names, log):
        inbox.wait(a, 2)
        row.interval = _every(2)  # as the admin saves it: the change stamp moves
        row.save()
        wait_for(lambda: "reloaded" in log.read_text(), TIMEOUT, "beat to re-read the tables")
        changed = len(inbox.got[a])
        later = inbox.wait(a, changed + 3)[changed + 1 :]  # the first may have been sent before the re-read
        assert _gaps(later) == [timedelta(seconds=2)], later

        _row(b, b, interval=_every(1), args="[7]")
        assert inbox.wait(b, 1)[0].args == [7]

        row.enabled = False
        row.save()
        wait_for(lambda: f"removed ['{a}']" in log.read_text(), TIMEOUT, "beat to drop the disabled row")
        seen = len(inbox.got[b])
        after = inbox.wait(b, seen + 3)[seen:]
    assert all(message.slot <= after[0].slot for message in inbox.got[a]), (inbox.got[a], after)


def test_two_beats_send_each_run_once_and_one_of_them_writes_the_runs(
    env: dict[str, str], broker_url: str, names: str, tmp_path: Path
) -> None:
    from django_celery_beat.models import PeriodicTask

    queue = f"{names}-a"
    _row(queue, queue, interval=_every(1))
    logs = (tmp_path / "one.log", tmp_path / "two.log")
    with Collector(broker_url, (queue,)) as inbox:
        with (
            running_beat(env, names, logs[0]),
            running_beat(env, names, logs[1], "--scheduler", "django", via=PLAIN_CLI),
        ):
            inbox.wait(queue, 4)
            leaders = sum("is the leader" in log.read_text() for log in logs)
        total = PeriodicTask.objects.get(name=queue).total_run_count
        messages = inbox.wait(queue, total)
    slots = [message.slot for message in messages]
    assert len(slots) == len(set(slots)) == total, slots
    assert set(_gaps(messages)) == {timedelta(seconds=1)}
    assert leaders == 1


# ------------------------------------------------------------------------------------------ rows to entries
def _entry(env: dict[str, str], **fields: Any) -> Any:
    from django_celery_beat.models import PeriodicTask

    from amqtask.contrib.django.beat_entries import entry_from_row

    return entry_from_row(PeriodicTask(name="row", task="t.run", **fields))


def test_a_crontab_row_runs_in_its_own_time_zone(env: dict[str, str]) -> None:
    from django_celery_beat.models import CrontabSchedule

    cron = CrontabSchedule(minute="30", hour="9", day_of_week="1-5", timezone=ZoneInfo("America/New_York"))
    schedule = _entry(env, crontab=cron).schedule
    # 09:30 in New York is 14:30 UTC in winter (EST) and 13:30 UTC in summer (EDT); Monday to Friday.
    assert schedule.next_after(datetime(2026, 1, 16, 15, 0, tzinfo=UTC)) == datetime(2026, 1, 19, 14, 30, tzinfo=UTC)
    assert schedule.next_after(datetime(2026, 7, 1, 0, 0, tzinfo=UTC)) == datetime(2026, 7, 1, 13, 30, tzinfo=UTC)


def test_start_time_expiry_clocked_and_one_off_rows(env: dict[str, str]) -> None:
    from django.utils.timezone import make_aware
    from django_celery_beat.models import ClockedSchedule, IntervalSchedule

    start, end = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC), datetime(2026, 3, 1, 12, 1, tzinfo=UTC)
    minutely = IntervalSchedule(every=1, period=IntervalSchedule.MINUTES)
    bounded = _entry(env, interval=minutely, start_time=start, expires=end).schedule
    assert bounded.next_after(start - timedelta(days=1)) == start  # counted from start_time
    assert bounded.next_after(start) > datetime(8000, 1, 1, tzinfo=UTC)  # the next one is after expires
    at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    clocked = _entry(env, clocked=ClockedSchedule(clocked_time=at), one_off=True)
    assert clocked.schedule.next_after(at - timedelta(seconds=1)) == at
    assert clocked.schedule.next_after(at) > datetime(8000, 1, 1, tzinfo=UTC)
    assert _entry(env, interval=minutely, one_off=True, total_run_count=1) is None  # ran: nothing left
    naive = _entry(env, interval=minutely, start_time=start.replace(tzinfo=None)).schedule  # USE_TZ = False
    assert naive.next_after(start - timedelta(days=1)) == make_aware(start.replace(tzinfo=None))
    options = _entry(env, interval=minutely, expire_seconds=30, priority=0, exchange="ex", routing_key="rk").options
    assert {k: options[k] for k in ("expires", "priority", "exchange", "routing_key")} == {
        "expires": 30, "priority": 0, "exchange": "ex", "routing_key": "rk",
    }  # fmt: skip


def test_rows_beat_cannot_run_are_named(env: dict[str, str]) -> None:
    from django_celery_beat.models import IntervalSchedule, SolarSchedule

    from amqtask.contrib.django.beat_entries import UnsupportedScheduleError

    with pytest.raises(UnsupportedScheduleError, match=r"'row': solar schedules .* not supported"):
        _entry(env, solar=SolarSchedule(event="sunrise", latitude=0, longitude=0))
    with pytest.raises(ConfigurationError, match="'row': args is not valid JSON"):
        _entry(env, interval=IntervalSchedule(every=1, period="seconds"), args="[1,")


def test_beat_says_what_is_missing(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amqtask.contrib.django.beat_source import DatabaseSource

    monkeypatch.setitem(sys.modules, "django_celery_beat", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'amqtask\[django-beat\]'"):
        DatabaseSource()
    (tmp_path / "bare_settings.py").write_text(
        "INSTALLED_APPS = ['django.contrib.contenttypes']\nUSE_TZ = True\nSECRET_KEY = 'test'\n"
        "DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}}\n"
    )
    bare = {**env, "DJANGO_SETTINGS_MODULE": "bare_settings", "PYTHONPATH": f"{tmp_path}:{env['PYTHONPATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "amqtask", "beat", "-A", "proj.amqtask:app", "--scheduler", "django"],
        cwd=PROJECT, env=bare, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "add 'django_celery_beat' to INSTALLED_APPS" in done.stderr
