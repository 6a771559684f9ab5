"""Broker-state helpers for routing, priority, retry and dead-letter tests.

``eventually`` polls an async condition with a deadline (tests never sleep blindly); ``QueueStats``
reads what only the broker knows (unacked counts, queue arguments) through rabbitmqctl; ``delete``
removes what a test declared, dead-letter queues included; ``run_cli`` runs ``amqtask`` against the
``broker_tasks`` app as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from amqtask import App, topology
from amqtask.topology import DLQ_SUFFIX

from .broker import TestBroker
from .workers import TESTS_DIR

T = TypeVar("T")


async def eventually(condition: Callable[[], Awaitable[T]], timeout: float = 15.0, what: str = "condition") -> T:
    """Await ``condition()`` every 20 ms until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def delete(app: App, queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
    """Delete queues (with their dead-letter queues) and exchanges a test declared."""
    broker = app.runtime().broker
    for name in queues:
        await topology.delete_queue(broker, name)
        await topology.delete_queue(broker, name + DLQ_SUFFIX)
    for name in exchanges:
        await topology.delete_exchange(broker, name)


async def cleanup(app: App, queues: Iterable[str]) -> None:
    """Delete a test's queues, then close the app's connection of this loop (so nothing is left pending)."""
    await delete(app, queues)
    await app.aclose()


class QueueStats:
    """Per-queue numbers from ``rabbitmqctl list_queues`` for one vhost."""

    def __init__(self, rabbitmq: TestBroker, vhost: str) -> None:
        self.rabbitmq = rabbitmq
        self.vhost = vhost

    def row(self, queue: str) -> dict[str, Any]:
        """The queue's ``type``, ``arguments`` (a dict), ``messages_ready`` and ``messages_unacknowledged``."""
        out = self.rabbitmq.ctl(
            "-q", "list_queues", "-p", self.vhost, "name", "type", "arguments", "messages_ready",
            "messages_unacknowledged", "--formatter", "json",
        )  # fmt: skip
        for row in json.loads(out):
            if row["name"] == queue:
                row["arguments"] = {name: value for name, _type, value in row["arguments"]}
                return dict(row)
        raise AssertionError(f"queue {queue!r} not found in vhost {self.vhost!r}")

    def counts(self, queue: str) -> tuple[int, int]:
        """``(ready, unacked)`` messages of ``queue``."""
        row = self.row(queue)
        return int(row["messages_ready"]), int(row["messages_unacknowledged"])


def run_cli(broker_url: str, prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m amqtask ARGS`` with ``broker_tasks`` importable, its queues named after ``prefix``."""
    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url, "BROKER_TASKS_PREFIX": prefix}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "amqtask", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
