"""Worker memory over a long run: RSS of one worker process while it runs 100,000 tasks.

    python benchmarks/memory.py [--tasks 100000] [--every 10000] [--concurrency 8] [--url amqp://...]

Without --url (or AMQTASK_BROKER_URL) it starts the throwaway RabbitMQ 3.10 of deploy/rabbitmq.sh.
The worker is a real ``amqtask worker`` subprocess (this file is its app); this process sends the
tasks, keeps at most two windows of them unfinished (so the backlog, not the worker, never grows),
waits for every result, and reads the worker's RSS from /proc every ``--every`` tasks. The tasks
take the paths a production worker takes: arguments decoded, a sync task in the thread pool, a
result sent back, and one task in a hundred failing (dead-lettered with its traceback).

It prints the curve and the growth after warm-up: RSS at the end against RSS after the first
``--every`` tasks, which is when caches, pools and the allocator have reached their working size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness import broker_url, rss_kib

from amqtask import App, AsyncResult, RemoteTaskError, topology

HERE = Path(__file__).resolve().parent

app = App("memory", task_default_queue=os.environ.get("MEMORY_QUEUE", "memory"))


@app.task(name="memory.work")
def work(n: int, payload: dict[str, Any]) -> dict[str, Any]:
    """A small piece of work on its arguments; one call in a hundred fails."""
    if n % 100 == 99:
        raise ValueError(f"task {n} fails on purpose")
    return {"n": n, "size": len(payload["text"]), "keys": sorted(payload)}


def start_worker(url: str, queue: str, concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AMQTASK_BROKER_URL": url, "MEMORY_QUEUE": queue}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    with log.open("wb") as out:  # the failing tasks log an error each: keep them off the curve
        return subprocess.Popen(
            [sys.executable, "-m", "amqtask", "worker", "-A", "memory:app", "-c", str(concurrency), "-l", "warning"],
            env=env,
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_consuming(client: App, queue: str, timeout: float = 60) -> None:
    broker = client.runtime().broker
    deadline = time.monotonic() + timeout
    while not (await topology.queue_exists(broker, queue) and await _consumers(client, queue)):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not start consuming")
        await asyncio.sleep(0.1)


async def _consumers(client: App, queue: str) -> int:
    channel = await client.runtime().broker.channel(confirms=False)
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    finally:
        await channel.close()


async def settle(results: list[AsyncResult[Any]]) -> int:
    """Wait for every result; return how many failed (on purpose)."""
    failed = 0
    for result in results:
        try:
            await result.aget(timeout=120)
        except RemoteTaskError:
            failed += 1
    return failed


async def run(url: str, tasks: int, every: int, window: int, concurrency: int) -> list[tuple[int, int]]:
    queue = f"memory-{uuid.uuid4().hex[:8]}"
    client = App("memory-client", broker=url, task_default_queue=queue, publish_timeout_s=120)
    log = Path(tempfile.gettempdir()) / f"{queue}-worker.log"
    worker = start_worker(url, queue, concurrency, log)
    curve: list[tuple[int, int]] = []
    failed = 0
    try:
        await wait_consuming(client, queue)
        curve.append((0, rss_kib(worker.pid)))
        text = "x" * 512
        outstanding: list[list[AsyncResult[Any]]] = []
        done = 0
        started = time.perf_counter()
        for offset in range(0, tasks, window):
            batch = range(offset, min(tasks, offset + window))
            sends = (client.asend_task("memory.work", (n, {"text": text, "n": n, "tags": ["a", "b"]})) for n in batch)
            outstanding.append(list(await asyncio.gather(*sends)))
            while len(outstanding) > 2 or (outstanding and offset + window >= tasks):
                finished = outstanding.pop(0)
                failed += await settle(finished)
                before, done = done, done + len(finished)
                if done // every > before // every:
                    curve.append((done, rss_kib(worker.pid)))
                    rate = done / (time.perf_counter() - started)
                    print(f"  {done:>7} tasks  RSS {curve[-1][1] / 1024:7.1f} MiB  ({rate:.0f} tasks/s)", flush=True)
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}; its log: {log}")
    finally:
        worker.terminate()
        worker.wait(60)
        broker = client.runtime().broker
        for name in (queue, f"{queue}.dlq"):
            await topology.delete_queue(broker, name)
        await client.aclose()
    print(f"  ({failed} tasks failed on purpose and were dead-lettered; worker log: {log})")
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000, help="sample the worker's RSS every N tasks")
    parser.add_argument("--window", type=int, default=2_000, help="tasks sent at once (two windows unfinished)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--url")
    args = parser.parse_args()
    url = broker_url(args.url)
    print(f"worker RSS over {args.tasks} tasks (concurrency {args.concurrency}), sampled every {args.every}:")
    curve = asyncio.run(run(url, args.tasks, args.every, args.window, args.concurrency))
    print("\n  tasks   RSS (KiB)")
    for done, rss in curve:
        print(f"{done:>7}   {rss:>9}")
    warm = next((rss for done, rss in curve if done >= args.every), curve[0][1])
    end = curve[-1][1]
    print(
        f"\nafter warm-up ({args.every} tasks): {warm} KiB -> {end} KiB at {curve[-1][0]} tasks: "
        f"growth {end - warm:+d} KiB, {100 * (end - warm) / warm:+.2f} %"
    )


if __name__ == "__main__":
    main()
