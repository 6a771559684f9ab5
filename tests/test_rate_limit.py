"""Per-task rate limits (Celery's ``rate_limit``): the rate is kept, the broker's prefetch still bounds what a
worker holds, and ``control rate_limit`` changes it at runtime, asked by amqtask's CLI or Celery's client."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from celery import Celery
from support.broker import TestBroker
from support.queues import QueueStats, cleanup, eventually
from support.workers import TESTS_DIR, queue_depth, running_worker

from amqtask import App, ConfigurationError
from amqtask.errors import TimeoutError as ResultTimeout
from amqtask.ratelimit import parse_rate

# Slow enough that the run (TASKS / RATE = 6 s) outlasts several rabbitmqctl samples on a loaded machine.
RATE = 5.0
TASKS = 30


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("100/s", 100.0), ("10/m", 10 / 60), ("500/h", 500 / 3600), (5, 5.0), ("2.5", 2.5), ("0", None), (None, None)],
)
def test_rates_read_like_celerys(text: Any, per_second: float | None) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


def test_a_bad_rate_is_a_clear_error_naming_the_task() -> None:
    app = App("bad")
    with pytest.raises(ConfigurationError, match=r"task 'slow'.*invalid rate limit '10/d'"):
        app.task(name="slow", rate_limit="10/d")(lambda: None)
    with pytest.raises(ConfigurationError, match="task_default_rate_limit"):
        App("bad", task_default_rate_limit="-1/s")


@pytest.mark.broker
def test_the_rate_is_kept_and_waiting_deliveries_stay_within_the_prefetch(
    broker_url: str, rabbitmq: TestBroker, broker_vhost: str, unique: str
) -> None:
    app = App("limited", broker=broker_url, task_default_queue=unique)

    @app.task(name=f"{unique}.stamp", rate_limit=f"{RATE:g}/s")
    def stamp() -> float:
        return time.time()

    stats = QueueStats(rabbitmq, broker_vhost)

    async def scenario() -> tuple[list[float], list[tuple[int, int]]]:
        async with running_worker(app, concurrency=2, prefetch_multiplier=2) as worker:
            assert worker.prefetch == 4
            results = [await stamp.adelay() for _ in range(TASKS)]
            collecting = asyncio.gather(*(r.aget(timeout=60) for r in results))
            samples = []
            while not collecting.done():
                samples.append(await asyncio.to_thread(stats.counts, unique))
            return await collecting, samples

    try:
        starts, samples = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        asyncio.run(cleanup(app, [unique]))
    starts.sort()
    measured = (len(starts) - 1) / (starts[-1] - starts[0])
    # At most the limit (one token at a time, never a burst); not far below it on a loaded machine.
    assert RATE * 0.6 <= measured <= RATE * 1.05, measured
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.5 / RATE
    waiting = [(ready, unacked) for ready, unacked in samples if ready > 0]
    assert waiting, f"no sample caught messages still in the queue: {samples}"
    # Waiting tasks hold their deliveries (unacked) but never more than the prefetch; the rest stay ready.
    assert all(unacked <= 4 for _, unacked in samples), samples
    assert any(unacked == 4 for _, unacked in waiting), samples


@pytest.mark.broker
def test_control_rate_limit_changes_the_limit_at_runtime(broker_url: str, unique: str) -> None:
    app = App("limited", broker=broker_url, task_default_queue=unique)
    name = f"{unique}.hourly"
    hostname = f"{unique}@limits"

    @app.task(name=name, rate_limit="1/h")
    def hourly() -> str:
        return "ran"

    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url,
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def amqtask_control(*args: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "amqtask", "control", *args, "-d", hostname, "-t", "10", "--json"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    celery = Celery("asker", broker=broker_url)

    def celery_control(task_name: str, rate: str) -> Any:
        return celery.control.rate_limit(task_name, rate, destination=[hostname], reply=True, timeout=10)

    async def scenario() -> tuple[list[str], list[Any]]:
        async with running_worker(app, hostname=hostname):
            first, second, third = [await hourly.adelay() for _ in range(3)]
            assert await first.aget(timeout=30) == "ran"
            with pytest.raises(ResultTimeout):
                await second.aget(timeout=1)  # the next start is an hour away
            replies = [
                await asyncio.to_thread(celery_control, "no.such.task", "1/s"),
                await asyncio.to_thread(celery_control, name, "1/fortnight"),
                await asyncio.to_thread(amqtask_control, "rate_limit", name, "0"),
            ]
            done = [await second.aget(timeout=30), await third.aget(timeout=30)]
            replies.append(await asyncio.to_thread(celery_control, name, "100/s"))
            inspect = celery.control.inspect(timeout=10, destination=[hostname])
            replies.append(await asyncio.to_thread(inspect.registered))
            return done, replies

    try:
        done, replies = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        celery.close()
        asyncio.run(cleanup(app, [unique]))
    assert done == ["ran", "ran"]
    unknown, invalid, disabled, limited, registered = replies
    assert unknown == [{hostname: {"error": "unknown task"}}]
    assert invalid[0][hostname]["error"].startswith("Invalid rate limit string")
    assert disabled == {hostname: {"ok": "rate limit disabled successfully"}}
    assert limited == [{hostname: {"ok": "new rate limit set successfully"}}]
    assert f"{name} [rate_limit=100/s]" in registered[hostname]


@pytest.mark.broker
def test_forged_messages_naming_a_limited_task_spend_none_of_its_tokens(broker_url: str, unique: str) -> None:
    name = f"{unique}.hourly"
    app = App("limited", broker=broker_url, task_default_queue=unique, signing_keys=["the-key"])
    forger = App("forger", broker=broker_url, task_default_queue=unique)
    for sender in (app, forger):
        sender.task(name=name, rate_limit="1/h")(lambda: "ran")

    async def dead_lettered() -> int:
        depth = await queue_depth(broker_url, f"{unique}.dlq")
        return depth if depth >= 3 else 0

    async def scenario() -> tuple[int, str]:
        async with running_worker(app):
            for _ in range(3):
                await forger.tasks[name].adelay()
            await forger.aclose()
            # Sent after the forged ones: had they spent the token, the next start would be an hour away.
            real = await app.tasks[name].adelay()
            ran = await real.aget(timeout=30)
            return await eventually(dead_lettered, what="the forged messages dead-lettered"), ran

    try:
        dead, ran = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        asyncio.run(cleanup(app, [unique, f"{unique}.dlq"]))
    assert ran == "ran"
    assert dead == 3
