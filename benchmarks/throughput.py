"""Publish N no-op tasks and drain them with one worker, next to raw aio-pika doing the same work.

    python benchmarks/throughput.py [--count 20000] [--url amqp://...]

Without --url (or AMQTASK_BROKER_URL) it starts the throwaway broker of deploy/rabbitmq.sh.
Both sides publish the same messages (amqtask's wire form of the task), persistent, with
publisher confirms, pipelined in windows of ``--window`` messages, into a durable classic queue,
and consume with the same prefetch and one ack per message; the ratios (amqtask / raw) are the
figures that matter, since absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import aio_pika

from amqtask import App, Worker, topology
from amqtask.producer import to_amqp
from amqtask.protocol import TaskMessage, encode_task
from amqtask.serializers import MSGPACK

REPO = Path(__file__).resolve().parents[1]


def broker_url(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("AMQTASK_BROKER_URL"):
        return os.environ["AMQTASK_BROKER_URL"]
    out = subprocess.run(["bash", str(REPO / "deploy" / "rabbitmq.sh"), "start", "--version", "3.10"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


async def raw_run(url: str, count: int, window: int, prefetch: int) -> tuple[float, float]:
    queue_name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True)
        # The very bytes and headers amqtask sends for the no-op task, so only library overhead differs.
        wire = encode_task(TaskMessage(task="bench.noop", id=str(uuid.uuid4()), ignore_result=True), MSGPACK)
        start = time.perf_counter()
        for offset in range(0, count, window):
            await asyncio.gather(*(
                channel.default_exchange.publish(to_amqp(wire), routing_key=queue_name)
                for _ in range(min(window, count - offset))
            ))  # fmt: skip
        publish_s = time.perf_counter() - start
        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=prefetch)
        consumer_queue = await consumer_channel.declare_queue(queue_name, passive=True)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        start = time.perf_counter()
        await consumer_queue.consume(on_message)
        await done.wait()
        drain_s = time.perf_counter() - start
        await queue.delete(if_unused=False, if_empty=False)
    return publish_s, drain_s


async def amqtask_run(url: str, count: int, window: int, concurrency: int) -> tuple[float, float]:
    queue_name = f"bench-amqtask-{uuid.uuid4().hex[:8]}"
    app = App("bench", broker=url, task_default_queue=queue_name, worker_prefetch_multiplier=4)

    @app.task(name="bench.noop", ignore_result=True)
    async def noop() -> None:
        return None

    start = time.perf_counter()
    for offset in range(0, count, window):
        await asyncio.gather(*(noop.adelay() for _ in range(min(window, count - offset))))
    publish_s = time.perf_counter() - start
    worker = Worker(app, concurrency=concurrency, burst=True)
    start = time.perf_counter()
    await worker.run()
    drain_s = time.perf_counter() - start
    assert worker.stats["succeeded"] == count, worker.stats
    cleanup = App("bench-cleanup", broker=url)
    runtime = cleanup.runtime()
    await topology.delete_queue(runtime.broker, queue_name)
    await topology.delete_queue(runtime.broker, f"{queue_name}.dlq")
    await cleanup.aclose()
    return publish_s, drain_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=500, help="publishes in flight at once")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--url")
    args = parser.parse_args()
    url = broker_url(args.url)
    prefetch = args.concurrency * 4
    raw_pub, raw_drain = asyncio.run(raw_run(url, args.count, args.window, prefetch))
    amq_pub, amq_drain = asyncio.run(amqtask_run(url, args.count, args.window, args.concurrency))
    n = args.count
    print(f"{n} messages, window {args.window}, prefetch {prefetch}")
    print(f"{'':10}{'raw aio-pika':>16}{'amqtask':>16}{'ratio':>10}")
    print(f"{'publish':10}{n / raw_pub:>14.0f}/s{n / amq_pub:>14.0f}/s{raw_pub / amq_pub:>10.2f}")
    print(f"{'drain':10}{n / raw_drain:>14.0f}/s{n / amq_drain:>14.0f}/s{raw_drain / amq_drain:>10.2f}")


if __name__ == "__main__":
    main()
