"""Concurrency is the number of tasks *running* at once; deliveries beyond it wait for a slot."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from support.faults import wait_until
from support.workers import running_worker

from amqtask import App

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"conc-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", publish_timeout_s=10)
    yield application
    application.close()


def test_no_more_tasks_run_at_once_than_the_concurrency(app: App) -> None:
    # async tasks: nothing but the worker's slots bounds them (plain ones are also bounded by the threads).
    async def scenario() -> None:
        release = asyncio.Event()
        running: set[int] = set()
        peak = 0

        @app.task(name="conc.held")
        async def held(i: int) -> int:
            nonlocal peak
            running.add(i)
            peak = max(peak, len(running))
            await release.wait()
            running.discard(i)
            return i

        results = [await held.adelay(i) for i in range(6)]
        async with running_worker(app, concurrency=2, prefetch_multiplier=4) as worker:
            # All six delivered (prefetch 8): two run, four wait for a slot.
            await wait_until(lambda: len(running) == 2 and len(worker._waiting) == 4, 30, "2 running, 4 waiting")
            release.set()
            assert [await r.aget(timeout=30) for r in results] == list(range(6))
        assert peak == 2

    asyncio.run(scenario())
