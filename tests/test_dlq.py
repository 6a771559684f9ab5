"""Dead-letter queues: listing takes nothing out, replay sends messages back clean, purge empties; quorum
queues bound poison messages with their delivery limit, and ``amqtask dlq`` wraps it all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import broker_tasks
import pytest
from support.broker import TestBroker
from support.queues import QueueStats, delete, eventually, run_cli
from support.workers import get_raw, running_worker, stop_process, worker_process

from amqtask import App, Reject, TopologyNotFoundError, Worker, dlq, topology
from amqtask.protocol import TaskMessage, encode_task
from amqtask.serializers import JSON

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"dlq-{unique}", broker=broker_url, task_default_queue=f"{unique}-q")
    yield application
    application.close()


async def fill_dlq(app: App, queue: str, count: int) -> list[str]:
    """Dead-letter ``count`` messages of ``queue`` (a task that fails until ``app.fixed`` is set); their ids."""

    @app.task(name="dlq.charge")
    def charge(order: int) -> int:
        if not getattr(app, "fixed", False):
            raise ValueError(f"card declined for order {order}")
        app.charged.append(order)  # type: ignore[attr-defined]
        return order

    app.charged = []  # type: ignore[attr-defined]
    results = [await charge.aapply_async((order,), queue=queue) for order in range(count)]
    async with running_worker(app, queues=[queue]):
        for result in results:
            with pytest.raises(ValueError):
                await result.aget(timeout=10)
    return [result.id for result in results]


def test_listing_shows_every_field_and_takes_nothing_out(app: App, rabbitmq: TestBroker, broker_vhost: str) -> None:
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        try:
            ids = await fill_dlq(app, queue, 3)
            first = await dlq.inspect(app, queue)
            second = await dlq.inspect(app, queue + ".dlq")  # the DLQ's own name works too
            assert (first.queue, first.count, second.count) == (queue + ".dlq", 3, 3)
            assert [m.id for m in first.messages] == [m.id for m in second.messages] == ids
            entry = first.messages[0]
            assert (entry.task, entry.reason, entry.queue, entry.retries) == ("dlq.charge", "failed", queue, 0)
            assert entry.exception == "ValueError: card declined for order 0"
            assert entry.failed_at is not None and entry.failed_at.startswith(time.strftime("%Y-"))
            partial = await dlq.inspect(app, queue, limit=1)
            assert (partial.count, len(partial.messages)) == (3, 1)
            assert await asyncio.to_thread(QueueStats(rabbitmq, broker_vhost).counts, queue + ".dlq") == (3, 0)
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())


def test_replay_sends_messages_back_clean_and_they_run_again(app: App, broker_url: str) -> None:
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        try:
            ids = await fill_dlq(app, queue, 3)
            outcome = await dlq.replay(app, queue, [ids[1], "no-such-id"])
            assert (outcome.replayed, outcome.missing) == ([ids[1]], ["no-such-id"])
            back = await get_raw(broker_url, queue)  # taken (acked): the next replay must not meet it
            assert back.headers["id"] == ids[1] and back.headers["retries"] == 0
            assert not [k for k in back.headers if k.startswith(("x-amqtask-", "x-death", "x-first-death"))]
            assert back.reply_to == app.reply_queue and back.correlation_id == ids[1]
            app.fixed = True  # type: ignore[attr-defined]
            async with running_worker(app, queues=[queue]):
                outcome = await dlq.replay(app, queue)
                assert sorted(outcome.replayed, key=str) == sorted([ids[0], ids[2]]) and not outcome.missing

                async def both_ran() -> bool:
                    return sorted(app.charged) == [0, 2]  # type: ignore[attr-defined]

                await eventually(both_ran, what="the replayed tasks to run")
            assert (await dlq.inspect(app, queue)).count == 0
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())


def test_a_dead_lettered_copy_and_its_replay_keep_the_senders_properties(app: App, broker_url: str) -> None:
    """Producers other than Celery (the protocol's ports, hand-written publishers) may set these AMQP
    properties; the dead-letter copy, and the message replayed from it, still say where it came from."""
    queue = app.conf.task_default_queue

    @app.task(name="dlq.refuse")
    def refuse() -> None:
        raise ValueError("refused")

    sent_at = dt.datetime(2026, 11, 22, 3, 0, 1, tzinfo=dt.timezone.utc)  # AMQP timestamps are whole seconds

    def sent_by_hand(message_id: str) -> aio_pika.Message:
        wire = encode_task(TaskMessage(task="dlq.refuse", id=message_id), JSON)
        return aio_pika.Message(wire.body, headers=wire.headers, content_type=wire.content_type,
                                message_id=message_id, timestamp=sent_at, app_id="billing", type="invoice")  # fmt: skip

    def kept(message: aio_pika.abc.AbstractIncomingMessage, message_id: str) -> None:
        assert (message.message_id, message.app_id, message.type) == (message_id, "billing", "invoice")
        assert message.timestamp is not None and message.timestamp.timestamp() == sent_at.timestamp()

    async def scenario() -> None:
        try:
            async with running_worker(app, queues=[queue]):
                connection = await aio_pika.connect(broker_url)
                async with connection:
                    channel = await connection.channel()
                    for message_id in ("m-copy", "m-replay"):
                        await channel.default_exchange.publish(sent_by_hand(message_id), routing_key=queue)

                async def both_dead_lettered() -> bool:
                    return (await dlq.inspect(app, queue)).count == 2

                await eventually(both_dead_lettered, what="both messages in the dead-letter queue")
            copy = await get_raw(broker_url, queue + ".dlq")  # either one: two threads dead-lettered them
            kept(copy, str(copy.headers["id"]))
            other = "m-replay" if copy.headers["id"] == "m-copy" else "m-copy"
            assert (await dlq.replay(app, queue)).replayed == [other]
            kept(await get_raw(broker_url, queue), other)
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())


def test_purge_empties_the_dead_letter_queue(app: App) -> None:
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        try:
            await fill_dlq(app, queue, 2)
            assert await dlq.purge(app, queue) == 2
            assert (await dlq.inspect(app, queue)).count == 0
            with pytest.raises(TopologyNotFoundError, match="does not exist"):
                await dlq.purge(app, "no-such-queue")
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())


def test_a_task_that_asks_to_be_requeued_is_bounded_by_the_requeue_limit_on_a_quorum_queue_too(app: App) -> None:
    """``Reject(requeue=True)`` sends a new copy with its count to the end of the queue: the quorum
    queue's delivery limit (1) does not see those attempts, ``task_requeue_limit`` (2) bounds them."""
    queue = app.conf.task_default_queue
    app.conf.task_queues = {queue: {"queue_type": "quorum", "delivery_limit": 1}}
    app.conf.task_requeue_limit = 2
    attempts: list[bool] = []

    @app.task(name="dlq.not_now", bind=True)
    def not_now(self: Any) -> None:
        attempts.append(self.request.delivery_info["redelivered"])
        raise Reject("downstream is down", requeue=True)

    async def scenario() -> None:
        try:
            async with running_worker(app, queues=[queue]):
                result = await not_now.adelay()

                async def dead_lettered() -> bool:
                    return await topology.queue_depth(app.runtime().broker, queue + ".dlq") == 1

                await eventually(dead_lettered, what="the worker to dead-letter the message")
            entry = (await dlq.inspect(app, queue)).messages[0]
            expected = (result.id, "dlq.not_now", "requeue-limit", queue)
            assert (entry.id, entry.task, entry.reason, entry.queue) == expected
            assert "RequeueLimitError" in entry.exception
            assert attempts == [False, False, False]  # the first delivery + 2 requeued copies, none redelivered
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())


