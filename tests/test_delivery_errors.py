"""No message can make a worker redeliver it in a loop (issue 11, item 1).

An error while handling a delivery is either transient (the broker would not take a send for now:
the delivery is requeued after a growing pause) or about the message (it is dead-lettered with a
reason, its caller gets a FAILURE, and it is acked once). Each trigger below used to end in an
immediate ``reject(requeue=True)``, and on a classic queue in the same delivery coming back forever.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from support.queues import delete, eventually
from support.workers import get_raw, running_worker

from amqtask import App, AsyncResult, Reject, RemoteTaskError, Task, protocol, serializers, topology
from amqtask.producer import to_amqp

pytestmark = pytest.mark.broker

FAR_FUTURE = "9999-12-31T23:59:59"  # valid, as a Celery client writes an eta: naive, meaning UTC


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"errors-{unique}", broker=broker_url, task_default_queue=f"{unique}-q")

    @application.task(name="errors.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield application
    application.close()


def _header(message: aio_pika.abc.AbstractIncomingMessage, name: str) -> str:
    value = (message.headers or {})[name]
    return value.decode() if isinstance(value, bytes) else str(value)


async def _send_raw(app: App, queue: str, name: str, args: list[Any], **headers: Any) -> AsyncResult[Any]:
    """Publish a task message as another client would (extra ``headers`` on top), with a reply address."""
    await app.runtime().results.ensure_started()
    message, _, codec = app.build_message(name, args, {}, None, {})
    wire = protocol.encode_task(message, serializers.codec(codec))
    wire.headers.update(headers)
    connection = await aio_pika.connect(app.conf.broker_url[0])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(to_amqp(wire), queue)
    return AsyncResult(message.id, app)


async def _dead_lettered(
    app: App, result: AsyncResult[Any], match: str, exc_type: str, reason: str
) -> aio_pika.abc.AbstractIncomingMessage:
    """The caller gets ``exc_type`` (its message matching ``match``) and the message is in the DLQ with
    ``reason`` and that exception; returns the DLQ copy."""
    with pytest.raises(RemoteTaskError, match=match) as error:
        await result.aget(timeout=15)
    assert error.value.exc_type == exc_type
    dead = await get_raw(app.conf.broker_url[0], app.conf.task_default_queue + ".dlq")
    assert dead.correlation_id == result.id
    assert (_header(dead, "x-amqtask-reason"), _header(dead, "x-amqtask-exception-type")) == (reason, exc_type)
    return dead


def _run(app: App, queue: str, scenario: Any) -> None:
    async def main() -> None:
        try:
            await scenario()
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(main())


def test_a_far_future_eta_is_dead_lettered_once_and_its_caller_gets_the_error(app: App) -> None:
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        async with running_worker(app, concurrency=2) as worker:
            result = await _send_raw(app, queue, "errors.add", [1, 2], eta=FAR_FUTURE)
            match = r"longer than .* delay levels can hold"
            dead = await _dead_lettered(app, result, match, "DelayRangeError", "eta-out-of-range")
            assert _header(dead, "eta") == FAR_FUTURE  # the copy is the message as received
            # Handled once, and the worker still serves.
            assert await (await app.asend_task("errors.add", (2, 3))).aget(timeout=10) == 5
            assert worker.stats["dead_lettered"] == 1

    _run(app, queue, scenario)


def test_an_eta_on_a_queue_too_long_for_delay_routing_is_dead_lettered(broker_url: str, unique: str) -> None:
    # 28 delay levels take 56 bytes of a 255-byte routing key: a 220-byte queue name cannot be delayed.
    queue = f"{unique}-" + "x" * (220 - len(unique) - 1)
    app = App(f"errors-{unique}", broker=broker_url, task_default_queue=queue)
    app.task(name="errors.add")(lambda x, y: x + y)
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()

    async def scenario() -> None:
        async with running_worker(app, concurrency=2) as worker:
            result = await _send_raw(app, queue, "errors.add", [1, 2], eta=soon)
            await _dead_lettered(app, result, "too long to be delayed", "ConfigurationError", "worker-error")
            assert worker.stats["dead_lettered"] == 1

    try:
        _run(app, queue, scenario)
    finally:
        app.close()


@pytest.mark.parametrize(
    "retry",
    [
        {"countdown": 10**12},
        {"countdown": float("inf")},
        {"eta": dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)},
    ],
    ids=["countdown-1e12", "countdown-inf", "eta-9999"],
)
def test_a_retry_beyond_the_delay_levels_fails_the_task_once(app: App, retry: dict[str, Any]) -> None:
    queue = app.conf.task_default_queue
    runs: list[int] = []

    @app.task(name="errors.retry_far", bind=True, max_retries=None)
    def retry_far(self: Task[[], Any]) -> None:
        runs.append(self.request.retries)
        raise self.retry(exc=ConnectionError("later"), **retry)

    async def scenario() -> None:
        async with running_worker(app, concurrency=2):
            result = await retry_far.adelay()
            dead = await _dead_lettered(app, result, "could not be retried", "RetryFailedError", "failed")
            assert "delay" in _header(dead, "x-amqtask-exception-message")
        assert runs == [0]

    _run(app, queue, scenario)


def test_a_retry_whose_headers_no_longer_fit_in_a_frame_fails_the_task_once(app: App) -> None:
    queue = app.conf.task_default_queue
    runs: list[int] = []

    @app.task(name="errors.retry_now", bind=True, max_retries=None)
    def retry_now(self: Task[[], Any]) -> None:
        runs.append(self.request.retries)
        raise self.retry(countdown=0)

    async def scenario() -> None:
        async with running_worker(app, concurrency=2):
            # Headers RabbitMQ takes (under its 128 KiB frame) but too close to the limit to be sent again.
            result = await _send_raw(app, queue, "errors.retry_now", [], **{"x-padding": "p" * 127_500})
            match = r"could not be retried.*more than fits in one AMQP frame"
            dead = await _dead_lettered(app, result, match, "RetryFailedError", "failed")
            assert "x-amqtask-headers-dropped" in (dead.headers or {})
        assert runs == [0]

    _run(app, queue, scenario)


def test_a_send_the_broker_refuses_for_now_requeues_the_delivery_after_growing_pauses(
    app: App, broker_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Transient: the task's follow-up goes to a queue that refuses every message (full, reject-publish).

    Nothing is wrong with the message, so it is not dead-lettered: it goes back to its queue after a
    pause that doubles each time, and once the broker takes the follow-up, everything goes through.
    """
    queue, full = app.conf.task_default_queue, f"{unique}-full"
    app.conf.publish_timeout_s = 0.5
    runs: list[int] = []

    @app.task(name="errors.count")
    def count(n: int) -> int:
        runs.append(n)
        return n

    async def declare_full(refusing: bool) -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(full)
            arguments = {"x-max-length": 0, "x-overflow": "reject-publish"} if refusing else None
            await channel.declare_queue(full, durable=True, arguments=arguments)

    async def scenario() -> None:
        await declare_full(refusing=True)
        async with running_worker(app, concurrency=1):
            follow_up = count.s(2).set(queue=full)
            result = await count.aapply_async((1,), link=follow_up)
            await eventually_runs(runs, 4)
            await declare_full(refusing=False)
            assert await result.aget(timeout=30) == 1
            assert (await get_raw(broker_url, full)).correlation_id is not None
        broker = app.runtime().broker
        assert await topology.queue_depth(broker, queue + ".dlq") == 0

    caplog.set_level(logging.WARNING, logger="amqtask.worker")
    try:
        _run(app, queue, scenario)
    finally:
        asyncio.run(_delete_queue(broker_url, full))
    pauses = [float(m.group(1)) for r in caplog.records if (m := re.search(r"requeueing it in ([\d.]+)s", r.message))]
    assert pauses[:3] == [0.1, 0.2, 0.4], pauses


