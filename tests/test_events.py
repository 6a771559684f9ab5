"""Celery-compatible events: compared field by field with a real Celery 5.7 worker's, and read by Celery's
own ``EventReceiver`` from a running amqtask worker.

``tests/fixtures/celery_events/events.json`` was captured by ``capture.py`` beside it from
``celery worker -E``: the same routing keys, field names, properties and value types are expected here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from celery import Celery
from celery.utils.time import utcoffset as celery_utcoffset
from support.proxy import FaultProxy
from support.queues import cleanup, eventually
from support.workers import running_worker, wait_for

from amqtask import App, Reject, Worker
from amqtask.monitoring import event_middleware, receiver
from amqtask.monitoring import events as events_module
from amqtask.monitoring.events import EventPublisher
from amqtask.protocol import TaskMessage

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "celery_events" / "events.json"
STANDARD = {"hostname", "utcoffset", "pid", "clock", "timestamp", "type"}


def celery_events() -> list[dict[str, Any]]:
    """Every event of the fixture, unpacked from ``task.multi`` batches, in the order sent."""
    found: list[dict[str, Any]] = []
    for record in json.loads(FIXTURE.read_text())["events"]:
        body = record["event"]
        found.extend(body if isinstance(body, list) else [body])
    return found


def celery_fields() -> dict[str, set[str]]:
    """Field names per event type, as Celery sends them."""
    return {event["type"]: set(event) for event in celery_events()}


def celery_examples() -> dict[str, dict[str, Any]]:
    """The first event of each type, as Celery sends it."""
    examples: dict[str, dict[str, Any]] = {}
    for event in celery_events():
        examples.setdefault(event["type"], event)
    return examples


def test_task_events_are_json_whatever_the_message_holds() -> None:
    # The fields of task events are written as JSON text, not by json.dumps: anything a hostile or merely
    # unusual message carries must come out as the same string, and the whole as one valid JSON list.
    odd = 'quote" back\\slash\nline \u2028 \x00 \x7f é 😀 </script> {"x": 1},'
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    message = TaskMessage(task=odd, id=odd, args=[], kwargs={}, argsrepr=odd, kwargsrepr=odd, root_id=odd,
                          parent_id=None, retries=7, eta=moment, expires=None)  # fmt: skip
    publisher = EventPublisher(cast(Any, None), odd)
    batch = json.loads("[" + ",".join([
        publisher.text("task-received", event_middleware._task_members(message)),
        publisher.text("task-succeeded", f'"uuid":{events_module.json_string(odd)},"runtime":{1e-05!r},'),
    ]) + "]")  # fmt: skip
    received, succeeded = batch
    assert received == {
        "uuid": odd, "name": odd, "args": odd, "kwargs": odd, "root_id": odd, "parent_id": None, "retries": 7,
        "eta": moment.isoformat(), "expires": None, "type": "task-received", "hostname": odd, "pid": os.getpid(),
        "utcoffset": events_module.utcoffset(), "clock": 1, "timestamp": received["timestamp"],
    }  # fmt: skip
    assert succeeded["runtime"] == 1e-05 and succeeded["clock"] == 2 and succeeded["hostname"] == odd
    assert abs(received["timestamp"] - time.time()) < 60


def test_utcoffset_is_celerys() -> None:
    assert events_module.utcoffset() == celery_utcoffset()


def test_routing_keys_and_properties_are_celerys() -> None:
    records = json.loads(FIXTURE.read_text())["events"]
    for record in records:
        body = record["event"]
        expected = "task.multi" if isinstance(body, list) else events_module.routing_key(body["type"])
        assert record["routing_key"] == expected
        assert record["exchange"] == events_module.EXCHANGE
        assert record["properties"]["delivery_mode"] == 1
        assert record["properties"]["content_type"] == "application/json"
        assert record["headers"] == {"hostname": (body[0] if isinstance(body, list) else body)["hostname"]}


# ---------------------------------------------------------------------------------------------- broker


class Tap:
    """Celery's own ``EventReceiver`` in a thread, collecting every event it is handed."""

    def __init__(self, broker_url: str) -> None:
        self.celery = Celery("tap", broker=broker_url)
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        with self.celery.connection_for_read() as connection:
            receiver = self.celery.events.Receiver(connection, handlers={"*": self.events.append})
            receiver.on_consume_ready = lambda *args, **kwargs: self.ready.set()
            self.receiver = receiver
            receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> None:
        self._thread.start()
        # Bound before anything is sent: the broker drops events nobody has bound a queue for.
        assert self.ready.wait(30), "Celery's event receiver did not start consuming"

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self._thread.join(10)
        self.celery.close()

    def of(self, task_id: str) -> list[str]:
        """The worker's events of one task, in order (``task-sent`` comes from another connection, so
        it may arrive before or after them)."""
        return [e["type"] for e in self.events if e.get("uuid") == task_id and e["type"] != "task-sent"]

    def sent(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("uuid") == task_id and e["type"] == "task-sent"]