def test_a_release_at_shutdown_does_not_use_up_the_delivery_limit_on_rabbitmq_4_3(
    app: App, rabbitmq_version_info: tuple[int, ...]
) -> None:
    queue = app.conf.task_default_queue
    app.conf.task_queues = {queue: {"queue_type": "quorum", "delivery_limit": 1}}

    @app.task(name="dlq.waits")
    def waits() -> None:
        """Never starts: the worker's only slot is taken."""

    async def scenario() -> tuple[int, int]:
        try:
            await waits.adelay()
            for _ in range(2):  # one release more than the delivery limit
                worker = Worker(app, queues=[queue], concurrency=1, prefetch_multiplier=1)
                await worker._slots.acquire()  # the slot is busy, as behind a long task: deliveries wait

                async def delivered(worker: Worker = worker) -> bool:
                    return bool(worker._waiting)

                await worker.start()
                await eventually(delivered, what="the delivery to wait for a slot")
                await worker.stop()  # hands the waiting delivery back with nack + requeue
            broker = app.runtime().broker
            return await topology.queue_depth(broker, queue), await topology.queue_depth(broker, queue + ".dlq")
        finally:
            await delete(app, [queue])
            await app.aclose()

    # 4.3 counts only basic.reject and lost connections; earlier versions count a nack too.
    assert asyncio.run(scenario()) == ((1, 0) if rabbitmq_version_info >= (4, 3) else (0, 1))


