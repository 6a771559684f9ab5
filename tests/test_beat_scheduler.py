"""Beat against a real broker: on-time fires, crontab slots on a settable clock, exactly one sender among
several, catch-up after downtime, no double fire on restart, lost connections, schedule-file reloads and
failed sends that are retried.

Tests never sleep to wait: they wait for messages in the target queue (with deadlines), or move a
settable clock and call ``tick()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pytest
from support.proxy import FaultProxy
from support.queues import delete, eventually

from amqtask import App, crontab
from amqtask.beat import Scheduler
from amqtask.beat.entries import ENTRY_HEADER, SLOT_HEADER
from amqtask.beat.state import StateStore

pytestmark = pytest.mark.broker

T = TypeVar("T")
UTC = timezone.utc
T0 = datetime(2024, 10, 26, 22, 50, tzinfo=UTC)  # 00:50 CEST in Berlin, the night clocks go back


class Clock:
    """A settable clock for the scheduler."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_app(url: str, unique: str, **settings: Any) -> App:
    options: dict[str, Any] = {
        "task_default_queue": f"q-{unique}",
        "beat_lock_retry_s": 0.2,
        "beat_max_loop_s": 0.5,
        "publish_timeout_s": 10,
        **settings,
    }
    return App(f"beat-{unique}", broker=url, **options)


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = make_app(broker_url, unique)
    yield application
    application.close()


async def cleanup(app: App, unique: str) -> None:
    await delete(app, [f"q-{unique}"])
    await delete(app, [f"amqtask.beat.{app.main}.state"])
    await app.aclose()