@contextlib.contextmanager
def tapping(broker_url: str) -> Iterator[Tap]:
    tap = Tap(broker_url)
    tap.start()
    try:
        yield tap
    finally:
        tap.stop()


def event_app(broker_url: str, queue: str) -> App:
    app = App("events", broker=broker_url, task_default_queue=queue, worker_send_task_events=True)

    @app.task(name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.fail")
    def fail() -> None:
        raise ValueError("x")

    @app.task(name="tasks.flaky", bind=True, max_retries=1)
    def flaky(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0, exc=KeyError("again"))
        return "ok"

    @app.task(name="tasks.refuse")
    def refuse() -> None:
        raise Reject("no", requeue=False)

    return app


@pytest.mark.broker
def test_celery_receiver_sees_every_event_in_order(broker_url: str, unique: str) -> None:
    worker_app = event_app(broker_url, unique)
    client = App("client", broker=broker_url, task_default_queue=unique, task_send_sent_event=True)
    hostname = f"{unique}@events"
    revoked_id = str(uuid.uuid4())

    async def scenario() -> dict[str, str]:
        worker = Worker(worker_app, hostname=hostname, concurrency=1)
        await worker.start()
        try:
            await client.control.arevoke(revoked_id, destination=[hostname], reply=True, timeout=10)
            ids = {}
            for name, args in (("add", (4, 4)), ("fail", ()), ("flaky", ()), ("refuse", ())):
                ids[name] = (await client.asend_task(f"tasks.{name}", args)).id
            await client.asend_task("tasks.add", (1, 1), task_id=revoked_id)
            ids["revoked"] = revoked_id
            finals = {"add": "task-succeeded", "fail": "task-failed", "flaky": "task-succeeded",
                      "refuse": "task-rejected", "revoked": "task-revoked"}  # fmt: skip
            for name, final in finals.items():
                await asyncio.to_thread(wait_for, lambda: final in tap.of(ids[name]), 10, final)  # noqa: B023
        finally:
            await worker.stop(grace=5)
            await client.aclose()
        return ids

    with tapping(broker_url) as tap:
        ids = asyncio.run(asyncio.wait_for(scenario(), 60))
        wait_for(lambda: any(e["type"] == "worker-offline" for e in tap.events), 10, "worker-offline")

    mine = [e for e in tap.events if e["hostname"] == hostname]
    assert mine[0]["type"] == "worker-online"
    assert mine[-1]["type"] == "worker-offline"
    assert tap.of(ids["add"]) == ["task-received", "task-started", "task-succeeded"]
    assert tap.of(ids["fail"]) == ["task-received", "task-started", "task-failed"]
    assert tap.of(ids["flaky"]) == ["task-received", "task-started", "task-retried",
                                    "task-received", "task-started", "task-succeeded"]  # fmt: skip
    assert tap.of(ids["refuse"]) == ["task-received", "task-started", "task-rejected"]
    assert tap.of(ids["revoked"]) == ["task-revoked"]
    assert {name: len(tap.sent(task_id)) for name, task_id in ids.items()} == dict.fromkeys(ids, 1)

    # Field names exactly as Celery sends them (plus the receiver's own local_received).
    reference = celery_fields()
    for event in tap.events:
        if event.get("hostname") in (hostname,) or event["type"] == "task-sent":
            assert set(event) - {"local_received"} == reference.get(event["type"], set(event) - {"local_received"}) | (
                STANDARD
            ), event["type"]
    # ...and value types too, where Celery's has a value (amqtask writes the task events' JSON itself).
    examples = celery_examples()
    for event in mine:
        for name, value in examples.get(event["type"], {}).items():
            if value is not None and event[name] is not None:
                assert type(event[name]) is type(value), (event["type"], name)
    by_type = {e["type"]: e for e in mine if e.get("uuid") == ids["add"]}
    assert by_type["task-received"]["name"] == "tasks.add"
    assert by_type["task-received"]["args"] == "(4, 4)"
    assert by_type["task-succeeded"]["result"] == "8"
    assert 0 < by_type["task-succeeded"]["runtime"] < 5
    failed = next(e for e in mine if e["type"] == "task-failed")
    assert failed["exception"] == "ValueError('x')"
    assert "raise ValueError" in failed["traceback"]
    sent = tap.sent(ids["add"])[0]
    assert (sent["queue"], sent["routing_key"], sent["exchange"]) == (unique, unique, "")
    clocks = [e["clock"] for e in mine]
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)
    assert all(e["utcoffset"] == celery_utcoffset() and abs(e["timestamp"] - time.time()) < 120 for e in mine)


