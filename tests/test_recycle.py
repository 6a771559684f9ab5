"""``--max-tasks-per-child`` / ``--max-memory-per-child``: a supervised worker process that reaches its limit
finishes its tasks and is replaced, and no task is lost on the way."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from support.queues import cleanup
from support.workers import stop_process, worker_process

from amqtask import App

TASKS = 50
MAX_TASKS = 5
CONCURRENCY = 2


async def _pids(app: App, count: int) -> list[int]:
    results = [await app.asend_task("mon.pid") for _ in range(count)]
    return [await result.aget(timeout=120) for result in results]


@pytest.mark.broker
def test_children_are_replaced_after_max_tasks_and_nothing_is_lost(broker_url: str, unique: str) -> None:
    app = App("asker", broker=broker_url, task_default_queue=unique)
    process = worker_process(
        "monitoring_tasks", broker_url, "-P", "2", "-c", str(CONCURRENCY), "--max-tasks-per-child", str(MAX_TASKS),
        env={"AMQTASK_TASK_DEFAULT_QUEUE": unique},
    )  # fmt: skip
    try:
        pids = asyncio.run(asyncio.wait_for(_pids(app, TASKS), 240))
    finally:
        out = stop_process(process)
        asyncio.run(cleanup(app, [unique]))
    per_child = Counter(pids)
    assert len(pids) == TASKS
    # A child stops taking tasks once it has started MAX_TASKS; the ones already past the broker finish.
    assert max(per_child.values()) <= MAX_TASKS + CONCURRENCY - 1, per_child
    assert len(per_child) >= TASKS // (MAX_TASKS + CONCURRENCY - 1), per_child
    assert "reached its task or memory limit; replacing it" in out


@pytest.mark.broker
def test_a_child_over_its_memory_limit_is_replaced_after_its_task(broker_url: str, unique: str) -> None:
    app = App("asker", broker=broker_url, task_default_queue=unique)
    # 1 KiB: every process is over it, so each child runs one task (one at a time, prefetch 1), then goes.
    process = worker_process(
        "monitoring_tasks", broker_url, "-c", "1", "--prefetch-multiplier", "1", "--max-memory-per-child", "1",
        env={"AMQTASK_TASK_DEFAULT_QUEUE": unique},
    )  # fmt: skip
    try:
        pids = asyncio.run(asyncio.wait_for(_pids(app, 3), 120))
    finally:
        out = stop_process(process)
        asyncio.run(cleanup(app, [unique]))
    assert len(set(pids)) == 3, pids
    assert "peak memory" in out
