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

from amqtask import App, AsyncResult, RemoteTaskError, Task, protocol, serializers, topology
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


def _run(app: App, queue: str, scenario: Any) -> None:
    async def main() -> None:
        try:
            await scenario()
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(main())


def test_a_far_future_eta_is_dead_lettered_once_and_its_caller_gets_the_error(app: App, broker_url: str) -> None:
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        async with running_worker(app, concurrency=2) as worker:
            result = await _send_raw(app, queue, "errors.add", [1, 2], eta=FAR_FUTURE)
            with pytest.raises(RemoteTaskError, match=r"longer than .* delay levels can hold") as error:
                await result.aget(timeout=15)
            assert error.value.exc_type == "DelayRangeError"
            dead = await get_raw(broker_url, queue + ".dlq")
            assert dead.correlation_id == result.id
            assert _header(dead, "x-amqtask-reason") == "eta-out-of-range"
            assert _header(dead, "x-amqtask-exception-type") == "DelayRangeError"
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
            with pytest.raises(RemoteTaskError, match="too long to be delayed"):
                await result.aget(timeout=15)
            dead = await get_raw(broker_url, queue + ".dlq")
            assert _header(dead, "x-amqtask-reason") == "worker-error"
            assert _header(dead, "x-amqtask-exception-type") == "ConfigurationError"
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
def test_a_retry_beyond_the_delay_levels_fails_the_task_once(app: App, broker_url: str, retry: dict[str, Any]) -> None:
    queue = app.conf.task_default_queue
    runs: list[int] = []

    @app.task(name="errors.retry_far", bind=True, max_retries=None)
    def retry_far(self: Task[[], Any]) -> None:
        runs.append(self.request.retries)
        raise self.retry(exc=ConnectionError("later"), **retry)

    async def scenario() -> None:
        async with running_worker(app, concurrency=2):
            result = await retry_far.adelay()
            with pytest.raises(RemoteTaskError, match="could not be retried") as error:
                await result.aget(timeout=15)
            assert error.value.exc_type == "RetryFailedError"
            dead = await get_raw(broker_url, queue + ".dlq")
            assert _header(dead, "x-amqtask-reason") == "failed"
            assert _header(dead, "x-amqtask-exception-type") == "RetryFailedError"
            assert "delay" in _header(dead, "x-amqtask-exception-message")
        assert runs == [0]

    _run(app, queue, scenario)


def test_a_retry_whose_headers_no_longer_fit_in_a_frame_fails_the_task_once(app: App, broker_url: str) -> None:
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
            with pytest.raises(RemoteTaskError, match=r"could not be retried.*more than fits in one AMQP frame"):
                await result.aget(timeout=15)
            dead = await get_raw(broker_url, queue + ".dlq")
            assert _header(dead, "x-amqtask-reason") == "failed"
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


async def eventually_runs(runs: list[int], count: int) -> None:
    async def enough() -> bool:
        return len(runs) >= count

    await eventually(enough, timeout=30, what=f"{count} runs")


async def _delete_queue(url: str, name: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
