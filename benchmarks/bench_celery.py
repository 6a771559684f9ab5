"""Celery's figures for run.py (``python bench_celery.py threads|prefork``); also the app its workers run.

Celery's documented defaults: no publisher confirms (``confirm_publish`` off), acks *before* the task
runs (``task_acks_late`` off), JSON bodies, prefetch multiplier 4, results over ``rpc://``. The worker
runs without gossip, mingle and heartbeats (common production flags; mingle alone adds a second to
start-up).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from celery import Celery, group

app = Celery("bench", broker=os.environ.get("BENCH_URL"), backend="rpc://")
app.conf.task_default_queue = os.environ.get("BENCH_QUEUE", "bench")


@app.task(name="bench.noop", ignore_result=True)
def noop(i: int) -> None:
    return None


@app.task(name="bench.echo")
def echo(i: int) -> int:
    return i


def main(pool: str) -> None:
    from celery.result import ResultSet
    from harness import Worker, emit, rate, round_trips, sequential_rate, settings, worker_command

    s = settings()
    n, prefix = s["count"], s["prefix"]
    queues = {kind: f"{prefix}-celery-{pool}-{kind}" for kind in ("seq", "def", "result")}
    figures: dict[str, Any] = {}

    figures["enqueue_sequential"] = sequential_rate(lambda i: noop.apply_async((i,), queue=queues["seq"]),
                                                    s["sequential"])  # fmt: skip
    figures["enqueue_bulk"] = rate(lambda: group(noop.s(i) for i in range(n)).apply_async(queue=queues["def"]), n)
    pending = ResultSet([echo.apply_async((i,), queue=queues["result"]) for i in range(n)])

    def command(queue: str) -> list[str]:
        return worker_command("-m", "celery", "-A", "bench_celery", "worker", "-P", pool, "-c", str(s["concurrency"]),
                              "--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", queue,
                              "-l", "warning")  # fmt: skip

    worker = Worker(command(queues["def"]), s["url"], queues["def"])
    try:
        figures["drain_def"] = worker.drain(n)
    finally:
        worker.stop()

    def collect() -> float:
        pending.get(timeout=240)
        return time.perf_counter()

    worker = Worker(command(queues["result"]), s["url"], queues["result"])
    try:
        figures["drain_result"] = worker.drain(n, until=collect)
        worker.watch.close()  # its polling thread would share this process's GIL with the round trips
        call = lambda i: echo.apply_async((i,), queue=queues["result"]).get(timeout=30)  # noqa: E731
        figures["round_trip"] = round_trips(call, s["round_trips"])
    finally:
        worker.stop()
    emit(figures)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "threads")
