"""Running amqtask workers inside tests: in this process (a thread with its own loop) or as subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika

from amqtask import App, Worker
from amqtask.testing import background_worker

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = TESTS_DIR.parent


@contextlib.asynccontextmanager
async def running_worker(app: App, **options: Any) -> AsyncIterator[Worker]:
    """An in-process worker on the current event loop, stopped (gracefully) on exit."""
    worker = Worker(app, **options)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(grace=10)


@contextlib.contextmanager
def worker_thread(app: App, **options: Any) -> Iterator[Worker]:
    """A worker on its own event loop in a thread, so a test can use the synchronous API against it."""
    with background_worker(app, stop_grace=10, **options) as worker:
        yield worker


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` (broker or file state) until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def worker_process(
    module: str, broker_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m amqtask worker -A module ...`` with the tests directory importable."""
    environment = {**os.environ, "AMQTASK_BROKER_URL": broker_url, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), environment.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "amqtask", "worker", "-A", module, "-l", "info", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> str:
    """Signal a subprocess, wait for it, return its output."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(
            f"worker did not exit within {timeout}s of {sig!r}:\n{out.decode(errors='replace')}"
        ) from None
    return out.decode(errors="replace")


async def queue_depth(url: str, queue: str) -> int:
    """Ready messages in ``queue`` (a passive declare on a connection of its own)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def get_raw(url: str, queue: str, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
    """Wait for one message in ``queue`` and take it (acked), for checking what went over the wire."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + timeout
        while True:
            message = await declared.get(fail=False)
            if message is not None:
                await message.ack()
                return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no message in {queue} within {timeout}s")
            await asyncio.sleep(0.02)
