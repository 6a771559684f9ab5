"""Real Celery (and amqtask) worker processes and Celery clients for the interoperability tests.

Workers run as subprocesses whose output goes to a file; ``celery_client`` builds a Celery app in the
test's process. The task modules are ``interop_celery_app`` and ``interop_amqtask_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import interop_amqtask_app as amq_side
import interop_celery_app as celery_side
import kombu.pools

from amqtask.topology import DLQ_SUFFIX

from .faults import consumer_count
from .workers import TESTS_DIR, wait_for


def consumers(url: str, queue: str) -> int:
    """Consumers on ``queue`` (0 when it does not exist yet), from a passive declare."""
    return asyncio.run(consumer_count(url, queue))


def depth(url: str, queue: str) -> int:
    async def depth() -> int:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    return asyncio.run(depth())


def delete_objects(url: str, queues: tuple[str, ...] = (), exchanges: tuple[str, ...] = ()) -> None:
    """Delete what a test declared (queues with their dead-letter queues; exchanges Celery made)."""

    async def delete() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            for name in queues:
                await channel.queue_delete(name)
                await channel.queue_delete(name + DLQ_SUFFIX)
            for name in exchanges:
                await channel.exchange_delete(name)

    asyncio.run(delete())


@dataclass
class Process:
    """A worker subprocess whose output goes to a file (a pipe nobody reads could fill up and block it)."""

    popen: subprocess.Popen[bytes]
    log: Path
    name: str
    hostname: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")

    def stop(self, timeout: float = 20) -> str:
        """SIGTERM (a warm shutdown for both workers), wait, and return the output."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM:\n{self.output()}") from None
        return self.output()


def start_process(name: str, argv: list[str], env: dict[str, str], log: Path, hostname: str) -> Process:
    environment = {**os.environ, **env}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), environment.get("PYTHONPATH", "")])
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*argv, "-n", hostname], env=environment, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(popen, log, name, hostname)


def wait_consuming(process: Process, url: str, queues: tuple[str, ...], timeout: float = 30) -> None:
    def ready() -> bool:
        process.check_running()
        return all(consumers(url, queue) >= 1 for queue in queues)

    try:
        wait_for(ready, timeout, f"{process.name} to consume {', '.join(queues)}")
    except AssertionError:
        process.stop()
        raise


def interop_env(url: str, queue: str, serializer: str) -> dict[str, str]:
    return {"INTEROP_BROKER_URL": url, "INTEROP_QUEUE": queue, "INTEROP_SERIALIZER": serializer}


def start_celery_worker(url: str, queue: str, serializer: str, log: Path, *extra_queues: str) -> Process:
    """``celery worker -P solo`` consuming ``queue``, its priority queue and ``extra_queues``."""
    queues = (queue, celery_side.priority_queue(queue), *extra_queues)
    argv = [sys.executable, "-m", "celery", "-A", "interop_celery_app", "worker", "-P", "solo", "-c", "1",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
            "-Q", ",".join(queues)]  # fmt: skip
    process = start_process(
        "celery worker", argv, interop_env(url, queue, serializer), log, f"celeryw-{uuid.uuid4().hex[:8]}@localhost"
    )
    wait_consuming(process, url, queues)
    return process


def start_amqtask_worker(url: str, queue: str, serializer: str, log: Path) -> Process:
    """``amqtask worker -A interop_amqtask_app`` consuming ``queue`` and its priority queue."""
    queues = (queue, amq_side.priority_queue(queue))
    argv = [sys.executable, "-m", "amqtask", "worker", "-A", "interop_amqtask_app", "-l", "info",
            "-c", "4", "-Q", ",".join(queues)]  # fmt: skip
    process = start_process(
        "amqtask worker", argv, interop_env(url, queue, serializer), log, f"amqtask-{uuid.uuid4().hex[:8]}@localhost"
    )
    wait_consuming(process, url, queues)
    return process


@contextlib.contextmanager
def celery_client(url: str, queue: str, serializer: str, **kwargs: Any) -> Iterator[Any]:
    """A Celery app in this process (a client), its connections closed afterwards."""
    app = celery_side.create_app(url, queue, serializer, **kwargs)
    try:
        yield app
    finally:
        consumer = app.backend.result_consumer
        if getattr(consumer, "_consumer", None) is not None:
            consumer.stop()
        app.close()
        # kombu keeps producer connections in process-wide pools keyed by URL, and each remembers the
        # queues it declared: close them, so the next client declares again (and leaks no socket).
        kombu.pools.reset()


def queue_pair(queue: str) -> tuple[str, ...]:
    return (queue, celery_side.priority_queue(queue))
