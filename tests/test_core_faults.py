"""Core fault promises: a killed worker, a restarted broker, cut connections and graceful shutdown lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from support.broker import TestBroker
from support.faults import queue_counts, wait_until
from support.workers import queue_depth, running_worker, stop_process, wait_for, worker_process

from amqtask import App, BrokerConnectionError, topology
from amqtask.results import reply_queue_arguments

pytestmark = [pytest.mark.broker, pytest.mark.fault]


@pytest.fixture
def client(broker_url: str, unique: str) -> Iterator[App]:
    app = App(f"client-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", publish_timeout_s=60)
    yield app
    app.close()


def _env(unique: str, tmp_path: Path) -> dict[str, str]:
    return {"AMQTASK_TASK_DEFAULT_QUEUE": f"q-{unique}", "CORE_MARKER_DIR": str(tmp_path)}


def test_worker_killed_mid_task_the_task_runs_again_and_the_caller_gets_its_result(
    client: App, broker_url: str, unique: str, tmp_path: Path
) -> None:
    first = worker_process("core_tasks", broker_url, "-c", "1", env=_env(unique, tmp_path))
    try:
        result = client.send_task("core.hang_once", args=("k",))
        wait_for(lambda: (tmp_path / "k.started").exists(), what="the task to start on the first worker")
        stop_process(first, signal.SIGKILL)
        second = worker_process("core_tasks", broker_url, "-c", "1", env=_env(unique, tmp_path))
        try:
            assert result.get(timeout=60) == f"done by {second.pid}"
        finally:
            stop_process(second)
    finally:
        if first.poll() is None:
            stop_process(first, signal.SIGKILL)


def test_sigterm_lets_the_running_task_finish_and_gives_the_rest_back(
    client: App, broker_url: str, unique: str, tmp_path: Path
) -> None:
    worker = worker_process("core_tasks", broker_url, "-c", "1", "--prefetch-multiplier", "4",
                            env=_env(unique, tmp_path))  # fmt: skip
    try:
        running = client.send_task("core.slow", args=("s1", 1.0))
        queued = [client.send_task("core.add", args=(i, i)) for i in range(3)]
        wait_for(lambda: (tmp_path / "s1.started").exists(), what="the slow task to start")
        output = stop_process(worker, signal.SIGTERM)
        assert worker.returncode == 0, output
        assert (tmp_path / "s1.finished").exists()
        assert running.get(timeout=10) == "finished"
        assert all(not r.ready() for r in queued)
        assert asyncio.run(queue_depth(broker_url, f"q-{unique}")) == 3
    finally:
        if worker.poll() is None:
            stop_process(worker, signal.SIGKILL)
    successor = worker_process("core_tasks", broker_url, env=_env(unique, tmp_path))
    try:
        assert [r.get(timeout=30) for r in queued] == [0, 2, 4]
    finally:
        stop_process(successor)


def test_a_task_stuck_in_its_thread_past_the_grace_period_does_not_keep_the_worker_alive(
    client: App, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """SIGTERM with a plain task blocked for good (a C call no limit can interrupt): the process exits once
    ``worker_shutdown_grace_s`` is over, and the broker has the unacked message back, ready to run again."""
    grace = 1.0
    env = {**_env(unique, tmp_path), "AMQTASK_WORKER_SHUTDOWN_GRACE_S": str(grace)}
    worker = worker_process("core_tasks", broker_url, "-c", "1", env=env)
    try:
        stuck = client.send_task("core.slow", args=("stuck", 3600.0))
        wait_for(lambda: (tmp_path / "stuck.started").exists(), what="the task to start")
        began = time.monotonic()
        output = stop_process(worker, signal.SIGTERM, timeout=grace + 30)
        exited_after = time.monotonic() - began
        assert worker.returncode == 0, output
        assert "still running after the grace period" in output
        assert exited_after < grace + 10, f"exited {exited_after:.1f}s after SIGTERM"
        assert asyncio.run(queue_depth(broker_url, f"q-{unique}")) == 1
        assert not stuck.ready()
    finally:
        if worker.poll() is None:
            stop_process(worker, signal.SIGKILL)
        asyncio.run(_delete_queue(broker_url, f"q-{unique}"))


async def _delete_queue(url: str, name: str) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


def test_broker_restart_with_worker_and_client_connected_loses_nothing(
    private_rabbitmq: TestBroker, unique: str
) -> None:
    """Tasks sent before, during and after a restart all run; delayed ones wait it out in the delay levels."""
    rabbitmq = private_rabbitmq
    client = App(f"restart-{unique}", broker=rabbitmq.add_vhost(unique), task_default_queue=f"q-{unique}",
                 publish_timeout_s=60)  # fmt: skip

    @client.task(name="fault.double")
    def double(x: int) -> int:
        return 2 * x

    async def scenario() -> None:
        async with running_worker(client, concurrency=4) as worker:
            before = [await double.adelay(i) for i in range(50)]
            assert [await r.aget(timeout=30) for r in before] == [2 * i for i in range(50)]
            delayed = [await double.aapply_async((i,), countdown=6, priority=i % 10) for i in range(100, 105)]
            rabbitmq.stop_node(0)
            sending = asyncio.ensure_future(asyncio.gather(*(double.adelay(i) for i in range(50, 100))))
            await asyncio.to_thread(rabbitmq.start_node, 0)
            after = await sending
            try:
                assert [await r.aget(timeout=60) for r in after] == [2 * i for i in range(50, 100)]
                assert [await r.aget(timeout=60) for r in delayed] == [2 * i for i in range(100, 105)]
            except (AssertionError, TimeoutError) as exc:
                # Where the messages are tells which part failed: a delay level, the queue, or the results.
                counts = {queue: n for queue, n in queue_counts(rabbitmq, unique).items() if any(n)}
                raise AssertionError(f"{exc}; (messages, unacked) per queue: {counts}") from exc
            assert worker.consumer.consuming.is_set() and worker.consumer.resumptions >= 2

    asyncio.run(scenario())


def test_results_survive_the_clients_connection_being_cut(client: App, rabbitmq: TestBroker, broker_vhost: str) -> None:
    release = asyncio.Event()

    @client.task(name="fault.gated")
    async def gated() -> str:
        await release.wait()
        return "delivered"

    async def scenario() -> None:
        async with running_worker(client):
            result = await gated.adelay()
            # Cut every connection of the vhost (the client's and the worker's) while the task is running.
            rabbitmq.ctl("close_all_connections", "-p", broker_vhost, "test cut")
            release.set()
            assert await result.aget(timeout=60) == "delivered"

    asyncio.run(scenario())


def test_pid_of_worker_is_reported_in_started_state(broker_url: str, unique: str) -> None:
    app = App(f"pid-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", task_track_started=True)
    gate = asyncio.Event()

    @app.task(name="fault.wait")
    async def wait() -> int:
        await gate.wait()
        return os.getpid()

    async def scenario() -> None:
        async with running_worker(app):
            result = await wait.adelay()
            while result.state != "STARTED":
                await asyncio.sleep(0.01)
            assert app.result_store.get(result.id).result["pid"] == os.getpid()  # type: ignore[union-attr]
            gate.set()
            assert await result.aget(timeout=10) == os.getpid()

    asyncio.run(scenario())


def test_a_consumer_cancelled_by_the_broker_consumes_again(client: App, unique: str) -> None:
    """The broker cancels consumers when their queue is deleted (and, on 4.3, on a consumer timeout)."""

    @client.task(name="fault.echo")
    def echo(x: str) -> str:
        return x

    async def scenario() -> None:
        async with running_worker(client) as worker:
            assert await (await echo.adelay("before")).aget(timeout=10) == "before"
            resumptions = worker.consumer.resumptions
            await topology.delete_queue(client.runtime().broker, f"q-{unique}")
            while worker.consumer.resumptions == resumptions:  # the worker re-declares and consumes again
                await asyncio.sleep(0.01)
            assert await (await echo.adelay("after")).aget(timeout=10) == "after"

    asyncio.run(scenario())


def _quorum_member(rabbitmq: TestBroker, vhost: str, queue: str, action: str) -> None:
    """Stop or restart the (single-node) broker's Raft member of quorum queue ``queue``: what a quorum
    queue that lost its members looks like to a client (RabbitMQ refuses to let it be consumed)."""
    erlang = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"{vhost}">>, queue, <<"{queue}">>)),'
        f"{{Name, _}} = amqqueue:get_pid(Q), ra:{action}(quorum_queues, {{Name, node()}})."
    )
    assert rabbitmq.ctl("eval", erlang).strip() == "ok"


async def _declare_as_a_reply_queue(url: str, app: App) -> None:
    """Declare ``app``'s reply queue as its result consumer would, before the consumer starts."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(app.reply_queue, durable=True, arguments=reply_queue_arguments(app.conf))


