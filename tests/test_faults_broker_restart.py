"""Broker restart: RabbitMQ stops and starts while tasks are sent and run (issue 7, fault test 2).

A producer sends 5,000 tasks while two workers (one in this process, one subprocess) consume them;
a third of the way in, the broker's node is stopped and started again. Promised: every send either
was confirmed or raised to its caller; every confirmed task ran (its record is in the durable sink)
and its caller got the result; clients and workers reconnect by themselves and the consumers really
consume again. The broker is this session's private one: restarting the shared broker would cut
every other user of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_tasks import record_run
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
from support.workers import worker_thread

from amqtask import App, AsyncResult, BrokerConnectionError, PublishError

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(150)]
log = logging.getLogger("faults")

TASKS = 5_000
RESTART_AT = 1_000  # results received when the broker goes down
CONCURRENCY = 8
WINDOW = 100  # sends in flight
PUBLISH_TIMEOUT_S = 60


@pytest.fixture
def vhost_url(private_rabbitmq: TestBroker, unique: str) -> Iterator[tuple[str, str]]:
    vhost = f"restart-{unique}"
    url = private_rabbitmq.add_vhost(vhost)
    yield vhost, url
    private_rabbitmq.delete_vhost(vhost)


def test_broker_restart_under_load_loses_no_confirmed_task(
    private_rabbitmq: TestBroker, vhost_url: tuple[str, str], unique: str, tmp_path: Path
) -> None:
    vhost, url = vhost_url
    queue, sink = f"q-{unique}", f"sink-{unique}"
    settings = {"task_default_queue": queue, "publish_timeout_s": PUBLISH_TIMEOUT_S, "broker_reconnect_max_s": 2}
    client = App(f"restart-client-{unique}", broker=url, **settings)
    # A client that gives up quickly: its sends while the broker is down must raise, not vanish.
    impatient = App(f"restart-impatient-{unique}", broker=url, **{**settings, "publish_timeout_s": 2})
    worker_app = App(f"restart-worker-{unique}", broker=url, **settings)

    @worker_app.task(name="fault.record")
    async def record(n: int) -> int:
        await record_run(worker_app, sink)
        return n

    env = {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "FAULT_SINK_QUEUE": sink,
           "AMQTASK_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S), "AMQTASK_BROKER_RECONNECT_MAX_S": "2"}  # fmt: skip
    worker_log = tmp_path / "worker.log"
    asyncio.run(declare_sink(url, sink))
    figures: dict[str, float] = {}
    outage: dict[str, float] = {}  # monotonic times the node began to stop and the client was back
    timings: dict[int, tuple[float, float]] = {}
    ids = new_ids(TASKS)

    async def restart_and_measure() -> list[BaseException | AsyncResult[object]]:
        runtime = client.runtime()
        before = runtime.broker.generation
        await impatient.asend_task("fault.record", (-1,))  # connected before the broker goes away
        t0 = outage["down"] = time.monotonic()
        await asyncio.to_thread(private_rabbitmq.stop_node, 0)
        figures["node stop"] = time.monotonic() - t0
        # Sent while the broker is down: each one must raise to its caller within its timeout.
        refused = await asyncio.gather(*(impatient.asend_task("fault.record", (-1,)) for _ in range(10)),
                                       return_exceptions=True)  # fmt: skip
        t0 = time.monotonic()
        await asyncio.to_thread(private_rabbitmq.start_node, 0)
        up = time.monotonic()
        figures["node start"] = up - t0
        await wait_until(lambda: runtime.broker.generation > before and runtime.broker.connected, 30, "client")
        outage["back"] = time.monotonic()
        figures["client reconnected"] = outage["back"] - up
        await wait_until(lambda: thread_worker.consumer.resumptions >= 2 and thread_worker.consumer.consuming.is_set(),
                         30, "in-process worker consuming again")  # fmt: skip
        figures["in-process worker consuming"] = time.monotonic() - up
        await wait_until(lambda: _consumers_are(2), 30, "both workers consuming again")
        figures["both workers consuming (broker view)"] = time.monotonic() - up
        return refused

    async def _consumers_are(count: int) -> bool:
        return await consumer_count(url, queue) == count

    async def scenario() -> tuple[list[AsyncResult[int] | BaseException], list[BaseException | AsyncResult[object]]]:
        try:
            await wait_until(lambda: _consumers_are(2), 30, "both workers consuming")
            sending = asyncio.create_task(
                send_all(client, "fault.record", ids, lambda i: (i,), window=WINDOW, timings=timings)
            )
            # The restart lands while sends, runs and replies are all under way.
            await wait_until(lambda: ready_count(client, ids) >= RESTART_AT, 60, f"{RESTART_AT} results")
            refused = await restart_and_measure()
            outcomes = await sending
            for n, outcome in enumerate(outcomes):
                if isinstance(outcome, AsyncResult):
                    assert await outcome.aget(timeout=60) == n
            await wait_settled(private_rabbitmq, vhost, (queue, f"{queue}.dlq", client.reply_queue), 60)
            return outcomes, refused
        finally:
            await client.aclose()
            await impatient.aclose()

    subprocess_worker = spawn_worker(url, worker_log, "-c", str(CONCURRENCY), env=env)
    try:
        with worker_thread(worker_app, concurrency=CONCURRENCY) as thread_worker:
            outcomes, refused = asyncio.run(scenario())
    except BaseException:
        log.error("worker.log:\n%s", log_tail(worker_log))
        raise
    finally:
        stop(subprocess_worker)
        kill(subprocess_worker)
        worker_app.close()

    confirmed = {o.id for o in outcomes if isinstance(o, AsyncResult)}
    raised = {n: o for n, o in enumerate(outcomes) if not isinstance(o, AsyncResult)}
    assert all(isinstance(o, PublishError | BrokerConnectionError) for o in raised.values()), raised
    # Only a send in flight while the broker was away may raise, and only once its timeout is spent:
    # with an outage shorter than the timeout, none does.
    away = outage["back"] - outage["down"]
    outside = [n for n in raised if not (timings[n][0] <= outage["back"] and timings[n][1] >= outage["down"])]
    assert not outside, f"sends {outside[:10]} raised though they were not in flight while the broker was away"
    assert len(raised) <= WINDOW
    if away < PUBLISH_TIMEOUT_S:
        assert not raised, f"{len(raised)} send(s) raised after an outage of {away:.1f}s < {PUBLISH_TIMEOUT_S}s"
    # Sent while the broker was down by a client with a 2 s timeout: every one raises, none vanishes.
    assert len(refused) == 10 and all(isinstance(o, PublishError | BrokerConnectionError) for o in refused), refused
    runs = asyncio.run(read_sink(url, sink))
    assert confirmed <= runs.ids(), f"{len(confirmed - runs.ids())} confirmed task(s) never ran"
    counts = queue_counts(private_rabbitmq, vhost)
    assert counts[queue] == (0, 0), counts[queue]
    assert counts.get(f"{queue}.dlq", (0, 0)) == (0, 0)
    # One fault, cutting both workers' connections and the client's.
    seen = assert_duplicates_bounded(runs, faults=1, workers_hit=2, concurrency=CONCURRENCY, sends_in_flight=WINDOW)
    print(
        f"\nbroker restart: {len(confirmed)} confirmed, {len(raised)} raised (+{len(refused)} sends refused "
        f"while down; broker away {away:.1f}s), {seen}; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in figures.items())
        + " (reconnect times counted from the node accepting AMQP again)"
    )
