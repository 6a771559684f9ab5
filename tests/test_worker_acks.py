"""Coalesced acks (``amqtask/worker/acks.py``) never ack a delivery early, and rejects between them keep their meaning.

The worker acks runs of settled deliveries with one ``basic.ack(multiple=True)``. What a user relies on:
a task still running is never acked by an ack of a later delivery (a worker killed then loses nothing),
finished tasks behind a slow one are acked anyway (nothing finished comes back), a nack or reject among
acked deliveries still requeues or drops its own message, and none of this breaks across reconnects,
where delivery tags start again at 1.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import pytest
from support.broker import TestBroker
from support.queues import QueueStats, cleanup, eventually
from support.workers import get_raw, running_worker, stop_process, wait_for, worker_process

from amqtask import App, Worker, topology
from amqtask.worker.acks import ChannelAcks

pytestmark = pytest.mark.broker


@pytest.fixture
def client(broker_url: str, unique: str) -> Iterator[App]:
    app = App(f"acks-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", publish_timeout_s=30)
    yield app
    app.close()


def test_a_killed_worker_gives_back_the_slow_first_delivery_and_none_of_the_finished_ones_after_it(
    client: App, rabbitmq: TestBroker, broker_vhost: str, broker_url: str, unique: str, tmp_path: Path
) -> None:
    queue, stats = f"q-{unique}", QueueStats(rabbitmq, broker_vhost)
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "CORE_MARKER_DIR": str(tmp_path)}
    worker = worker_process("core_tasks", broker_url, "-c", "4", env=env)
    try:
        hanging = client.send_task("core.hang_once", args=("head",))  # delivery tag 1: never finishes here
        wait_for(lambda: (tmp_path / "head.started").exists(), what="the first task to start")
        sums = [client.send_task("core.add", args=(i, i)) for i in range(20)]
        assert [result.get(timeout=30) for result in sums] == [2 * i for i in range(20)]
        # Every later delivery finished and is acked; the running first one is not.
        wait_for(lambda: stats.counts(queue) == (0, 1), what="only the running delivery unacked")
        stop_process(worker, signal.SIGKILL)
        wait_for(lambda: stats.counts(queue) == (1, 0), what="the running delivery back in the queue")
        returned = asyncio.run(get_raw(broker_url, queue))
        assert returned.headers["id"] == hanging.id
    finally:
        if worker.poll() is None:
            stop_process(worker, signal.SIGKILL)
        asyncio.run(cleanup(client, [queue]))


def test_a_running_delivery_stays_unacked_across_a_reconnect_where_delivery_tags_start_again(
    client: App, rabbitmq: TestBroker, broker_vhost: str, unique: str
) -> None:
    queue, stats = f"q-{unique}", QueueStats(rabbitmq, broker_vhost)

    def counts_are(expected: tuple[int, int]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await asyncio.to_thread(stats.counts, queue) == expected

        return check

    async def resumed(worker: Worker, after: int) -> bool:
        return worker.consumer.resumptions > after

    async def scenario() -> None:
        release = asyncio.Event()

        @client.task(name="acks.held")
        async def held() -> str:
            await release.wait()
            return "released"

        @client.task(name="acks.echo")
        async def echo(i: int) -> int:
            return i

        async with running_worker(client, concurrency=4) as worker:
            # Tags 1..5 on the first channel, all acked.
            assert [await (await echo.adelay(i)).aget(timeout=10) for i in range(5)] == list(range(5))
            await eventually(counts_are((0, 0)), what="the first channel's deliveries acked")
            resumptions = worker.consumer.resumptions
            await topology.delete_queue(client.runtime().broker, queue)  # the broker cancels the consumer
            await eventually(lambda: resumed(worker, resumptions), what="consuming again")
            # On the new channel the held task is tag 1 and the echoes 2..6: below the first channel's last tag.
            result = await held.adelay()
            assert [await (await echo.adelay(i)).aget(timeout=10) for i in range(5)] == list(range(5))
            await eventually(counts_are((0, 1)), what="all but the held delivery acked")
            release.set()
            assert await result.aget(timeout=10) == "released"
            await eventually(counts_are((0, 0)), what="the held delivery acked once it finished")
        await cleanup(client, [queue])

    asyncio.run(scenario())


async def held_deliveries(
    channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue, count: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Publish ``count`` messages (bodies 1, 2, ...) to ``queue`` and take them all, unacked, with no consumer left."""
    for n in range(1, count + 1):
        await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), routing_key=queue.name)
    deliveries: list[aio_pika.abc.AbstractIncomingMessage] = []
    got_all = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        deliveries.append(message)
        if len(deliveries) == count:
            got_all.set()

    tag = await queue.consume(take)
    await got_all.wait()
    await queue.cancel(tag)  # keeps the deliveries unacked, and a requeued one is not delivered again
    return deliveries


def test_nacks_and_rejects_between_coalesced_acks_keep_their_meaning(broker_url: str, unique: str) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(f"acks-{unique}", durable=True)  # 4.3 refuses transient ones
            deliveries = await held_deliveries(channel, queue, 6)
            acks = ChannelAcks(await channel.get_underlay_channel(), hold_max=10, batch=3)
            first, dropped, requeued, fourth, fifth, _running = deliveries
            acks.ack(first)
            await acks.reject(dropped, requeue=False)
            acks.ack(fourth)
            acks.ack(fifth)  # recorded before the nack of an earlier delivery
            await acks.nack(requeued, requeue=True)
            await acks.close()
            # The multiple ack up to 5 goes after the nack: the channel lives (a nack of a delivery acked
            # already would close it), the requeued message is back, the dropped one gone, the sixth still out.
            assert not channel.is_closed

            async def ready(count: int) -> bool:
                # The broker answers a passive declare through another process than the nack: poll.
                declared = await channel.declare_queue(queue.name, passive=True)
                return declared.declaration_result.message_count == count

            await eventually(lambda: ready(1), what="the nacked message back in the queue")
            await channel.close()  # gives back the unsettled sixth
            channel = await connection.channel()
            await eventually(lambda: ready(2), what="the unsettled message back too")
            queue = await channel.declare_queue(queue.name, passive=True)
            back = sorted([(await queue.get(no_ack=True)).body for _ in range(2)])
            assert back == [b"3", b"6"]
            await channel.queue_delete(queue.name)

    asyncio.run(scenario())


def test_an_ack_with_nothing_else_in_hand_goes_out_at_once_not_after_the_batch_delay(
    rabbitmq: TestBroker, broker_vhost: str, broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender waits for this ack: RabbitMQ confirms a persistent message once it is on disk or acked, so
    ``delay()`` of a task that finished before the disk write returns only when the worker acks it."""
    monkeypatch.setattr("amqtask.worker.acks.ACK_DELAY_S", 3600.0)  # only the idle rule can send it
    stats = QueueStats(rabbitmq, broker_vhost)

    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(f"acks-{unique}", durable=True)
            deliveries = await held_deliveries(channel, queue, 2)
            acks = ChannelAcks(await channel.get_underlay_channel(), hold_max=10, batch=10)
            for delivery in deliveries:
                acks.received(delivery)
            acks.ack(deliveries[0])  # the second is still in hand: this one waits to share a frame with it
            acks.ack(deliveries[1])  # now nothing is in hand: both go out at once, well before the delay

            async def acked() -> bool:
                return await asyncio.to_thread(stats.counts, queue.name) == (0, 0)

            await eventually(acked, what="both deliveries acked")
            await acks.close()
            await channel.queue_delete(queue.name)

    asyncio.run(scenario())
