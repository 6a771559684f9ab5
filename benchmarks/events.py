"""Drain rate with task events on (``worker -E``) against off, in one run.

    python benchmarks/events.py [--count 10000] [--rounds 3] [--url amqp://...]

Each round publishes ``--count`` no-op tasks and drains them with a burst worker three times: events
off, events on with nobody listening (the broker drops them), and events on with a reader consuming
them (``amqtask events``' queue). The rounds alternate so drift on a busy machine hits every mode alike;
the ratios of the medians (on / off) are the figures that matter. Target: >= 0.9.

Two ratios: by wall-clock drain rate, and by the worker process's CPU time per task (``process_time``,
which other load on a shared machine disturbs far less than the wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from harness import broker_url

from amqtask import App, Worker, topology
from amqtask.monitoring.receiver import stream


async def drain(url: str, count: int, events: bool, listen: bool) -> tuple[float, float]:
    """Wall-clock and CPU seconds a burst worker takes to drain ``count`` no-op tasks."""
    queue_name = f"bench-events-{uuid.uuid4().hex[:8]}"
    app = App("bench", broker=url, task_default_queue=queue_name, worker_send_task_events=events)

    @app.task(name="bench.noop", ignore_result=True)
    async def noop() -> None:
        return None

    for offset in range(0, count, 500):
        await asyncio.gather(*(noop.adelay() for _ in range(min(500, count - offset))))
    reader: asyncio.Task[Any] | None = None
    if listen:
        bound = asyncio.Event()
        reader = asyncio.create_task(_read(App("bench-reader", broker=url), bound))
        await bound.wait()
    worker = Worker(app, concurrency=8, burst=True)
    start, cpu = time.perf_counter(), time.process_time()
    await worker.run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert worker.stats["succeeded"] == count, worker.stats
    if reader is not None:
        reader.cancel()
    cleanup = App("bench-cleanup", broker=url)
    for name in (queue_name, f"{queue_name}.dlq"):
        await topology.delete_queue(cleanup.runtime().broker, name)
    await cleanup.aclose()
    return seconds, cpu


async def _read(app: App, bound: asyncio.Event) -> None:
    try:
        async for _ in stream(app.runtime().broker, ready=bound.set):
            pass
    finally:
        await app.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url")
    args = parser.parse_args()
    url = broker_url(args.url)
    modes = {"off": (False, False), "on, nobody listening": (True, False), "on, a reader consuming": (True, True)}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpus: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, (events, listen) in modes.items():
            wall, cpu = asyncio.run(drain(url, args.count, events, listen))
            times[mode].append(wall)
            cpus[mode].append(cpu)
    off, off_cpu = statistics.median(times["off"]), statistics.median(cpus["off"])
    print(f"{args.count} no-op tasks, concurrency 8, {args.rounds} rounds (median)")
    for mode, seconds in times.items():
        median, cpu = statistics.median(seconds), statistics.median(cpus[mode])
        spread = f"{args.count / max(seconds):.0f}-{args.count / min(seconds):.0f}/s"
        print(f"{mode:24}{args.count / median:>8.0f}/s ({spread}) ratio {off / median:.2f}   "
              f"CPU {cpu / args.count * 1e6:.0f} us/task, ratio {off_cpu / cpu:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
