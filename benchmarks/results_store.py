"""The amqp result store's layout, measured: one queue per task (Celery's old amqp backend) against one stream.

    python benchmarks/results_store.py [--version 3.10] [--counts 10000,100000] [--tasks 2000]

Runs in one go on one private broker (deploy/rabbitmq.sh, name ``amqtask-bench-results-<version>``,
stopped at the end) so the figures compare like with like:

- broker memory (Erlang total and queue processes), queues and Erlang processes with N outstanding
  results held each way, and how fast they were written;
- publish-to-readable latency (median and p95 of sequential writes): a per-task queue is readable once
  declared and the message confirmed (a ``basic.get`` then finds it); a stream record once a follower
  received it;
- with N records in the stream: publish-to-readable latency on it, and a new reader's first read of a
  result written after the others had left its window (``result_stream_lookback_s``) against its first read
  of an id outside the window (the whole retention read, what every first read cost before the window);
- amqtask end to end: tasks per second with ``rpc`` results against ``amqp`` results, with and without
  ``result_track_sent`` (a worker in this process, the sender waiting for every result), and one task's
  round trip each way.

Per-task queues are filled only up to ``--queue-cap`` (default 10,000): at 100,000 they stalled a
RabbitMQ 3.10 node near its memory alarm (see docs/results.md), which on a shared machine starves every
other job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika

from amqtask import App, AsyncResult, Worker, protocol, topology
from amqtask.protocol import ResultMessage
from amqtask.results import reporting, stream
from amqtask.results.legacy import legacy_queue_name
from amqtask.results.stream import stream_arguments
from amqtask.serializers import JSON
from amqtask.settings import Settings
from amqtask.topology import QueueSpec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "rabbitmq.sh"
BODY = json.dumps({"status": "SUCCESS", "result": 42, "traceback": None, "children": [],
                   "date_done": "2026-01-01T00:00:00+00:00", "task_id": str(uuid.uuid4())}).encode()  # fmt: skip
WINDOW = 500


class Broker:
    """A private broker and its rabbitmqctl."""

    def __init__(self, version: str) -> None:
        self.name = f"amqtask-bench-results-{version.replace('.', '')}"
        out = subprocess.run(["bash", str(SCRIPT), "start", "--version", version, "--name", self.name],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        self.url = out.strip().splitlines()[-1].rstrip("/")

    def ctl(self, *args: str) -> str:
        return subprocess.run(["bash", str(SCRIPT), "ctl", "--name", self.name, "--", *args],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip

    def vhost(self, name: str) -> str:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return f"{self.url}/{name}"

    def usage(self, vhost: str) -> dict[str, float]:
        self.ctl("eval", "[garbage_collect(P) || P <- erlang:processes()], ok.")
        memory = json.loads(self.ctl("status", "--formatter", "json"))["memory"]
        queues = int(self.ctl("eval", f'length(rabbit_amqqueue:list(<<"{vhost}">>)).').strip())
        processes = int(self.ctl("eval", "erlang:system_info(process_count).").strip())
        return {"memory_mib": memory["total"]["erlang"] / 2**20, "queue_procs_mib": memory["queue_procs"] / 2**20,
                "queues": queues, "processes": processes}  # fmt: skip

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", "--name", self.name], check=False, capture_output=True)


async def windows(count: int, one: Callable[[int], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    for offset in range(0, count, WINDOW):
        await asyncio.gather(*(one(i) for i in range(offset, min(count, offset + WINDOW))))
    return count / (time.perf_counter() - start)


async def per_task_queues(url: str, count: int, settings: Settings) -> float:
    """Celery's legacy layout, as celery-node reads it: declare the task's queue, publish its result."""
    connection = await aio_pika.connect(url)
    channels = [await connection.channel(publisher_confirms=True) for _ in range(8)]
    arguments = {"x-expires": settings.result_expires_s * 1000}

    async def one(i: int) -> None:
        channel = channels[i % len(channels)]
        name = legacy_queue_name(str(uuid.uuid4()))
        await channel.declare_queue(name, durable=True, auto_delete=True, arguments=arguments)
        await channel.default_exchange.publish(aio_pika.Message(BODY, delivery_mode=2), name)

    rate = await windows(count, one)
    await connection.close()
    return rate


async def stream_records(url: str, count: int, settings: Settings) -> float:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(settings.result_stream, durable=True, arguments=stream_arguments(settings))

    def one(i: int) -> Awaitable[Any]:
        record = aio_pika.Message(BODY, content_type="application/json", delivery_mode=2, correlation_id=str(i))
        return channel.default_exchange.publish(record, settings.result_stream)

    rate = await windows(count, one)
    await connection.close()
    return rate


async def first_reads(url: str, settings: Settings, lookback_s: float) -> str:
    """A new process's first read of a recent result, then of an id outside its window (the whole history).

    The records already in the stream are older than ``lookback_s`` when this starts (the caller waited);
    one more result is written now, as a worker would have just written it.
    """
    writer = App("bench-writer", broker=url, result_backend="amqp", result_stream=settings.result_stream)
    recent = str(uuid.uuid4())
    report = protocol.encode_result(ResultMessage(recent, "SUCCESS", 42), JSON)
    await stream.append(writer.runtime().publisher, writer.conf, report)  # as a worker writes a result
    await writer.aclose()
    app = App("bench-reader", broker=url, result_backend="amqp", result_stream=settings.result_stream,
              result_stream_lookback_s=lookback_s)  # fmt: skip
    start = time.perf_counter()
    assert await AsyncResult(recent, app).aget(timeout=600) == 42
    window = time.perf_counter() - start
    unknown = str(uuid.uuid4())
    start = time.perf_counter()
    await AsyncResult(unknown, app).arefresh(timeout=600)  # what `.known` does: window, then the history
    history = time.perf_counter() - start
    assert app.result_store.get(unknown) is None
    await app.aclose()
    return f"first read of a recent result {window * 1000:.0f} ms; of an unknown id (whole history) {history:.2f} s"


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {statistics.median(ordered) * 1000:.2f} ms, p95 {ordered[int(len(ordered) * 0.95)] * 1000:.2f} ms"


async def latency_queue(url: str, samples: int) -> str:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    times = []
    for _ in range(samples):
        name = legacy_queue_name(str(uuid.uuid4()))
        start = time.perf_counter()
        queue = await channel.declare_queue(name, durable=True, auto_delete=True, arguments={"x-expires": 60_000})
        await channel.default_exchange.publish(aio_pika.Message(BODY), name)
        message = await queue.get(no_ack=False)
        times.append(time.perf_counter() - start)
        await message.reject(requeue=True)  # read without consuming, as the legacy readers do
        await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    return quantiles(times)


async def latency_stream(url: str, settings: Settings, samples: int) -> str:
    """Sequential appends to the stream (as it is: empty or holding N records), each until a follower got it."""
    connection = await aio_pika.connect(url)
    writer = await connection.channel(publisher_confirms=True)
    follower = await connection.channel()
    await follower.set_qos(prefetch_count=100)
    queue = await follower.declare_queue(settings.result_stream, passive=True)
    arrived: dict[str, asyncio.Future[float]] = {}

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = arrived.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(time.perf_counter())
        await message.ack()

    await queue.consume(on_message, arguments={"x-stream-offset": "next"})
    times = []
    for _ in range(samples):
        key = str(uuid.uuid4())
        arrived[key] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        record = aio_pika.Message(BODY, content_type="application/json", correlation_id=key)
        await writer.default_exchange.publish(record, settings.result_stream)
        times.append(await asyncio.wait_for(arrived[key], 30) - start)
        del arrived[key]
    await connection.close()
    return quantiles(times)


async def tasks_per_second(url: str, backend: str, count: int) -> tuple[float, float]:
    """``count`` no-op tasks sent in windows, every result awaited by the sender; and one round trip.

    ``backend``: ``rpc``, ``amqp``, or ``amqp-untracked`` (amqp without ``result_track_sent``).
    """
    queue = f"bench-results-{uuid.uuid4().hex[:8]}"
    untracked = {"result_track_sent": False} if backend == "amqp-untracked" else {}  # (older trees lack it)
    app = App(f"bench-{backend}", broker=url, task_default_queue=queue, result_backend=backend.split("-")[0],
              result_stream=f"bench-results-{backend}", **untracked)  # fmt: skip

    @app.task(name="bench.noop")
    async def noop() -> int:
        return 1

    worker = Worker(app, concurrency=8)
    await worker.start()
    one = time.perf_counter()
    await (await noop.adelay()).aget(timeout=30)
    round_trip = time.perf_counter() - one

    async def send_and_wait(i: int) -> None:
        await (await noop.adelay()).aget(timeout=60)

    rate = await windows(count, send_and_wait)
    await worker.stop(grace=10)
    runtime = app.runtime()
    for name in (queue, f"{queue}.dlq"):
        await topology.delete_queue(runtime.broker, name)
    await app.aclose()
    return rate, round_trip


async def in_flight(count: int, one: Callable[[int], Awaitable[Any]], width: int = 64) -> str:
    """``count`` calls, ``width`` at a time: their rate, and this process's CPU time per call (less sensitive
    to the machine's load than the rate)."""
    slots = asyncio.Semaphore(width)

    async def limited(i: int) -> None:
        async with slots:
            await one(i)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(limited(i) for i in range(count)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{count / wall:.0f}/s, CPU {cpu / count * 1e6:.0f} us each"


async def reports_and_sends(url: str, count: int) -> list[str]:
    """A worker's reports of amqp results (to the stream and a reply queue), and a client's sends of amqp
    tasks with and without ``result_track_sent``: the publishing costs the result store adds."""
    tag = uuid.uuid4().hex[:8]
    app = App(f"bench-{tag}", broker=url, result_backend="amqp", result_stream=f"bench-{tag}",
              task_default_queue=f"bench-{tag}")  # fmt: skip
    runtime = app.runtime()
    await stream.declare_stream(runtime.broker, app.conf)
    reply = f"bench-reply-{tag}"
    await runtime.publisher.ensure_queue(QueueSpec(reply, dead_letter=False))

    def report(i: int) -> Awaitable[None]:
        done = ResultMessage(str(uuid.uuid4()), "SUCCESS", i)
        return reporting.report(app, runtime, done, task=None, reply_to=reply, content_type="application/json")

    lines = [f"a worker's reports of amqp results: {await in_flight(count, report)}"]
    for width in (64, 1):  # many clients at once (a web server, a canvas), or one after another
        for tracked in (True, False):
            app.conf.update({"result_track_sent": tracked})
            sends = await in_flight(
                count // (1 if width > 1 else 4), lambda i: app.asend_task("bench.none", (i,)), width
            )
            lines.append(f"sends of amqp tasks, {width} at a time, result_track_sent={tracked}: {sends}")
    for name in (reply, f"{reply}.dlq", f"bench-{tag}", f"bench-{tag}.dlq", app.conf.result_stream):
        await topology.delete_queue(runtime.broker, name)
    await app.aclose()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="3.10", choices=("3.10", "4.3"))
    parser.add_argument("--counts", default="10000,100000")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--layouts", default="queues,stream", help="which layouts to fill (queues, stream)")
    parser.add_argument("--repeat", type=int, default=1, help="turns of the task rates, backends alternated")
    parser.add_argument("--backends", default="rpc,amqp,amqp-untracked", help="which result backends' rates")
    parser.add_argument("--queue-cap", type=int, default=10_000, help="fill per-task queues only up to this count")
    parser.add_argument("--lookback", type=float, default=5.0, help="the readers' result_stream_lookback_s")
    parser.add_argument("--skip-tasks", action="store_true", help="skip the end-to-end task rates")
    parser.add_argument("--skip-latency", action="store_true", help="skip the publish-to-readable latencies")
    args = parser.parse_args()
    broker = Broker(args.version)
    settings = Settings()
    try:
        print(f"RabbitMQ {args.version}")
        base_url = broker.vhost("bench-e2e")
        if not args.skip_tasks:
            for line in asyncio.run(reports_and_sends(base_url, args.tasks)):
                print(line, flush=True)
        rates: dict[str, list[float]] = {}
        for turn in range(0 if args.skip_tasks else args.repeat):  # alternated: the machine's load drifts
            for backend in args.backends.split(","):
                rate, round_trip = asyncio.run(tasks_per_second(base_url, backend, args.tasks))
                rates.setdefault(backend, []).append(rate)
                print(f"[{turn + 1}] tasks with {backend} results: {rate:.0f}/s; round trip {round_trip * 1000:.1f} ms")
        for backend, measured in rates.items():
            ratios = [rate / rpc for rate, rpc in zip(measured, rates.get("rpc", measured), strict=True)]
            print(
                f"{backend}: median {statistics.median(measured):.0f}/s, {statistics.median(ratios):.2f} x rpc "
                f"(per turn: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
            )
        for count in (int(c) for c in args.counts.split(",") if c):
            for layout in args.layouts.split(","):
                if layout == "queues" and count > args.queue_cap:
                    print(f"{count} results in queues: skipped (above --queue-cap {args.queue_cap})", flush=True)
                    continue
                vhost = f"bench-{layout}-{count}"
                url = broker.vhost(vhost)
                before = broker.usage(vhost)
                write = per_task_queues if layout == "queues" else stream_records
                rate = asyncio.run(write(url, count, settings))
                after = broker.usage(vhost)
                delta = {k: round(after[k] - before[k], 1) for k in after}
                print(f"{count} results in {layout}: written {rate:.0f}/s; broker +{delta}", flush=True)
                if layout == "stream":
                    latency = asyncio.run(latency_stream(url, settings, args.samples))
                    print(f"  publish-to-readable with {count} records in the stream: {latency}", flush=True)
                    time.sleep(args.lookback + 1.5)  # every record older than the window (1 s resolution)
                    print(f"  {asyncio.run(first_reads(url, settings, args.lookback))}", flush=True)
                broker.ctl("delete_vhost", vhost)
        if args.skip_latency:
            return
        url = broker.vhost("bench-latency")
        asyncio.run(stream_records(url, 1, settings))
        print(f"publish-to-readable, per-task queue: {asyncio.run(latency_queue(url, args.samples))}")
        print(f"publish-to-readable, stream: {asyncio.run(latency_stream(url, settings, args.samples))}")
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
