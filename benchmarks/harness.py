"""What every system's benchmark shares: the broker URL, a queue-depth watch, timing a worker's drain.

Each ``bench_<system>.py`` runs in a process of its own (started by ``run.py``) so that no system's
imports, threads or memory weigh on another's figures; it prints one JSON object on its last line.
Rates are timed from outside the worker, the same way for every system: a drain starts when the
queue's ready count first drops (the worker took its first prefetch) and ends when it reaches zero,
or, for tasks with results, when the caller holds the last result.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Generous bound for any one phase: a run that cannot finish within it is broken, not slow.
PHASE_TIMEOUT_S = 240.0


def broker_url(explicit: str | None = None, *, from_env: bool = True) -> str:
    """``explicit``, else AMQTASK_BROKER_URL, else the throwaway RabbitMQ 3.10 of deploy/rabbitmq.sh."""
    if explicit:
        return explicit
    if from_env and os.environ.get("AMQTASK_BROKER_URL"):
        return os.environ["AMQTASK_BROKER_URL"].split(",")[0]
    out = subprocess.run(["bash", str(REPO / "deploy" / "rabbitmq.sh"), "start", "--version", "3.10"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


def settings() -> dict[str, Any]:
    """The run's parameters, passed by run.py in the environment."""
    return {
        "url": os.environ["BENCH_URL"],
        "prefix": os.environ.get("BENCH_PREFIX", "bench"),
        "count": int(os.environ.get("BENCH_COUNT", "20000")),
        "sequential": int(os.environ.get("BENCH_SEQUENTIAL", "2000")),
        "round_trips": int(os.environ.get("BENCH_ROUND_TRIPS", "500")),
        "concurrency": int(os.environ.get("BENCH_CONCURRENCY", "8")),
    }


def emit(figures: dict[str, Any]) -> None:
    """Hand the figures to run.py (the last line of stdout)."""
    print(json.dumps(figures), flush=True)


def rss_kib(pid: int) -> int:
    """Resident set size of a process and all its descendants, in KiB (what the machine pays)."""
    total = 0
    for one in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


def cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (live ones, and reaped ones)."""
    total = 0
    for one in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sequential_rate(send: Callable[[int], object], count: int) -> float:
    """Sends per second of ``count`` calls of ``send(i)`` one after the other (a first, untimed call connects)."""
    send(0)
    return rate(lambda: [send(i) for i in range(count)], count)


def rate(action: Callable[[], object], count: int) -> float:
    """``count`` per second of the time ``action()`` takes."""
    start = time.perf_counter()
    action()
    return round(count / (time.perf_counter() - start), 1)


def round_trips(call: Callable[[int], object], count: int) -> dict[str, float]:
    """Percentiles of ``count`` sequential ``call(i)``, each of which must return ``i``."""
    latencies = []
    for i in range(count):
        start = time.perf_counter()
        if call(i) != i:
            raise RuntimeError(f"round trip {i} came back wrong")
        latencies.append(time.perf_counter() - start)
    return percentiles(latencies)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99 of latencies in seconds, as milliseconds."""
    ordered = sorted(samples)

    def at(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99)}


class DepthWatch:
    """A thread polling a queue's ready-message count every few milliseconds on one connection."""

    def __init__(self, url: str, queue: str, interval: float = 0.01) -> None:
        self.url, self.queue, self.interval = url, queue, interval
        self.depth: int | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._poll()), daemon=True)
        self._thread.start()

    async def _poll(self) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            while not self._stop.is_set():
                declared = await channel.declare_queue(self.queue, passive=True)
                with self._changed:
                    self.depth = int(declared.declaration_result.message_count or 0)
                    self._changed.notify_all()
                await asyncio.sleep(self.interval)

    def wait(self, done: Callable[[int], bool], timeout: float = PHASE_TIMEOUT_S) -> float:
        """Block until ``done(depth)``; return the time it was first seen true."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.depth is None or not done(self.depth):
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"queue {self.queue}: gave up waiting (depth {self.depth})")
            return time.perf_counter()

    def close(self) -> None:
        """Stop polling (again: a no-op)."""
        self._stop.set()
        self._thread.join(5)


class Worker:
    """A worker process of some system, started on a full queue: start-up, drain rate and RSS."""

    def __init__(self, command: list[str], url: str, queue: str, env: dict[str, str] | None = None) -> None:
        self.command, self.queue = command, queue
        self.watch = DepthWatch(url, queue)
        self.watch.wait(lambda depth: True)
        self.log = open(f"/tmp/{queue}-worker.log", "w+b")  # noqa: SIM115 (closed in stop)
        full_env = {**os.environ, **(env or {}), "BENCH_QUEUE": queue}
        full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
        self.spawned = time.perf_counter()
        self.process = subprocess.Popen(command, env=full_env, cwd=HERE, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        self.first = 0.0

    def drain(self, count: int, until: Callable[[], float] | None = None) -> dict[str, float]:
        """Time the drain of ``count`` queued tasks, and the worker's CPU per task meanwhile.

        ``until`` returns the end time when it is not the queue's emptying (tasks with results).
        """
        try:
            self.first = self.watch.wait(lambda depth: depth < count)
            cpu_first = cpu_s(self.process.pid)
            end = until() if until is not None else self.watch.wait(lambda depth: depth == 0)
            cpu = cpu_s(self.process.pid) - cpu_first
        except RuntimeError as exc:
            self.log.seek(0)
            raise RuntimeError(f"{exc}; worker log:\n{self.log.read()[-3000:].decode(errors='replace')}") from None
        return {"rate": round(count / (end - self.first), 1), "startup_s": round(self.first - self.spawned, 3),
                "rss_mib": round(rss_kib(self.process.pid) / 1024, 1),
                "cpu_us_per_task": round(1e6 * cpu / count, 1)}  # fmt: skip

    def stop(self) -> None:
        started = time.perf_counter()
        self.watch.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        print(f"{self.queue}: stopped in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def worker_command(*args: str) -> list[str]:
    """A command run with this interpreter (the bench environment's)."""
    return [sys.executable, *args]
