"""``inspect reserved|scheduled`` and ``control add_consumer|cancel_consumer|shutdown`` answered by an amqtask
worker, asked by Celery's own client (as ``celery inspect`` / ``celery control`` ask) and by amqtask's CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from celery import Celery
from support.faults import consumer_count
from support.queues import cleanup, eventually
from support.workers import TESTS_DIR

from amqtask import App, Worker


def _amqtask_cli(broker_url: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url,
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "amqtask", *args, "-t", "10", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.broker
def test_reserved_and_scheduled_as_celery_asks(broker_url: str, unique: str) -> None:
    app = App("reserved", broker=broker_url, task_default_queue=unique)
    hostname = f"{unique}@reserved"
    release = threading.Event()

    @app.task(name=f"{unique}.hold")
    def hold(n: int) -> int:
        release.wait(30)
        return n

    celery = Celery("asker", broker=broker_url)

    async def scenario() -> tuple[list[str], Any, Any, dict[str, Any]]:
        worker = Worker(app, hostname=hostname, concurrency=1, prefetch_multiplier=3)
        await worker.start()
        try:
            results = [await hold.aapply_async((n,)) for n in range(3)]

            async def two_waiting() -> bool:
                return len(worker.reserved()) == 2

            await eventually(two_waiting, what="two deliveries waiting")
            inspect = celery.control.inspect(timeout=10, destination=[hostname])
            reserved, scheduled = await asyncio.to_thread(inspect.reserved), await asyncio.to_thread(inspect.scheduled)
            ours = await asyncio.to_thread(_amqtask_cli, broker_url, "inspect", "reserved", "-d", hostname)
            release.set()
            assert [await r.aget(timeout=30) for r in results] == [0, 1, 2]
            return [r.id for r in results], reserved, scheduled, ours
        finally:
            release.set()
            await worker.stop(grace=5)

    try:
        ids, reserved, scheduled, ours = asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        celery.close()
        asyncio.run(cleanup(app, [unique]))
    assert scheduled == {hostname: []}
    waiting = reserved[hostname]
    assert sorted(info["id"] for info in waiting) == sorted(ids[1:])
    assert {info["name"] for info in waiting} == {f"{unique}.hold"}
    assert sorted(info["args"] for info in waiting) == ["(1,)", "(2,)"]
    assert all(info["acknowledged"] is False and info["hostname"] == hostname for info in waiting)
    assert sorted(info["id"] for info in ours[hostname]) == sorted(ids[1:])


@pytest.mark.broker
def test_add_and_cancel_consumer_and_shutdown_as_celery_asks(broker_url: str, unique: str) -> None:
    app = App("consumers", broker=broker_url, task_default_queue=unique)
    extra = f"{unique}-extra"
    hostname = f"{unique}@consumers"

    @app.task(name=f"{unique}.echo")
    def echo(word: str) -> str:
        return word

    celery = Celery("asker", broker=broker_url)

    def control(method: str, queue: str) -> Any:
        return getattr(celery.control, method)(queue, destination=[hostname], reply=True, timeout=10)

    async def scenario() -> tuple[Any, Any, str, dict[str, Any]]:
        worker = Worker(app, hostname=hostname)
        await worker.start()
        try:
            added = await asyncio.to_thread(control, "add_consumer", extra)
            await eventually(lambda: consumer_count(broker_url, extra), what="a consumer on the added queue")
            ran = await (await echo.aapply_async(("extra",), queue=extra)).aget(timeout=30)
            cancelled = await asyncio.to_thread(control, "cancel_consumer", extra)
            await eventually(lambda: _no_consumer(broker_url, extra), what="the consumer of the queue gone")
            assert [q.name for q in worker.queues] == [unique]
            shutdown = await asyncio.to_thread(_amqtask_cli, broker_url, "control", "shutdown", "-d", hostname)
            await asyncio.wait_for(worker._stopped.wait(), 30)
            return added, cancelled, ran, shutdown
        finally:
            await worker.stop(grace=5)

    try:
        added, cancelled, ran, shutdown = asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        celery.close()
        asyncio.run(cleanup(app, [unique, extra]))
    assert added == [{hostname: {"ok": f"add consumer {extra}"}}]
    assert ran == "extra"
    assert cancelled == [{hostname: {"ok": f"no longer consuming from {extra}"}}]
    assert shutdown == {hostname: {"ok": "shutting down"}}


async def _no_consumer(url: str, queue: str) -> bool:
    return await consumer_count(url, queue) == 0
