"""Drain rate with task events on (``worker -E``) against off, in one run.

    python benchmarks/events.py [--count 10000] [--rounds 7] [--url amqp://...]

Each round queues ``--count`` no-op ``async def`` tasks and drains them with a real ``amqtask worker``
process (concurrency 8) three times: events off, events on with nobody listening (the broker drops
them), and events on with a reader consuming them in a process of its own, as Flower would
(``amqtask events``' queue). A drain is timed as every benchmark here times one (``harness.Worker``):
from the queue's first drop until it is empty, the worker's start-up and shutdown left out, with the
worker process's CPU time over the same span. The rounds alternate so drift on a busy machine hits
every mode alike; the ratios of the medians (on / off) are the figures that matter. Target: >= 0.9.

Two ratios: by drain rate, and by the worker's CPU time per task (which other load on a shared
machine disturbs less than the wall clock). The spread of each mode across rounds says how noisy the
run was.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import uuid

from harness import Worker, broker_url, worker_command

from amqtask import App, topology
from amqtask.monitoring.receiver import stream

MODES = {"off": (False, False), "on, nobody listening": (True, False), "on, a reader consuming": (True, True)}


def drain(url: str, count: int, events: bool, listen: bool) -> tuple[float, float]:
    """Tasks per second, and the worker's CPU microseconds per task, draining ``count`` queued no-op tasks."""
    from bench_amqtask import anoop, app, bulk

    queue = f"bench-events-{uuid.uuid4().hex[:8]}"
    app.portal.run(bulk(anoop, queue, count))
    reader = _start_reader(url) if listen else None
    command = worker_command("-m", "amqtask", "worker", "-A", "bench_amqtask:app", "-c", "8", "-l", "warning",
                             "-Q", queue, *(["-E"] if events else []))  # fmt: skip
    worker = Worker(command, url, queue, env={"BENCH_URL": url})
    try:
        figures = worker.drain(count)
    finally:
        worker.stop()
        if reader is not None:
            reader.kill()
            reader.wait()
        asyncio.run(_delete(url, queue))
    return figures["rate"], figures["cpu_us_per_task"]


def _start_reader(url: str) -> subprocess.Popen[bytes]:
    """A process reading the event stream (this script with ``--read``), once its queue is bound."""
    reader = subprocess.Popen([sys.executable, __file__, "--read", "--url", url], stdout=subprocess.PIPE)
    assert reader.stdout is not None and reader.stdout.readline() == b"bound\n"
    return reader


async def _read(url: str) -> None:
    app = App("bench-reader", broker=url)
    async for _ in stream(app.runtime().broker, ready=lambda: print("bound", flush=True)):
        pass


async def _delete(url: str, queue: str) -> None:
    app = App("bench-cleanup", broker=url)
    for name in (queue, f"{queue}.dlq"):
        await topology.delete_queue(app.runtime().broker, name)
    await app.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--url")
    parser.add_argument("--read", action="store_true", help=argparse.SUPPRESS)  # the reader's own process
    args = parser.parse_args()
    url = broker_url(args.url)
    if args.read:
        asyncio.run(_read(url))
        return
    os.environ["BENCH_URL"] = url  # read by bench_amqtask's app when it is imported
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpus: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, (events, listen) in MODES.items():
            rate, cpu = drain(url, args.count, events, listen)
            rates[mode].append(rate)
            cpus[mode].append(cpu)
    off_rate, off_cpu = statistics.median(rates["off"]), statistics.median(cpus["off"])
    print(f"{args.count} no-op async def tasks, concurrency 8, {args.rounds} rounds (median, then min-max)")
    for mode in MODES:
        rate, cpu = statistics.median(rates[mode]), statistics.median(cpus[mode])
        rate_spread = f"{min(rates[mode]):.0f}-{max(rates[mode]):.0f}"
        cpu_spread = f"{min(cpus[mode]):.0f}-{max(cpus[mode]):.0f}"
        print(f"{mode:24}{rate:>8.0f}/s ({rate_spread}) ratio {rate / off_rate:.2f}   "
              f"CPU {cpu:.0f} us/task ({cpu_spread}) ratio {off_cpu / cpu:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
