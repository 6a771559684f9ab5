"""Poison task: a task that kills its worker process every time (issue 7, fault test 5).

``amqtask worker --processes 2`` (the supervisor restarts a child that dies) consumes a quorum queue
with ``delivery_limit=3``. A task that ``os._exit(1)``s on every attempt takes its process down with
it; each death is a connection loss, which the quorum queue counts as a failed delivery (3.10 and
4.x alike). Promised: after the delivery limit the broker dead-letters the message into
``<queue>.dlq``, and meanwhile the pool keeps serving: every other task completes.

Each child takes one message at a time (``-c 1 --prefetch-multiplier 1``) here, and that is part of
the promise: a process that dies returns *every* delivery it held, and each of them uses up one of
its own deliveries too. With a larger prefetch, innocent messages prefetched next to the poison can
reach the limit with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from support.faults import (
    consumer_count,
    declare_sink,
    kill,
    log_tail,
    new_ids,
    read_sink,
    send_all,
    spawn_worker,
    stop,
    wait_until,
)

from amqtask import App, AsyncResult

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(120)]
log = logging.getLogger("faults")

DELIVERY_LIMIT = 3
OTHERS = 200


@pytest.fixture
def queues(unique: str) -> dict[str, dict[str, object]]:
    return {f"q-{unique}": {"queue_type": "quorum", "delivery_limit": DELIVERY_LIMIT}}


@pytest.fixture
def client(broker_url: str, unique: str, queues: dict[str, dict[str, object]]) -> Iterator[App]:
    app = App(f"poison-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", task_queues=queues)
    yield app
    app.close()


def test_a_task_that_kills_its_process_ends_in_the_dlq_and_the_pool_keeps_serving(
    client: App,
    broker_url: str,
    unique: str,
    queues: dict[str, dict[str, object]],
    tmp_path: Path,
    rabbitmq_version_info: tuple[int, ...],
) -> None:
    queue, sink = f"q-{unique}", f"sink-{unique}"
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "FAULT_SINK_QUEUE": sink, "FAULT_TASK_QUEUES": json.dumps(queues)}
    worker_log = tmp_path / "supervisor.log"
    asyncio.run(declare_sink(broker_url, sink))
    supervisor = spawn_worker(broker_url, worker_log, "--processes", "2", "-c", "1", "--prefetch-multiplier", "1",
                              env=env)  # fmt: skip
    ids = new_ids(OTHERS)

    async def consumers_are(count: int) -> bool:
        return await consumer_count(broker_url, queue) == count

    async def scenario() -> tuple[AsyncResult[None], aio_pika.abc.AbstractIncomingMessage]:
        try:
            await wait_until(lambda: consumers_are(2), 30, "both worker processes consuming")
            poison: AsyncResult[None] = await client.asend_task("fault.crash")
            outcomes = await send_all(client, "fault.record", ids, lambda i: (i,), window=50)
            for n, outcome in enumerate(outcomes):
                assert isinstance(outcome, AsyncResult), outcome
                assert await outcome.aget(timeout=60) == n
            dead = await _wait_for_dead_letter(broker_url, f"{queue}.dlq", timeout=60)
            # The supervisor has replaced the processes the poison took down: both consume again.
            await wait_until(lambda: consumers_are(2), 30, "the pool back at full strength")
            return poison, dead
        finally:
            await client.aclose()

    try:
        poison, dead = asyncio.run(scenario())
    except BaseException:
        log.error("supervisor.log:\n%s", log_tail(worker_log))
        raise
    finally:
        status = stop(supervisor)
        kill(supervisor)
    assert status == 0, log_tail(worker_log)
    assert dead.correlation_id == poison.id
    headers = dead.headers or {}
    death = headers.get("x-death") or []
    # The broker dead-lettered it, once, from the task queue, for the delivery limit; no worker lived
    # to add a reason of its own.
    assert len(death) == 1, headers  # type: ignore[arg-type]
    assert (death[0]["reason"], death[0]["queue"], death[0]["count"]) == ("delivery_limit", queue, 1), headers  # type: ignore[index]
    assert headers.get("x-first-death-reason") == "delivery_limit", headers
    assert "x-amqtask-reason" not in headers, headers
    runs = asyncio.run(read_sink(broker_url, sink))
    attempts = runs.count(poison.id)
    # Each attempt is a connection loss, which both 3.10 and 4.3 count as a failed delivery (4.3 counts
    # a basic.nack as none, 3.10 counts it; no nack happens here): the broker gives up once the failed
    # deliveries exceed the limit, after DELIVERY_LIMIT + 1 attempts (measured: 4 on 3.10 and on 4.3).
    assert attempts == DELIVERY_LIMIT + 1, f"{attempts} attempts on RabbitMQ {rabbitmq_version_info}"
    assert set(ids) <= runs.ids()
    assert not poison.ready()  # the broker dead-letters without a word to the caller: no result comes
    restarts = worker_log.read_text().count("restarting")
    others_extra = runs.extra - (attempts - 1)
    # With a prefetch of 1 a dying process held only the poison: no other task runs twice.
    assert others_extra == 0, runs.summary()
    print(
        f"\npoison: {attempts} attempt(s), {restarts} process restart(s), then dead-lettered by the broker "
        f"(x-death reason {death[0]['reason']}); {OTHERS} other tasks completed, {others_extra} extra run(s)"
    )  # type: ignore[index]


async def _wait_for_dead_letter(url: str, dlq: str, timeout: float) -> aio_pika.abc.AbstractIncomingMessage:
    """Take the one message the broker dead-letters into ``dlq``."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(dlq, passive=True)
        async with queue.iterator() as messages:
            message = await asyncio.wait_for(messages.__anext__(), timeout)
            await message.ack()
            return message