class RawTap:
    """The bodies on ``celeryev`` as sent, with their routing keys (what Celery's receiver unpacks)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []

    async def bind(self, broker: Any) -> Any:
        channel = await broker.channel(confirms=False)
        exchange = await channel.declare_exchange(events_module.EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")

        async def keep(message: Any) -> None:
            self.messages.append((message.routing_key, json.loads(message.body)))

        await queue.consume(keep, no_ack=True)
        return channel


@pytest.mark.broker
def test_a_busy_worker_batches_task_events_and_loses_none_when_it_stops_at_once(broker_url: str, unique: str) -> None:
    # Tasks waiting when the worker starts: their events leave as lists of many under task.multi, which
    # Celery's receiver (so Flower) unpacks in order; the worker stops the moment the last task ran, while
    # its last events are still gathering for their batch, and they are sent all the same.
    app = event_app(broker_url, unique)
    hostname = f"{unique}@burst"
    raw = RawTap()
    count = 40

    async def scenario() -> list[str]:
        channel = await raw.bind(app.runtime().broker)
        try:
            ids = [(await app.asend_task("tasks.add", (n, 1))).id for n in range(count)]
            worker = Worker(app, hostname=hostname, concurrency=4, burst=True)  # stops once the queue is empty
            await worker.run()
            assert worker.stats["succeeded"] == count
            await asyncio.to_thread(wait_for, lambda: ("worker.offline" in {key for key, _ in raw.messages}), 10,
                                    "worker.offline, raw")  # fmt: skip
            return ids
        finally:
            await channel.close()
            await cleanup(app, [unique])

    with tapping(broker_url) as tap:
        ids = asyncio.run(asyncio.wait_for(scenario(), 60))
        wait_for(lambda: any(e["type"] == "worker-offline" and e["hostname"] == hostname for e in tap.events), 10,
                 "worker-offline")  # fmt: skip

    for task_id in ids:
        assert tap.of(task_id) == ["task-received", "task-started", "task-succeeded"], task_id
    mine = [e for e in tap.events if e["hostname"] == hostname]
    assert [e["clock"] for e in mine] == sorted(e["clock"] for e in mine)
    assert mine[-1]["type"] == "worker-offline"

    task_bodies = [body for key, body in raw.messages if key.startswith("task.")]
    assert {key for key, _ in raw.messages if key.startswith("task.")} == {"task.multi"}
    assert all(isinstance(body, list) for body in task_bodies)
    assert sum(map(len, task_bodies)) == 3 * count
    assert len(task_bodies) < count  # batches of several tasks' events, not a message or three per task
    assert {key for key, body in raw.messages if not key.startswith("task.")} >= {"worker.online", "worker.offline"}
    assert all(isinstance(body, dict) for key, body in raw.messages if key.startswith("worker."))


@pytest.mark.broker
def test_a_producer_that_closes_right_after_sending_has_sent_its_task_sent(broker_url: str, unique: str) -> None:
    # The stall once seen in the batch pump was this: a producer's loop ended (aclose, asyncio.run returning)
    # within the pump's 0.1 s gathering period, which cancelled the pump with task-sent still in its batch.
    client = App("client", broker=broker_url, task_default_queue=unique, task_send_sent_event=True)

    async def send_and_leave() -> str:
        try:
            return (await client.asend_task("tasks.add", (1, 2))).id
        finally:
            await cleanup(client, [unique])

    with tapping(broker_url) as tap:
        task_id = asyncio.run(send_and_leave())
        wait_for(lambda: tap.sent(task_id), 10, "task-sent")
    assert [event["name"] for event in tap.sent(task_id)] == ["tasks.add"]


@pytest.mark.broker
def test_a_producer_sending_from_many_event_loops_keeps_no_publisher_of_the_finished_ones(
    broker_url: str, unique: str
) -> None:
    # Each asyncio.run has a broker of its own; its task-sent publisher must go with it (it used to be kept,
    # with the broker, for as long as the app lived: one connection's worth of objects per loop).
    client = App("client", broker=broker_url, task_default_queue=unique, task_send_sent_event=True)

    def alive() -> set[int]:
        gc.collect()
        return {id(thing) for thing in gc.get_objects() if isinstance(thing, EventPublisher)}

    async def send_once() -> int:
        try:
            await client.asend_task("tasks.add", (1, 2))
            return len(alive() - before)
        finally:
            await cleanup(client, [unique])

    before = alive()
    during = [asyncio.run(send_once()) for _ in range(5)]
    assert during == [1] * 5  # each loop had its publisher...
    assert alive() - before == set()  # ...and none outlived its loop


@pytest.mark.fault
@pytest.mark.broker
def test_the_event_stream_goes_on_after_its_connection_is_lost(broker_url: str, unique: str) -> None:
    # Read by `amqtask events` and `amqtask top`: before, the stream went silent for good after a reconnect.
    with FaultProxy.for_url(broker_url) as proxy:
        reader = App("reader", broker=proxy.url(broker_url))
        sender = App("sender", broker=broker_url)
        seen: list[str] = []

        async def scenario() -> None:
            bound = asyncio.Event()

            async def collect() -> None:
                async for event in receiver.stream(reader.runtime().broker, ready=bound.set):
                    seen.append(event["hostname"])

            reading = asyncio.create_task(collect())
            await bound.wait()
            try:
                for moment in ("before", "after"):
                    publisher = EventPublisher(sender.runtime().broker, f"{unique}@{moment}")

                    async def arrived(publisher: EventPublisher = publisher) -> bool:
                        await publisher.send_now("worker-heartbeat", freq=2.0)
                        return publisher.hostname in seen

                    await eventually(arrived, 30, f"an event {moment} the connection was lost")
                    await publisher.close()
                    if moment == "before":
                        assert proxy.drop() >= 1
                assert not reading.done()
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
                await reader.aclose()
                await sender.aclose()

        asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.fault
@pytest.mark.broker
def test_a_workers_events_go_on_after_its_connections_are_cut(
    broker_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Task events travel on a connection of their own (as a Celery worker's do): it must come back too.
    caplog.set_level(logging.WARNING, logger="amqtask.connection")
    with FaultProxy.for_url(broker_url) as proxy:
        app = event_app(proxy.url(broker_url), unique)
        client = App("client", broker=broker_url, task_default_queue=unique)
        hostname = f"{unique}@cut"

        async def scenario() -> list[str]:
            worker = Worker(app, hostname=hostname)
            await worker.start()
            ids = []
            try:
                for moment in ("before", "after"):
                    result = await client.asend_task("tasks.add", (2, 2))
                    assert await result.aget(timeout=30) == 4
                    ids.append(result.id)
                    await asyncio.to_thread(
                        wait_for, lambda: "task-succeeded" in tap.of(result.id), 30,  # noqa: B023
                        f"task events {moment} the cut")  # fmt: skip
                    if moment == "before":
                        assert proxy.open_links >= 2  # the worker's task connection and its events connection
                        assert proxy.drop() >= 2
            finally:
                await worker.stop(grace=5)
                await cleanup(client, [unique])
            return ids

        with tapping(broker_url) as tap:
            ids = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert [tap.of(task_id) for task_id in ids] == [["task-received", "task-started", "task-succeeded"]] * 2
    # One warning per lost connection of the worker: its events connection's loss is the same news.
    lost = [record.getMessage() for record in caplog.records if "lost its broker connection" in record.getMessage()]
    assert lost and not [message for message in lost if "-events-" in message], lost


@pytest.mark.broker
def test_heartbeats_every_two_seconds_and_field_types_match_celerys(broker_url: str, unique: str) -> None:
    app = event_app(broker_url, unique)
    hostname = f"{unique}@beat"

    async def scenario() -> None:
        worker = Worker(app, hostname=hostname)
        await worker.start()
        try:
            await asyncio.to_thread(
                wait_for, lambda: sum(e["type"] == "worker-heartbeat" and e["hostname"] == hostname
                                      for e in tap.events) >= 2, 10, "two heartbeats")  # fmt: skip
        finally:
            await worker.stop(grace=5)

    with tapping(broker_url) as tap:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    beats = [e for e in tap.events if e["type"] == "worker-heartbeat" and e["hostname"] == hostname]
    assert 1.5 < beats[1]["timestamp"] - beats[0]["timestamp"] < 3.5
    celery_beat = next(e for e in celery_events() if e["type"] == "worker-heartbeat")
    for name, value in celery_beat.items():
        assert type(beats[0][name]) is type(value), name
    assert beats[0]["freq"] == 2.0 and beats[0]["sw_ident"] == "py-amqtask"


@pytest.mark.broker
def test_no_events_and_no_queue_when_off(broker_url: str, unique: str) -> None:
    app = event_app(broker_url, unique)
    app.conf.worker_send_task_events = False
    hostname = f"{unique}@quiet"

    async def scenario() -> None:
        worker = Worker(app, hostname=hostname)
        await worker.start()
        try:
            assert await (await app.asend_task("tasks.add", (1, 2))).aget(timeout=10) == 3
            assert app.middleware and not any(getattr(m, "workers", {}).get(worker) for m in app.middleware)
        finally:
            await worker.stop(grace=5)

    with tapping(broker_url) as tap:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [e for e in tap.events if e["hostname"] == hostname] == []


@pytest.mark.broker
def test_a_worker_with_events_on_binds_no_queue_so_nothing_accumulates_when_nobody_listens(
    broker_url: str, unique: str, rabbitmq: Any, broker_vhost: str
) -> None:
    app = event_app(broker_url, unique)

    async def scenario() -> None:
        worker = Worker(app, hostname=f"{unique}@alone")
        await worker.start()
        try:
            for number in range(20):
                assert await (await app.asend_task("tasks.add", (number, 1))).aget(timeout=10) == number + 1
        finally:
            await worker.stop(grace=5)
            await cleanup(app, [unique])

    asyncio.run(asyncio.wait_for(scenario(), 60))
    bindings = rabbitmq.ctl("list_bindings", "-p", broker_vhost, "--quiet", "--no-table-headers", "source_name")
    assert events_module.EXCHANGE not in bindings.split()  # the broker dropped every event


def test_events_are_dropped_not_hoarded_while_nobody_can_take_them() -> None:
    app = App("drop", broker="amqp://guest:guest@127.0.0.1:1//", broker_connect_timeout_s=0.2, publish_timeout_s=0.3)

    async def scenario() -> None:
        publisher = EventPublisher(app.runtime().broker, "drop@host")
        for _ in range(events_module.MAX_PENDING + 50):
            publisher.send("task-started", uuid="x")
        assert len(publisher._pending) <= events_module.MAX_PENDING
        await publisher.close()
        await app.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.broker
def test_enable_and_disable_events_by_remote_control_as_celery_and_flower_ask(broker_url: str, unique: str) -> None:
    app = event_app(broker_url, unique)
    app.conf.worker_send_task_events = False
    hostname = f"{unique}@switch"
    celery = Celery("switch", broker=broker_url)

    def task_events() -> list[str]:
        return [e["type"] for e in tap.events if e["hostname"] == hostname and e["type"].startswith("task-")]

    async def scenario() -> None:
        worker = Worker(app, hostname=hostname)
        await worker.start()
        try:
            assert await (await app.asend_task("tasks.add", (1, 2))).aget(timeout=10) == 3
            enable = celery.control.enable_events
            replies = await asyncio.to_thread(enable, destination=[hostname], reply=True, timeout=10)
            assert replies == [{hostname: {"ok": "task events enabled"}}]
            assert await (await app.asend_task("tasks.add", (2, 2))).aget(timeout=10) == 4
            await asyncio.to_thread(wait_for, lambda: "task-succeeded" in task_events(), 10, "task events")
            disable = celery.control.disable_events
            replies = await asyncio.to_thread(disable, destination=[hostname], reply=True, timeout=10)
            assert replies == [{hostname: {"ok": "task events disabled"}}]
            assert await (await app.asend_task("tasks.add", (3, 2))).aget(timeout=10) == 5
        finally:
            await worker.stop(grace=5)

    with tapping(broker_url) as tap:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        wait_for(lambda: any(e["type"] == "worker-offline" and e["hostname"] == hostname for e in tap.events), 10)
    celery.close()
    # Only the task run while events were on; heartbeats went on after disable_events, as Celery's do.
    assert task_events() == ["task-received", "task-started", "task-succeeded"]


def test_describe_prints_one_line_per_event() -> None:
    event = {"type": "task-succeeded", "hostname": "w@h", "uuid": "id-1", "result": "8", "runtime": 0.004,
             "timestamp": 0.0, "clock": 3}  # fmt: skip
    line = receiver.describe(event)
    assert line.endswith(" w@h task-succeeded id-1 result=8 runtime=0.004")
    assert receiver.describe({"type": "worker-heartbeat", "hostname": "w@h"}) == "- w@h worker-heartbeat"


@pytest.mark.broker
def test_events_command_prints_the_stream_as_json(broker_url: str, unique: str) -> None:
    app = event_app(broker_url, unique)
    hostname = f"{unique}@cli"
    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "amqtask", "events", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None and process.stdout is not None
        assert "listening" in process.stderr.readline()

        async def scenario() -> str:
            async with running_worker(app, hostname=hostname):
                result = await app.asend_task("tasks.add", (4, 4))
                # Ran before the worker stops: a stop hands back a delivery that has not started, with no events.
                assert await result.aget(timeout=20) == 8
                return result.id

        task_id = asyncio.run(asyncio.wait_for(scenario(), 30))
        seen: list[dict[str, Any]] = []
        while not any(e["type"] == "worker-offline" and e["hostname"] == hostname for e in seen):
            seen.append(json.loads(process.stdout.readline()))
    finally:
        process.terminate()
        process.communicate(timeout=10)
    mine = [e["type"] for e in seen if e.get("uuid") == task_id]
    assert mine == ["task-received", "task-started", "task-succeeded"], seen
    assert next(e["type"] for e in seen if e["hostname"] == hostname) == "worker-online", seen
