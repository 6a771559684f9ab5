"""Worker crash: SIGKILLed worker processes lose no task (issue 7, fault test 1).

5,000 tasks across two worker processes (``amqtask worker -A fault_tasks -c 8``); one of them is
SIGKILLed three times while the run is under way and started again. Promised: every task ran at
least once (the task's own record in a durable sink), every caller got its result, and nothing is
left on the broker (no ready or unacked message in the task queue, its DLQ or the reply queue).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import TestBroker
from support.faults import (
    assert_duplicates_bounded,
    consumer_count,
    declare_sink,
    kill,
    log_tail,
    new_ids,
    queue_counts,
    read_sink,
    ready_count,
    send_all,
    spawn_worker,
    stop,
    wait_settled,
    wait_until,
)

from amqtask import App, AsyncResult

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(120)]
log = logging.getLogger("faults")

TASKS = 5_000
CONCURRENCY = 8
KILL_AT = (1_000, 2_000, 3_000)  # results received when the next SIGKILL lands


@pytest.fixture
def client(broker_url: str, unique: str) -> Iterator[App]:
    app = App(f"crash-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", publish_timeout_s=60)
    yield app
    app.close()


def test_sigkill_of_a_worker_three_times_loses_no_task(
    client: App, rabbitmq: TestBroker, broker_url: str, broker_vhost: str, unique: str, tmp_path: Path
) -> None:
    queue, sink = f"q-{unique}", f"sink-{unique}"
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "FAULT_SINK_QUEUE": sink, "AMQTASK_PUBLISH_TIMEOUT_S": "60"}
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    asyncio.run(declare_sink(broker_url, sink))
    victim = spawn_worker(broker_url, logs[0], "-c", str(CONCURRENCY), env=env)
    survivor = spawn_worker(broker_url, logs[1], "-c", str(CONCURRENCY), env=env)
    kills: list[int] = []
    ids = new_ids(TASKS)

    async def _consumers_are(count: int) -> bool:
        return await consumer_count(broker_url, queue) == count

    async def scenario() -> list[AsyncResult[int] | BaseException]:
        nonlocal victim
        try:
            await wait_until(lambda: _consumers_are(2), 30, "both workers")
            sending = asyncio.create_task(send_all(client, "fault.record", ids, lambda i: (i,)))
            for threshold in KILL_AT:
                await wait_until(lambda t=threshold: ready_count(client, ids) >= t, 60, f"{threshold} results")
                kills.append(ready_count(client, ids))
                kill(victim)  # mid-run: it holds up to 32 unacked deliveries, 8 of them running
                victim = spawn_worker(broker_url, logs[0], "-c", str(CONCURRENCY), env=env)
                # The next kill must hit a worker that consumes again, not one still starting.
                await wait_until(lambda: _consumers_are(2), 30, "the restart")
            outcomes = await sending
            for n, outcome in enumerate(outcomes):
                assert isinstance(outcome, AsyncResult), f"send {n} failed: {outcome!r}"
                assert await outcome.aget(timeout=60) == n
            # Tasks the killed worker held run again after their callers have the result; wait for
            # those runs and for the client to take their second replies.
            await wait_settled(rabbitmq, broker_vhost, (queue, f"{queue}.dlq", client.reply_queue), 60)
            return outcomes
        finally:
            await client.aclose()

    try:
        results = asyncio.run(scenario())
    except BaseException:
        for path in logs:
            log.error("%s:\n%s", path.name, log_tail(path))
        raise
    finally:
        kill(victim)
        stop(survivor)

    sent = {r.id for r in results if isinstance(r, AsyncResult)}
    runs = asyncio.run(read_sink(broker_url, sink))
    assert sent <= runs.ids(), f"{len(sent - runs.ids())} task(s) never ran"
    counts = queue_counts(rabbitmq, broker_vhost)
    for name in (queue, f"{queue}.dlq", client.reply_queue):
        assert counts.get(name, (0, 0)) == (0, 0), f"{name}: (messages, unacked) = {counts.get(name)}"
    # Each kill can rerun only what the victim held unacked; no send lost its confirm: no copies.
    seen = assert_duplicates_bounded(runs, faults=len(KILL_AT), workers_hit=1, concurrency=CONCURRENCY,
                                     sends_in_flight=0)  # fmt: skip
    print(f"\nworker crash: {TASKS} tasks, SIGKILL at {kills} results, {seen}")
