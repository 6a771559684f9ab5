"""Raw aio-pika doing the same operations as the task runners: the ceilings for run.py.

Same bytes as amqtask's no-op task message, persistent, into durable classic queues. Publishing
waits for publisher confirms (one at a time, or ``WINDOW`` in flight); consuming uses prefetch 100
and one ack per message, after the (empty) handling. The RPC is a reply-queue round trip with the
guarantees amqtask gives: the request is confirmed, the server's reply is confirmed before it acks
the request. ``python bench_raw.py serve`` is that server, ``python bench_raw.py consume`` the consumer process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from amqtask.producer import to_amqp
from amqtask.protocol import TaskMessage, encode_task
from amqtask.serializers import MSGPACK

WINDOW = 500
PREFETCH = 100


def message() -> aio_pika.Message:
    """The very bytes and headers amqtask sends for its no-op task, so only library overhead differs."""
    return to_amqp(encode_task(TaskMessage(task="bench.noop", id=str(uuid.uuid4()), args=[1], ignore_result=True),
                               MSGPACK))  # fmt: skip


async def consume(url: str, queue_name: str) -> None:
    """Consume ``queue_name`` with prefetch 100, one ack per message after the (empty) handling."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, passive=True)

        async def on_message(delivery: AbstractIncomingMessage) -> None:
            await delivery.ack()

        await queue.consume(on_message)
        await asyncio.Future()


async def serve(url: str, queue_name: str) -> None:
    """Answer every request on ``queue_name`` to its reply_to: reply confirmed, then the request acked."""
    connection = await aio_pika.connect(url)
    async with connection:
        replies = await connection.channel(publisher_confirms=True)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, durable=True)

        async def on_request(request: AbstractIncomingMessage) -> None:
            reply = aio_pika.Message(request.body, correlation_id=request.correlation_id)
            await replies.default_exchange.publish(reply, routing_key=request.reply_to or "")
            await request.ack()

        await queue.consume(on_request)
        await asyncio.Future()


async def measure(url: str, prefix: str, count: int, sequential: int, round_trips: int) -> dict[str, Any]:
    from harness import Worker, worker_command

    figures: dict[str, Any] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        seq = await channel.declare_queue(f"{prefix}-raw-seq", durable=True)
        drain = await channel.declare_queue(f"{prefix}-raw-def", durable=True)
        await exchange.publish(message(), routing_key=seq.name)
        start = time.perf_counter()
        for _ in range(sequential):
            await exchange.publish(message(), routing_key=seq.name)
        figures["enqueue_sequential"] = round(sequential / (time.perf_counter() - start), 1)

        start = time.perf_counter()
        for offset in range(0, count, WINDOW):
            await asyncio.gather(*(exchange.publish(message(), routing_key=drain.name)
                                   for _ in range(min(WINDOW, count - offset))))  # fmt: skip
        figures["enqueue_bulk"] = round(count / (time.perf_counter() - start), 1)

        # A consumer process timed from outside, as the task runners' workers are (harness.Worker).
        worker = Worker(worker_command(__file__, "consume", url, drain.name), url, drain.name)
        try:
            figures["drain_def"] = await asyncio.to_thread(worker.drain, count)
        finally:
            worker.stop()
        figures["drain_async"] = figures["drain_def"]  # a raw consumer is async: one ceiling for both
        figures["round_trip"] = await rpc(url, connection, channel, f"{prefix}-raw-rpc", round_trips)
    return figures


async def rpc(url: str, connection: Any, channel: Any, queue_name: str, round_trips: int) -> dict[str, float]:
    from harness import percentiles, worker_command

    await channel.declare_queue(queue_name, durable=True)
    server = subprocess.Popen(worker_command(__file__, "serve", url, queue_name), stdin=subprocess.DEVNULL)
    try:
        while not (await channel.declare_queue(queue_name, passive=True)).declaration_result.consumer_count:
            await asyncio.sleep(0.05)
        replies = await (await connection.channel()).declare_queue(exclusive=True)
        waiting: dict[str, asyncio.Future[bytes]] = {}

        def on_reply(reply: AbstractIncomingMessage) -> None:
            future = waiting.pop(reply.correlation_id or "", None)
            if future is not None:
                future.set_result(reply.body)

        await replies.consume(on_reply, no_ack=True)
        latencies = []
        for _ in range(round_trips):
            start = time.perf_counter()
            request = message()
            request.correlation_id, request.reply_to = str(uuid.uuid4()), replies.name
            waiting[request.correlation_id] = asyncio.get_running_loop().create_future()
            future = waiting[request.correlation_id]
            await channel.default_exchange.publish(request, routing_key=queue_name)
            await asyncio.wait_for(future, 30)
            latencies.append(time.perf_counter() - start)
        return percentiles(latencies)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    if sys.argv[1:2] in (["serve"], ["consume"]):
        asyncio.run({"serve": serve, "consume": consume}[sys.argv[1]](sys.argv[2], sys.argv[3]))
        return
    from harness import emit, settings

    s = settings()
    emit(asyncio.run(measure(s["url"], s["prefix"], s["count"], s["sequential"], s["round_trips"])))


if __name__ == "__main__":
    main()
