"""Time checks at the worker: an expired task is not run, an early one goes back to the broker's delay levels.

Expiry: the caller gets REVOKED (``get()`` raises :class:`TaskRevokedError`), the message is acked (not
dead-lettered), and the worker logs it once. Early eta: a message whose eta is still ahead (a Celery
client puts eta in a header and publishes at once) is not held by the worker: it leaves the queue,
nothing stays unacked, and it runs after its eta.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator

import aio_pika
import pytest
from support.broker import TestBroker
from support.queues import QueueStats, delete, eventually
from support.workers import running_worker

from amqtask import App, AsyncResult, TaskRevokedError, topology
from amqtask.producer import to_amqp
from amqtask.protocol import TaskMessage, encode_task
from amqtask.serializers import JSON

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"expiry-{unique}", broker=broker_url, task_default_queue=f"{unique}-q")
    yield application
    application.close()


def test_a_task_expired_before_a_worker_starts_is_revoked_acked_and_logged_once(
    app: App, unique: str, rabbitmq: TestBroker, broker_vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = app.conf.task_default_queue
    ran: list[int] = []

    @app.task(name="exp.run")
    def run(x: int) -> int:
        ran.append(x)
        return x

    async def scenario() -> None:
        try:
            past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
            expired = await run.aapply_async((1,), expires=past)
            fresh = await run.aapply_async((2,), expires=60)
            async with running_worker(app, concurrency=1):
                assert await fresh.aget(timeout=10) == 2
                with pytest.raises(TaskRevokedError, match="expired"):
                    await expired.aget(timeout=10)
                assert expired.state == "REVOKED"
                assert await asyncio.to_thread(QueueStats(rabbitmq, broker_vhost).counts, queue) == (0, 0)
                assert await topology.queue_depth(app.runtime().broker, queue + ".dlq") == 0
        finally:
            await delete(app, [queue])
            await app.aclose()

    with caplog.at_level(logging.INFO, logger="amqtask"):
        asyncio.run(scenario())
    assert ran == [2]
    assert len([r for r in caplog.records if "expired" in r.getMessage()]) == 1


def test_task_level_expires_in_seconds_revokes_a_task_that_arrives_later(app: App) -> None:
    @app.task(name="exp.short_lived", expires=1)
    def short_lived() -> str:
        return "ran"

    async def scenario() -> None:
        try:
            async with running_worker(app):
                # Held 2 s by the delay levels, it reaches the worker 1 s after it expired.
                late = await short_lived.aapply_async(countdown=2)
                with pytest.raises(TaskRevokedError):
                    await late.aget(timeout=10)
                assert await (await short_lived.adelay()).aget(timeout=10) == "ran"
        finally:
            await delete(app, [app.conf.task_default_queue])
            await app.aclose()

    asyncio.run(scenario())


def test_an_early_message_goes_back_to_the_delay_levels_instead_of_being_held(
    app: App, broker_url: str, rabbitmq: TestBroker, broker_vhost: str
) -> None:
    queue = app.conf.task_default_queue
    stats = QueueStats(rabbitmq, broker_vhost)
    started: list[float] = []

    @app.task(name="exp.when")
    def when() -> None:
        started.append(time.time())

    async def publish_like_celery(eta: dt.datetime) -> str:
        """A task message with a future eta header, published straight to the queue (no broker delay)."""
        task_id = str(uuid.uuid4())
        wire = encode_task(TaskMessage("exp.when", task_id, eta=eta, reply_to=app.reply_queue), JSON)
        async with await aio_pika.connect(broker_url) as connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(to_amqp(wire), queue)
        return task_id

    async def scenario() -> None:
        try:
            async with running_worker(app, concurrency=1):
                await app.runtime().results.ensure_started()
                eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=4)
                result = AsyncResult(await publish_like_celery(eta), app)

                async def handed_back() -> bool:
                    return await asyncio.to_thread(stats.counts, queue) == (0, 0)

                await eventually(handed_back, timeout=3, what="the early message to leave the queue")
                assert not started and dt.datetime.now(dt.timezone.utc) < eta  # not run, and not held
                await result.aget(timeout=10)
                assert eta.timestamp() <= started[0] <= eta.timestamp() + 1.5
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())