def _refusing(app: App, runs: list[str]) -> Task[[], None]:
    """A task that always asks for its message to be requeued, and one that runs (recorded in ``runs``)."""
    app.conf.task_requeue_limit = 3

    @app.task(name="errors.refuse")
    def refuse() -> None:
        runs.append("refuse")
        raise Reject("not now", requeue=True)

    @app.task(name="errors.record")
    def record() -> str:
        runs.append("record")
        return "done"

    return refuse


def test_a_task_that_always_asks_to_be_requeued_ends_in_the_dlq_and_does_not_hold_up_the_queue(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """``Reject(requeue=True)`` every time, on a classic queue: requeued to the end of the queue after a
    growing pause, ``task_requeue_limit`` (3) times, then dead-lettered; the task behind it runs first."""
    queue = app.conf.task_default_queue
    runs: list[str] = []
    refuse = _refusing(app, runs)

    async def scenario() -> None:
        refused = await refuse.adelay()
        behind = await app.asend_task("errors.record")  # queued behind it before any worker runs
        async with running_worker(app, concurrency=1):
            assert await behind.aget(timeout=10) == "done"
            match = r"requeued by Reject\(requeue=True\) 3 time\(s\)"
            dead = await _dead_lettered(app, refused, match, "RequeueLimitError", "requeue-limit")
            assert (dead.headers or {})["x-amqtask-requeues"] == 3
            assert await topology.queue_depth(app.runtime().broker, queue) == 0
        # One worker slot: the first attempt, then the task queued behind it, then the 3 requeued attempts.
        assert runs == ["refuse", "record", "refuse", "refuse", "refuse"]

    caplog.set_level(logging.INFO, logger="amqtask.worker")
    _run(app, queue, scenario)
    pauses = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"requeue=True; requeueing it in ([\d.]+)s", r.message))
    ]
    assert pauses == [0.1, 0.2, 0.4]