def test_a_worker_that_waits_for_no_result_declares_no_reply_queue_when_it_reconnects(
    client: App, rabbitmq: TestBroker, broker_vhost: str, broker_url: str, unique: str
) -> None:
    """A reply queue declared by every worker on every reconnect is one more queue made mid-fail-over,
    which on a 4.3 cluster could be one RabbitMQ then refused to serve, closing the worker's connection."""
    worker_app = App(f"worker-{unique}", broker=broker_url, task_default_queue=f"q-{unique}")

    @worker_app.task(name="fault.echo_back")
    def echo_back(x: str) -> str:
        return x

    async def scenario() -> None:
        async with running_worker(worker_app) as worker:
            assert await (await client.asend_task("fault.echo_back", ("before",))).aget(timeout=10) == "before"
            broker = worker_app.runtime().broker
            generation, resumptions = broker.generation, worker.consumer.resumptions
            rabbitmq.ctl("close_all_connections", "-p", broker_vhost, "test cut")
            await wait_until(lambda: worker.consumer.resumptions > resumptions, 30, "the worker consuming again")
            assert broker.generation > generation
            await asyncio.gather(*broker._listener_tasks)  # whatever the reconnect set off has finished
            assert await (await client.asend_task("fault.echo_back", ("after",))).aget(timeout=10) == "after"
        queues = queue_counts(rabbitmq, broker_vhost)
        assert client.reply_queue in queues and worker_app.reply_queue not in queues

    asyncio.run(scenario())