class Sent:
    """A message beat sent, as read from the target queue."""

    def __init__(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        self.entry = str(headers[ENTRY_HEADER])
        self.slot = datetime.fromisoformat(str(headers[SLOT_HEADER]))
        self.task = str(headers["task"])
        self.id = str(headers["id"])
        self.received = time.time()
        self.headers = headers
        self.reply_to = message.reply_to

    def __repr__(self) -> str:
        return f"<{self.entry} {self.slot:%H:%M:%S}>"


class Inbox:
    """Everything beat sends to one queue, collected by a consumer of its own."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.messages: list[Sent] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(self.queue, durable=True)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.append(Sent(message))

    async def wait(self, count: int, timeout: float = 15.0) -> list[Sent]:
        async def enough() -> bool:
            return len(self.messages) >= count

        await eventually(enough, timeout, f"{count} messages in {self.queue}")
        return self.messages

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


@pytest.fixture
def inbox(broker_url: str, unique: str) -> Inbox:
    """An inbox for the test's default queue; :func:`run` starts and closes it around the scenario."""
    return Inbox(broker_url, f"q-{unique}")


@contextlib.asynccontextmanager
async def collecting(url: str, queue: str) -> AsyncIterator[Inbox]:
    """An :class:`Inbox` consuming ``queue`` (declared if need be) for the duration of the block."""
    box = Inbox(url, queue)
    await box.start()
    try:
        yield box
    finally:
        await box.close()


def slots_of(messages: list[Sent], entry: str) -> list[datetime]:
    return [m.slot for m in messages if m.entry == entry]


def assert_consecutive(slots: list[datetime], period: timedelta) -> None:
    assert slots == sorted(set(slots)), f"duplicate or out-of-order slots: {slots}"
    gaps = {later - earlier for earlier, later in itertools.pairwise(slots)}
    assert gaps <= {period}, f"slots missing: {slots}"


def run(scenario: Coroutine[Any, Any, T], inbox: Inbox | None = None) -> T:
    """Run ``scenario`` on a fresh event loop, with ``inbox`` consuming around it."""

    async def main() -> T:
        if inbox is not None:
            await inbox.start()
        try:
            return await scenario
        finally:
            if inbox is not None:
                await inbox.close()

    return asyncio.run(main())


def test_interval_entries_fire_on_time_with_the_delay_protocol(app: App, unique: str, broker_url: str) -> None:
    app.conf.beat_schedule = {"tick": {"task": "beat.tick", "schedule": 1.0, "args": [1], "kwargs": {"x": 2}}}

    async def scenario() -> None:
        scheduler = Scheduler(app)
        async with collecting(broker_url, f"q-{unique}") as box:
            runner = asyncio.create_task(scheduler.run())
            try:
                messages = await box.wait(3)
            finally:
                scheduler.stop()
                await runner
        assert_consecutive(slots_of(messages, "tick"), timedelta(seconds=1))
        for sent in messages:
            assert sent.slot.microsecond == 0  # interval slots are whole periods from the epoch
            assert 0 <= sent.received - sent.slot.timestamp() < 0.5, "sent late"
            assert sent.task == "beat.tick" and sent.headers["ignore_result"] is True and sent.reply_to is None
            assert sent.id == scheduler.entries["tick"].task_id(app.main, sent.slot)
        assert scheduler.states["tick"].sent_slot == messages[-1].slot
        await cleanup(app, unique)

    run(scenario())


def test_crontab_slots_on_a_settable_clock_across_the_dst_change(app: App, unique: str, inbox: Inbox) -> None:
    app.conf.timezone = "Europe/Berlin"
    app.add_periodic_task(crontab(minute="*/30", hour="1-3"), "beat.report", name="report")
    clock = Clock(T0)

    async def scenario() -> None:
        scheduler = Scheduler(app, clock=clock)
        assert await scheduler.acquire(timeout=10)
        fired = []
        try:
            while clock.now < T0 + timedelta(hours=5):
                clock.now += timedelta(minutes=10)
                fired += [f.slot for f in await scheduler.tick()]
        finally:
            await scheduler.close()
        berlin = [slot.astimezone(scheduler.entries["report"].schedule.effective_tz) for slot in fired]  # type: ignore[attr-defined]
        # 02:00 and 02:30 fire once, at their first occurrence (CEST); the repeated hour (CET) is skipped.
        assert [f"{moment:%H:%M %Z}" for moment in berlin] == [
            "01:00 CEST", "01:30 CEST", "02:00 CEST", "02:30 CEST", "03:00 CET", "03:30 CET",
        ]  # fmt: skip
        messages = await inbox.wait(len(fired))
        assert slots_of(messages, "report") == fired
        await cleanup(app, unique)

    run(scenario(), inbox)


def test_restart_catches_up_once_or_skips_and_never_fires_twice(app: App, unique: str, inbox: Inbox) -> None:
    app.conf.beat_schedule = {
        "once": {"task": "beat.once", "schedule": 60},
        "skip": {"task": "beat.skip", "schedule": 60, "catch_up": "skip"},
    }
    start = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    clock = Clock(start)

    async def lead_and_tick(*moments: datetime) -> list[tuple[str, datetime]]:
        scheduler = Scheduler(app, clock=clock)
        fired = []
        try:
            assert await scheduler.acquire(timeout=10)
            for moment in moments:
                clock.now = moment
                fired += [(f.entry, f.slot) for f in await scheduler.tick()]
        finally:
            await scheduler.close()
        return sorted(fired)

    def at(minute: int, second: int = 0) -> datetime:
        return datetime(2024, 5, 1, 12, minute, second, tzinfo=UTC)

    async def scenario() -> None:
        # First start: both entries are new, so they start at the next slot (12:01), not at once.
        assert await lead_and_tick(at(0, 40), at(1, 1)) == [("once", at(1)), ("skip", at(1))]
        # Down from 12:01 to 12:10:30; the restart sends "once" for the latest missed slot only and
        # drops the missed slots of "skip"; both go on at 12:11.
        clock.now = at(10, 30)
        assert await lead_and_tick(at(10, 30), at(11)) == [("once", at(10)), ("once", at(11)), ("skip", at(11))]
        # Restarted at the same moment: nothing is sent twice.
        clock.now = at(11, 0)
        assert await lead_and_tick(at(11, 0), at(11, 59)) == []
        messages = await inbox.wait(5)
        assert sorted((m.entry, m.slot) for m in messages) == [
            ("once", at(1)), ("once", at(10)), ("once", at(11)), ("skip", at(1)), ("skip", at(11)),
        ]  # fmt: skip
        await cleanup(app, unique)

    run(scenario(), inbox)


def test_two_schedulers_send_each_slot_once_and_hand_over_on_stop(broker_url: str, unique: str, inbox: Inbox) -> None:
    apps = [make_app(broker_url, unique) for _ in range(2)]
    for application in apps:
        application.conf.beat_schedule = {"tick": {"task": "beat.tick", "schedule": 1.0}}

    async def scenario() -> None:
        first, second = (Scheduler(application) for application in apps)
        runners = {first: asyncio.create_task(first.run())}
        await eventually(_true(lambda: first.leading), 10, "the first beat to lead")
        runners[second] = asyncio.create_task(second.run())
        await inbox.wait(3)
        assert first.leading and not second.leading
        first.stop()
        await runners[first]
        stopped = len(inbox.messages)
        await eventually(_true(lambda: second.leading), 5, "the standby to take over")
        messages = await inbox.wait(stopped + 2)
        second.stop()
        await runners[second]
        assert_consecutive(slots_of(messages, "tick"), timedelta(seconds=1))
        await cleanup(apps[0], unique)

    try:
        run(scenario(), inbox)
    finally:
        for application in apps:
            application.close()


async def recorded(app: App, slot: datetime) -> None:
    """Wait until the beat state in the broker records that "tick" was sent for ``slot``."""

    async def done() -> bool:
        found = await StateStore(app.runtime().broker, f"amqtask.beat.{app.main}.state").read(passive=True)
        sent = found.entries["tick"].sent_slot if found and "tick" in found.entries else None
        return sent is not None and sent >= slot

    await eventually(done, 5, f"the state to record {slot}")


def _true(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


def test_a_leader_cut_off_stops_sending_and_another_takes_over(
    broker_url: str, unique: str, inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A black hole (only heartbeats tell), then a reset with no way back (the broker notices at once)."""
    caplog.set_level(logging.INFO, "amqtask")
    with FaultProxy.for_url(broker_url) as proxy:
        cut_off = make_app(proxy.url(broker_url), unique, broker_heartbeat_s=1)
        standby_app = make_app(broker_url, unique)
        for application in (cut_off, standby_app):
            application.conf.beat_schedule = {"tick": {"task": "beat.tick", "schedule": 1.0}}

        async def scenario() -> dict[str, float]:
            leader, standby = Scheduler(cut_off), Scheduler(standby_app)
            runners = [asyncio.create_task(leader.run())]
            await eventually(_true(lambda: leader.leading), 10, "the beat behind the proxy to lead")
            runners.append(asyncio.create_task(standby.run()))
            takeovers = {}
            try:
                await inbox.wait(len(inbox.messages) + 2)
                assert leader.leading and not standby.leading
                # Faults come after the last send is recorded, outside the at-least-once window
                # (test_a_crash_between_send_and_state_write... covers that window).
                await recorded(standby_app, inbox.messages[-1].slot)
                # 1. A black hole: the broker drops the silent connection after its heartbeat timeout,
                # and whichever beat tries first then (the standby, or the old leader reconnected) leads.
                led_since, cut = leader.leader_since, time.monotonic()
                proxy.stall()
                await eventually(
                    _true(lambda: standby.leading or (leader.leading and leader.leader_since != led_since)),
                    10,
                    "a beat to lead again after the black hole",
                )
                takeovers["black hole"] = time.monotonic() - cut
                proxy.resume()  # what the cut-off leader sent meets a connection the broker has closed
                await inbox.wait(len(inbox.messages) + 1)
                if standby.leading:  # hand the lock back to the beat behind the proxy
                    standby.stop()
                    await runners.pop()
                    await eventually(_true(lambda: leader.leading), 10, "the proxied beat to lead again")
                    standby = Scheduler(standby_app)
                    runners.append(asyncio.create_task(standby.run()))
                await inbox.wait(len(inbox.messages) + 1)
                await recorded(standby_app, inbox.messages[-1].slot)
                # 2. A reset with the proxy gone: the leader stops at once, the standby takes over.
                cut = time.monotonic()
                proxy.close()
                await eventually(_true(lambda: not leader.leading), 1, "the leader to stop sending")
                await eventually(_true(lambda: standby.leading), 5, "the standby to take over")
                takeovers["reset"] = time.monotonic() - cut
                await inbox.wait(len(inbox.messages) + 2)
            finally:
                for scheduler in (leader, standby):
                    scheduler.stop()
                await asyncio.gather(*runners)
            slots = slots_of(inbox.messages, "tick")
            assert slots == sorted(set(slots)), f"a slot was sent twice: {slots}"
            await cleanup(standby_app, unique)
            return takeovers

        try:
            takeovers = run(scenario(), inbox)
        finally:
            cut_off.close()
            standby_app.close()
    print("new leader after: " + ", ".join(f"{fault} {seconds:.2f}s" for fault, seconds in takeovers.items()))
    assert takeovers["reset"] < 1.0  # the lock is free at once; the standby tries every 0.2 s
    assert takeovers["black hole"] < 5.0  # heartbeat 1 s


def test_schedule_file_changes_are_picked_up(app: App, unique: str, inbox: Inbox, tmp_path: Path) -> None:
    schedule = tmp_path / "beat.toml"
    schedule.write_text('[entries.hourly]\ntask = "beat.hourly"\nevery = "1h"\n')

    async def scenario() -> None:
        scheduler = Scheduler(app, schedule_file=schedule)
        runner = asyncio.create_task(scheduler.run())
        try:
            await eventually(_true(lambda: scheduler.leading), 10, "beat to lead")
            schedule.write_text(
                '[entries.hourly]\ntask = "beat.hourly"\nevery = "1h"\n\n'
                '[entries.fast]\ntask = "beat.fast"\nevery = "1s"\nargs = [1]\n'
            )
            await inbox.wait(1)
            schedule.write_text("[entries.broken\n")  # invalid: logged, the previous schedule stays
            watcher = scheduler.catalog.watcher
            await eventually(_true(lambda: watcher and watcher.error), 5, "the bad file")
            count = len(inbox.messages)
            messages = await inbox.wait(count + 2)
        finally:
            scheduler.stop()
            await runner
        assert {m.entry for m in messages} == {"fast"}
        assert_consecutive(slots_of(messages, "fast"), timedelta(seconds=1))
        await cleanup(app, unique)

    run(scenario(), inbox)


def test_a_failed_send_is_retried_until_it_goes_through(
    app: App, unique: str, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    exchange, queue = f"x-{unique}", f"routed-{unique}"
    app.conf.beat_schedule = {
        "routed": {"task": "beat.routed", "schedule": 3600, "options": {"exchange": exchange, "routing_key": "k"}}
    }
    clock = Clock(datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC))

    async def scenario() -> None:
        scheduler = Scheduler(app, clock=clock)
        runner = asyncio.create_task(scheduler.run())
        try:
            await eventually(_true(lambda: scheduler.leading), 10, "beat to lead")
            clock.now = datetime(2024, 5, 1, 13, 0, 5, tzinfo=UTC)
            scheduler.wake()
            await eventually(_true(lambda: "failed (attempt 1)" in caplog.text), 5, "the failed send")
            # The exchange is missing; create it and a queue, and the retry (after 1 s) goes through.
            box = Inbox(broker_url, queue)
            await box.start()
            connection = await aio_pika.connect(broker_url)
            async with connection:
                channel = await connection.channel()
                declared = await channel.declare_exchange(exchange, durable=True)
                bound = await channel.declare_queue(queue, durable=True)
                await bound.bind(declared, "k")
            messages = await box.wait(1)
            await box.close()
        finally:
            scheduler.stop()
            await runner
        assert [(m.entry, m.slot) for m in messages] == [("routed", datetime(2024, 5, 1, 13, tzinfo=UTC))]
        assert "after earlier failures" in caplog.text
        await delete(app, [queue], [exchange])
        await cleanup(app, unique)

    caplog.set_level(logging.INFO, "amqtask")
    run(scenario())


def test_a_crash_between_send_and_state_write_repeats_the_slot_with_the_same_id(
    app: App, unique: str, inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented at-least-once window: the repeat is recognisable by its task id."""
    app.conf.beat_schedule = {"tick": {"task": "beat.tick", "schedule": 60}}
    clock = Clock(datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC))

    async def scenario() -> None:
        crashing = Scheduler(app, clock=clock)
        assert await crashing.acquire(timeout=10)
        clock.now = datetime(2024, 5, 1, 12, 1, 1, tzinfo=UTC)

        async def crash(*_: Any) -> None:
            raise SystemExit("killed between the confirm and the state write")

        with monkeypatch.context() as patch:
            patch.setattr(StateStore, "write", crash)
            with pytest.raises(SystemExit):
                await crashing.tick()
        await crashing.close()
        successor = Scheduler(app, clock=clock)
        assert await successor.acquire(timeout=10)
        repeated = await successor.tick()
        await successor.close()
        first, second = await inbox.wait(2)
        assert first.slot == second.slot == repeated[0].slot
        assert first.id == second.id == repeated[0].task_id
        await cleanup(app, unique)

    run(scenario(), inbox)
