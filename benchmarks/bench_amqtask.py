"""amqtask's figures for run.py; also the app its worker processes run (``-A bench_amqtask``).

Defaults throughout: publisher confirms on every send, acks after the task ran, msgpack bodies, the
worker's default prefetch (concurrency x 4). A reply and any follow-up are confirmed before the ack.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from amqtask import App, AsyncResult

app = App("bench", broker=os.environ.get("BENCH_URL"), task_default_queue=os.environ.get("BENCH_QUEUE", "bench"))


@app.task(name="bench.noop", ignore_result=True)
def noop(i: int) -> None:
    return None


@app.task(name="bench.anoop", ignore_result=True)
async def anoop(i: int) -> None:
    return None


@app.task(name="bench.echo")
def echo(i: int) -> int:
    return i


WINDOW = 500  # sends in flight at once: the bulk figure


async def bulk(task: Any, queue: str, count: int) -> list[AsyncResult[Any]]:
    """Send ``count`` tasks from one client, ``WINDOW`` confirms in flight."""
    results: list[AsyncResult[Any]] = []
    for offset in range(0, count, WINDOW):
        sends = (task.aapply_async((i,), queue=queue) for i in range(offset, min(count, offset + WINDOW)))
        results += await asyncio.gather(*sends)
    return results


def main() -> None:
    from harness import Worker, emit, rate, round_trips, sequential_rate, settings, worker_command

    s = settings()
    n, prefix = s["count"], s["prefix"]
    queues = {kind: f"{prefix}-amqtask-{kind}" for kind in ("seq", "def", "async", "result")}
    figures: dict[str, Any] = {}

    figures["enqueue_sequential"] = sequential_rate(lambda i: noop.apply_async((i,), queue=queues["seq"]),
                                                    s["sequential"])  # fmt: skip
    figures["enqueue_bulk"] = rate(lambda: app.portal.run(bulk(noop, queues["def"], n)), n)
    app.portal.run(bulk(anoop, queues["async"], n))
    pending = app.portal.run(bulk(echo, queues["result"], n))

    def command(queue: str) -> list[str]:
        return worker_command("-m", "amqtask", "worker", "-A", "bench_amqtask:app", "-c", str(s["concurrency"]),
                              "-l", "warning", "-Q", queue)  # fmt: skip

    for kind in ("def", "async"):
        worker = Worker(command(queues[kind]), s["url"], queues[kind])
        try:
            figures[f"drain_{kind}"] = worker.drain(n)
        finally:
            worker.stop()

    async def collect() -> float:
        await asyncio.gather(*(result.aget(timeout=240) for result in pending))
        return time.perf_counter()

    worker = Worker(command(queues["result"]), s["url"], queues["result"])
    try:
        figures["drain_result"] = worker.drain(n, until=lambda: app.portal.run(collect()))
        worker.watch.close()  # its polling thread would share this process's GIL with the round trips
        call = lambda i: echo.apply_async((i,), queue=queues["result"]).get(timeout=30)  # noqa: E731
        figures["round_trip"] = round_trips(call, s["round_trips"])
    finally:
        worker.stop()
    app.close()
    emit(figures)


if __name__ == "__main__":
    main()
