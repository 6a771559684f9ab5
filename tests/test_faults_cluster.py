"""Cluster fail-over: the node leading a quorum queue stops mid-run (issue 7, fault test 7).

A 3-node RabbitMQ cluster on loopback (``deploy/rabbitmq.sh start --nodes 3``), a quorum task queue
and a quorum sink, a client and two worker processes configured with the list of all three node
URLs. During a 5,000-task run the node holding the task queue's leader is stopped. Promised: no
task is lost (every one ran and its caller got the result, nothing is left in the queue), and the
client and the workers fail over to the other nodes by themselves.

The cluster is started once for this module (it takes ~20 s) and deleted at its end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import BrokerError, TestBroker
from support.faults import (
    assert_duplicates_bounded,
    consumer_count,
    declare_sink,
    new_ids,
    queue_counts,
    read_sink,
    ready_count,
    send_all,
    wait_settled,
    wait_until,
    worker_processes,
)

from amqtask import App, AsyncResult

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.cluster, pytest.mark.timeout(180)]

NODES = 3
TASKS = 5_000
STOP_AT = 1_000  # results received when the leader's node stops
CONCURRENCY = 8
WINDOW = 200  # sends in flight (send_all's default)


@pytest.fixture(scope="module")
def cluster(pytestconfig: pytest.Config) -> Iterator[tuple[TestBroker, str]]:
    """A 3-node cluster of this session's own, with a vhost; deleted at the end of the module."""
    version = pytestconfig.getoption("--rabbitmq")
    broker = TestBroker(name=f"amqtask-cluster-{version.replace('.', '')}-{os.getpid()}", nodes=NODES)
    try:
        broker.start(version)
    except BrokerError as exc:  # the machine cannot run a cluster: nothing amqtask can fix
        pytest.skip(f"cannot start a {NODES}-node RabbitMQ {version} cluster here: {exc}")
    try:
        vhost = "cluster"
        broker.add_vhost(vhost)
        yield broker, vhost
    finally:
        broker.stop()


def _leader(cluster: TestBroker, vhost: str, queue: str, ask: int = 0) -> int | None:
    """Index of the node holding ``queue``'s leader (``list_queues name leader``, known to 3.10 and 4.x).

    None while the node asked lists the queue without a leader, or not at all (seen on 4.3 right after
    the leader's node stopped).
    """
    rows = json.loads(cluster.ctl("-q", "list_queues", "-p", vhost, "name", "leader", "--formatter", "json", node=ask))
    found = [re.search(r"-(\d+)@", row.get("leader") or "") for row in rows if row["name"] == queue]
    return int(found[0].group(1)) if found and found[0] else None  # node names: <cluster name>-<index>@localhost


def test_stopping_the_quorum_leaders_node_loses_no_task(
    cluster: tuple[TestBroker, str], unique: str, tmp_path: Path
) -> None:
    broker, vhost = cluster
    urls = [broker.vhost_url(vhost, node) for node in range(NODES)]
    queue, sink = f"q-{unique}", f"sink-{unique}"
    queues = {queue: {"queue_type": "quorum"}}
    client = App(f"cluster-{unique}", broker=urls, task_default_queue=queue, task_queues=queues,
                 publish_timeout_s=60, broker_reconnect_max_s=2)  # fmt: skip
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "FAULT_SINK_QUEUE": sink, "FAULT_TASK_QUEUES": json.dumps(queues),
           "AMQTASK_PUBLISH_TIMEOUT_S": "60", "AMQTASK_BROKER_RECONNECT_MAX_S": "2"}  # fmt: skip
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    asyncio.run(declare_sink(urls[1], sink, quorum=True))
    ids = new_ids(TASKS)
    figures: dict[str, object] = {}
    stopped: list[int] = []

    def survivor() -> str:
        return urls[next(i for i in range(NODES) if i not in stopped)]

    async def consumers_are(count: int) -> bool:
        return await consumer_count(survivor(), queue) == count

    async def new_leader() -> str | None:
        index = await asyncio.to_thread(_leader, broker, vhost, queue, survivor_index())
        return f"node {index}" if index is not None and index not in stopped else None

    async def stop_the_leader() -> None:
        leader = await asyncio.to_thread(_leader, broker, vhost, queue)
        assert leader is not None, f"no leader for {queue}"
        runtime = client.runtime()
        generation = runtime.broker.generation
        started = time.monotonic()
        stopped.append(leader)
        await asyncio.to_thread(broker.stop_node, leader)
        figures["stopped node"] = leader
        figures["node stop took"] = f"{time.monotonic() - started:.1f}s"
        figures["new leader"] = await wait_until(new_leader, 60, "a new leader on a surviving node")
        await wait_until(lambda: consumers_are(2), 60, "both workers consuming from a surviving node")
        figures["workers consuming again"] = f"{time.monotonic() - started:.1f}s after the stop began"
        if runtime.broker.generation > generation:
            figures["client failed over"] = f"generation {runtime.broker.generation}"

    def survivor_index() -> int:
        return next(i for i in range(NODES) if i not in stopped)

    async def scenario() -> None:
        try:
            await wait_until(lambda: consumers_are(2), 60, "both workers consuming")
            sending = asyncio.create_task(send_all(client, "fault.record", ids, lambda i: (i,), window=WINDOW))
            await wait_until(lambda: ready_count(client, ids) >= STOP_AT, 60, f"{STOP_AT} results")
            await stop_the_leader()
            outcomes = await sending
            for n, outcome in enumerate(outcomes):
                assert isinstance(outcome, AsyncResult), f"send {n} failed: {outcome!r}"
                assert await outcome.aget(timeout=60) == n
            await wait_settled(broker, vhost, (queue, client.reply_queue), 60, node=survivor_index())
        finally:
            await client.aclose()

    with worker_processes(",".join(urls), logs, "-c", str(CONCURRENCY), "-l", "info", env=env):
        asyncio.run(scenario())

    runs = asyncio.run(read_sink(survivor(), sink))
    assert set(ids) <= runs.ids(), f"{len(set(ids) - runs.ids())} task(s) never ran"
    counts = queue_counts(broker, vhost, node=survivor_index())
    assert counts[queue] == (0, 0), counts[queue]
    # Workers wait for no result, so they declare no reply queue, not even on the reconnects of the
    # fail-over: on 4.3, one declared then was refused (noproc), closing the worker's connection each time.
    assert [name for name in counts if name.startswith("amqtask.reply.")] == [client.reply_queue]
    # One fault; it may cut both workers (each may be connected to the stopped node) and the client.
    seen = assert_duplicates_bounded(runs, faults=1, workers_hit=2, concurrency=CONCURRENCY, sends_in_flight=WINDOW)
    print(f"\ncluster: {TASKS} tasks, {seen}; " + ", ".join(f"{k} {v}" for k, v in figures.items()))