@pytest.mark.slow
def test_a_task_that_kills_its_worker_ends_in_the_dlq_and_others_are_served(broker_url: str, unique: str) -> None:
    names = broker_tasks.queue_names(unique)
    poison = names["poison"]  # quorum, delivery_limit 2
    app = App(f"dlq-poison-{unique}", broker=broker_url, task_queues=broker_tasks.task_queues(unique))
    worker_args = ("-Q", poison, "-c", "1", "--prefetch-multiplier", "1")
    env = {"BROKER_TASKS_PREFIX": unique}

    async def scenario() -> None:
        broker = app.runtime().broker
        crash = await app.asend_task("bt.crash", queue=poison)
        add = await app.asend_task("bt.add", (1, 2), queue=poison)
        processes = [worker_process("broker_tasks", broker_url, *worker_args, env=env)]
        try:
            deadline = time.monotonic() + 60
            while await topology.queue_depth(broker, poison + ".dlq") == 0:
                assert time.monotonic() < deadline, "the poison message never reached the DLQ"
                if processes[-1].poll() is not None:
                    assert processes[-1].returncode == 3  # killed by the task, not by an error
                    processes.append(worker_process("broker_tasks", broker_url, *worker_args, env=env))
                await asyncio.sleep(0.05)
            if processes[-1].poll() is not None:
                processes.append(worker_process("broker_tasks", broker_url, *worker_args, env=env))
            assert await add.aget(timeout=30) == 3
            # The first delivery and delivery_limit (2) redeliveries each killed a worker; the next one served.
            assert [p.poll() for p in processes] == [3, 3, 3, None]
            entry = (await dlq.inspect(app, poison)).messages[0]
            assert (entry.id, entry.task, entry.reason) == (crash.id, "bt.crash", "delivery_limit")
        finally:
            for process in processes:
                stop_process(process)
            await delete(app, [poison])
            await app.aclose()

    asyncio.run(scenario())
    app.close()


def test_dlq_cli_lists_replays_and_purges(broker_url: str, unique: str) -> None:
    names = broker_tasks.queue_names(unique)
    queue = names["a"]
    app = App(f"dlq-cli-{unique}", broker=broker_url, task_queues=broker_tasks.task_queues(unique))

    async def scenario() -> None:
        try:
            ids = await fill_dlq(app, queue, 2)
            listed = await asyncio.to_thread(run_cli, broker_url, unique, "dlq", "list", "-A", "broker_tasks", queue)
            assert listed.returncode == 0, listed.stderr
            lines = listed.stdout.splitlines()
            assert lines[0] == f"{queue}.dlq: 2 message(s)"
            assert lines[1].split() == ["ID", "TASK", "REASON", "EXCEPTION", "FAILED", "AT"]
            assert lines[2].startswith(f"{ids[0]}  dlq.charge  failed  ValueError: card declined for order 0  ")
            replay = ("dlq", "replay", "-A", "broker_tasks", queue)
            replayed = await asyncio.to_thread(run_cli, broker_url, unique, *replay, "--id", ids[1])
            assert (replayed.returncode, replayed.stdout) == (0, "replayed 1 message(s)\n")
            missing = await asyncio.to_thread(run_cli, broker_url, unique, *replay, "--id", "nope")
            assert missing.returncode == 1 and "not found: nope" in missing.stderr
            unclear = await asyncio.to_thread(run_cli, broker_url, unique, *replay)
            assert unclear.returncode == 2 and "--all" in unclear.stderr
            purge = ("dlq", "purge", "-A", "broker_tasks", queue, "--yes")
            purged = await asyncio.to_thread(run_cli, broker_url, unique, *purge)
            assert (purged.returncode, purged.stdout) == (0, "purged 1 message(s)\n")
            assert await topology.queue_depth(app.runtime().broker, queue) == 1  # the replayed one
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())
    app.close()