def test_a_reply_queue_the_broker_refuses_is_tried_again_with_pauses_until_it_serves_again(
    rabbitmq: TestBroker, broker_vhost: str, broker_url: str, unique: str
) -> None:
    """RabbitMQ refuses to let a quorum queue without a live member be consumed by closing the whole
    connection: a client trying again at once would take its connection, and every channel on it, down
    over and over. It pauses (0.5 s, doubling), gives up with an error naming the queue, and consumes
    again once the queue is served."""
    # Several broker URLs (here twice the same node) make the reply queue a quorum queue.
    client = App(f"client-{unique}", broker=[broker_url, broker_url], task_default_queue=f"q-{unique}")
    worker_app = App(f"worker-{unique}", broker=broker_url, task_default_queue=f"q-{unique}")

    @worker_app.task(name="fault.echo_back")
    def echo_back(x: str) -> str:
        return x

    async def scenario() -> None:
        runtime = client.runtime()
        await _declare_as_a_reply_queue(broker_url, client)
        _quorum_member(rabbitmq, broker_vhost, client.reply_queue, "stop_server")
        await runtime.broker.connection()
        generation = runtime.broker.generation
        with pytest.raises(BrokerConnectionError, match=rf"reply queue {client.reply_queue}: .*INTERNAL_ERROR"):
            await runtime.results.ensure_started(timeout=3)
        # Tries at 0, 0.5, 1.5 and 3 s at the most, each costing one connection (before: one every 0.05 s).
        assert runtime.broker.generation - generation <= 4
        _quorum_member(rabbitmq, broker_vhost, client.reply_queue, "restart_server")
        async with running_worker(worker_app):
            assert await (await client.asend_task("fault.echo_back", ("served",))).aget(timeout=30) == "served"
        await client.aclose()

    asyncio.run(scenario())


def test_a_broker_operation_refused_by_closing_the_connection_is_tried_again_with_pauses(
    rabbitmq: TestBroker, broker_vhost: str, broker_url: str, unique: str
) -> None:
    """The same refusal met by a declaration or check (``Broker.run``: topology, delay bindings, a
    worker's queues) pauses the same way, and the operation goes through once the queue is served."""
    app = App(f"client-{unique}", broker=broker_url)
    queue = f"q-{unique}-refused"

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    async def consume(channel: aio_pika.abc.AbstractChannel) -> None:
        await (await channel.declare_queue(queue, passive=True)).consume(ignore)

    async def scenario() -> None:
        broker = app.runtime().broker
        try:
            await broker.run(
                lambda channel: channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
            )
            _quorum_member(rabbitmq, broker_vhost, queue, "stop_server")
            generation = broker.generation
            with pytest.raises(BrokerConnectionError, match="INTERNAL_ERROR"):
                await broker.run(consume, timeout=3)
            assert broker.generation - generation <= 4  # tries at 0, 0.5, 1.5 and 3 s at the most
            _quorum_member(rabbitmq, broker_vhost, queue, "restart_server")
            await broker.run(consume)
        finally:
            await topology.delete_queue(broker, queue)
            await app.aclose()

    asyncio.run(scenario())
