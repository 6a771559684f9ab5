"""Priorities against a real broker: under a backlog, higher-priority tasks start first.

Each ordering test publishes the whole backlog *before* a worker starts, then runs one worker with
concurrency 1 and prefetch 1, so the broker picks every next message from a full queue and the order
in which tasks start is the order the broker chose. Classic queues use ``x-max-priority``; quorum
queues take none and order by priority the way the running RabbitMQ version does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from support.queues import delete
from support.workers import get_raw, running_worker

from amqtask import App, Task

pytestmark = pytest.mark.broker

#: The backlog: priorities in publishing order (each appears with its index as the task argument).
BACKLOG = [3, 0, 9, 5, 1, 7, 2, 8, 6, 4, 9, 0]


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"priority-{unique}", broker=broker_url, task_default_queue=f"{unique}-default")
    yield application
    application.close()


def run_backlog(app: App, queue: str) -> list[tuple[int, int]]:
    """Publish :data:`BACKLOG` to ``queue``, then drain it with one slot; ``(priority, index)`` in start order."""
    started: list[tuple[int, int]] = []

    @app.task(name="prio.record", bind=True)
    def record(self: Any, index: int) -> None:
        started.append((self.request.delivery_info["priority"] or 0, index))

    async def scenario() -> None:
        try:
            results = [
                await record.aapply_async((index,), queue=queue, priority=priority)
                for index, priority in enumerate(BACKLOG)
            ]
            async with running_worker(app, queues=[queue], concurrency=1, prefetch_multiplier=1):
                for result in results:
                    await result.aget(timeout=20)
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())
    print(f"\nstart order on {queue} as (priority, publish index): {started}")
    return started


def test_classic_priority_queue_starts_higher_priorities_first(app: App, unique: str) -> None:
    queue = f"{unique}-classic"
    app.conf.task_queues = {queue: {"max_priority": 10}}
    started = run_backlog(app, queue)
    # Highest priority first; equal priorities in publishing order.
    assert started == sorted(started, key=lambda item: (-item[0], item[1]))


def test_quorum_queue_orders_by_priority_as_the_broker_version_does(
    app: App, unique: str, rabbitmq_version_info: tuple[int, ...]
) -> None:
    queue = f"{unique}-quorum"
    app.conf.task_queues = {queue: {"queue_type": "quorum"}}
    started = run_backlog(app, queue)
    in_publish_order = sorted(started, key=lambda item: item[1])
    if rabbitmq_version_info < (4, 0):
        assert started == in_publish_order  # no priorities: FIFO
    elif rabbitmq_version_info < (4, 3):
        # Two classes (0-4 normal, 5+ high) served 2:1, each class in publishing order.
        high = [item for item in in_publish_order if item[0] > 4]
        assert started[0] == high[0]
        assert [item for item in started if item[0] > 4] == high
    else:
        assert started == sorted(started, key=lambda item: (-item[0], item[1]))  # strict levels


def test_priority_comes_from_the_call_the_task_or_the_default(app: App, unique: str, broker_url: str) -> None:
    queue = f"{unique}-prio"
    app.conf.task_queues = {queue: {"max_priority": 10}}
    app.conf.task_default_priority = 2

    @app.task(name="prio.urgent", priority=7, queue=queue, ignore_result=True)
    def urgent() -> None:
        """Never runs here: the test reads the wire."""

    async def scenario() -> set[tuple[str, int | None]]:
        try:
            await urgent.adelay()
            await urgent.aapply_async(priority=1)
            await app.asend_task("prio.other", queue=queue, ignore_result=True)
            raws = [await get_raw(broker_url, queue) for _ in range(3)]
            return {(str(raw.headers["task"]), raw.priority) for raw in raws}
        finally:
            await delete(app, [queue])
            await app.aclose()

    assert asyncio.run(scenario()) == {("prio.urgent", 7), ("prio.urgent", 1), ("prio.other", 2)}


def test_a_retry_keeps_the_priority(app: App, unique: str) -> None:
    queue = f"{unique}-prio"
    app.conf.task_queues = {queue: {"max_priority": 10}}

    @app.task(name="prio.retry_once", bind=True, queue=queue)
    def retry_once(self: Task[[], Any]) -> int:
        if not self.request.retries:
            raise self.retry(countdown=0)
        return int(self.request.delivery_info["priority"])

    async def scenario() -> None:
        try:
            async with running_worker(app, queues=[queue]):
                assert await (await retry_once.aapply_async(priority=6)).aget(timeout=10) == 6
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())