@pytest.mark.parametrize(("carried", "attempts"), [(2, 2), (-(10**9), 4), ("many", 4)], ids=["2", "negative", "text"])
def test_the_requeue_count_travels_with_the_message_across_workers(app: App, carried: Any, attempts: int) -> None:
    """The count is in the message, not in a worker: a message that two requeues already brought here
    (whichever worker did it) has one left; a forged count that is no count allows no more than the limit."""
    queue = app.conf.task_default_queue
    runs: list[str] = []
    _refusing(app, runs)

    async def scenario() -> None:
        async with running_worker(app, concurrency=1), running_worker(app, concurrency=1):
            result = await _send_raw(app, queue, "errors.refuse", [], **{"x-amqtask-requeues": carried})
            await _dead_lettered(app, result, "task_requeue_limit is 3", "RequeueLimitError", "requeue-limit")
            assert await topology.queue_depth(app.runtime().broker, queue) == 0
        assert runs == ["refuse"] * attempts

    _run(app, queue, scenario)


def test_a_requeued_copy_keeps_its_signature(app: App) -> None:
    """With signing on, every requeued copy still verifies: the attempts end at the requeue limit,
    not at the first copy as an unverified message (``rejected``)."""
    queue = app.conf.task_default_queue
    app.conf.signing_keys = ["requeue-key"]
    runs: list[str] = []
    refuse = _refusing(app, runs)

    async def scenario() -> None:
        async with running_worker(app, concurrency=1):
            result = await refuse.adelay()
            await _dead_lettered(app, result, "task_requeue_limit is 3", "RequeueLimitError", "requeue-limit")
        assert runs == ["refuse"] * 4

    _run(app, queue, scenario)


async def eventually_runs(runs: list[int], count: int) -> None:
    async def enough() -> bool:
        return len(runs) >= count

    await eventually(enough, timeout=30, what=f"{count} runs")


async def _delete_queue(url: str, name: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
