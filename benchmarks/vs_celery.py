"""amqtask next to Celery 5 on the same broker: send N no-op tasks, then drain them with one worker.

    pip install celery && python benchmarks/vs_celery.py [--count 20000] [--url amqp://...]

Both sides get the same guarantees: publisher confirms on send, ack after the task ran, JSON
bodies, a plain (non-async) task, 8 threads, prefetch 32. Sends are from one thread, one at a time,
as a script or a Django view sends them (Celery) — amqtask's sync ``delay`` in the same loop. The
drain is timed from the worker's "ready" log line to the queue being empty.
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

import aio_pika

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import broker_url  # noqa: E402


async def _depth(url: str, queue: str) -> tuple[int, int]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0), int(declared.declaration_result.consumer_count or 0)


def drain(command: list[str], ready_marker: str, url: str, queue: str, env: dict[str, str]) -> float:
    """Start a worker, wait for its ready line, and time until the queue is empty (bounded: 10 min)."""
    with tempfile.TemporaryFile("w+") as log:
        # A file, not a pipe: a worker logging every task would block on a full pipe nobody reads.
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=HERE)
        deadline = time.monotonic() + 600
        while True:
            log.seek(0)
            if ready_marker in log.read():
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"worker did not get ready:\n{log.read()[-3000:]}")
            time.sleep(0.05)
        start = time.perf_counter()
        while asyncio.run(_depth(url, queue))[0] > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the queue did not drain within 10 minutes")
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
        worker.terminate()
        worker.wait(timeout=60)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--url")
    args = parser.parse_args()
    url = broker_url(args.url)
    n = args.count
    figures = {}
    for side in ("celery", "amqtask"):
        queue = f"bench-{side}-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_QUEUE": queue, "PYTHONPATH": str(HERE)}
        os.environ.update(BENCH_BROKER_URL=url, BENCH_QUEUE=queue)
        if side == "celery":
            import celery_app as module

            start = time.perf_counter()
            for _ in range(n):
                module.noop.delay()
            send = time.perf_counter() - start
            command = ["celery", "-A", "celery_app", "worker", "-P", "threads", "-c", "8", "--without-gossip",
                       "--without-mingle", "--without-heartbeat", "-Q", queue, "-l", "info"]  # fmt: skip
            ready = "ready."
        else:
            import amqtask_app as module  # type: ignore[no-redef]

            start = time.perf_counter()
            for _ in range(n):
                module.noop.delay()
            send = time.perf_counter() - start
            module.app.close()
            command = [sys.executable, "-m", "amqtask", "worker", "-A", "amqtask_app", "-c", "8", "-l", "info"]
            ready = "consuming"
        figures[side] = (send, drain(command, ready, url, queue, env))
    (c_send, c_drain), (a_send, a_drain) = figures["celery"], figures["amqtask"]
    print(f"{n} tasks, one sender thread, one worker process with 8 threads")
    print(f"{'':8}{'Celery':>14}{'amqtask':>14}{'amqtask/Celery':>16}")
    print(f"{'send':8}{n / c_send:>12.0f}/s{n / a_send:>12.0f}/s{c_send / a_send:>16.2f}")
    print(f"{'drain':8}{n / c_drain:>12.0f}/s{n / a_drain:>12.0f}/s{c_drain / a_drain:>16.2f}")


if __name__ == "__main__":
    main()
