"""The core promises against a real broker: send, run, get results, sync and async, and the error paths."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from support.broker import TestBroker
from support.faults import wait_until
from support.workers import get_raw, queue_depth, running_worker, worker_thread

import amqtask
from amqtask import App, QueueSpec, TopologyMismatchError, UnroutableError, topology
from amqtask.protocol import TaskMessage, encode_task
from amqtask.serializers import JSON

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"core-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", publish_timeout_s=10)
    yield application
    application.close()


def define_tasks(app: App) -> dict[str, Any]:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.aadd")
    async def aadd(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x + y

    @app.task(name="t.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    class CustomError(Exception):
        pass

    @app.task(name="t.custom")
    def custom() -> None:
        raise CustomError("bad thing", 42)

    @app.task(name="t.quiet", ignore_result=True)
    def quiet(box: list[int]) -> int:
        return 1

    return {"add": add, "aadd": aadd, "fail": fail, "custom": custom, "quiet": quiet}


def test_sync_delay_get_and_result_api(app: App) -> None:
    tasks = define_tasks(app)
    with worker_thread(app, concurrency=2):
        result = tasks["add"].delay(4, 4)
        assert result.get(timeout=10) == 8
        assert result.ready() and result.successful() and result.state == "SUCCESS"
        assert result.result == 8
        assert amqtask.AsyncResult(result.id, app=app).get(timeout=1) == 8
        by_name = app.send_task("t.add", args=(1, 2))
        assert by_name.get(timeout=10) == 3


def test_a_result_that_does_not_arrive_in_time_is_the_builtin_timeout_error_too(app: App) -> None:
    """Callers write ``except TimeoutError`` (or, in async code, ``asyncio.TimeoutError``): both catch
    amqtask's, which stays an AmqtaskError and survives pickling (a process pool hands it back)."""
    waiting = app.send_task("t.nobody-runs-this")  # no worker: the result never arrives
    try:
        waiting.get(timeout=0.1)
    except TimeoutError as exc:  # the builtin
        caught: BaseException = exc
    assert isinstance(caught, amqtask.TimeoutError) and isinstance(caught, amqtask.AmqtaskError)
    assert f"result of task {waiting.id} did not arrive within 0.1s" == str(caught)
    copy = pickle.loads(pickle.dumps(caught))
    assert type(copy) is amqtask.TimeoutError and str(copy) == str(caught)

    async def awaited() -> None:
        # asyncio.TimeoutError is the builtin from Python 3.11 on; on 3.10 it is a class of its own.
        with pytest.raises(asyncio.TimeoutError if sys.version_info >= (3, 11) else TimeoutError):
            await waiting.aget(timeout=0.1)
        await app.aclose()

    asyncio.run(awaited())


def test_async_api_and_async_tasks(app: App) -> None:
    tasks = define_tasks(app)

    async def scenario() -> None:
        async with running_worker(app, concurrency=4):
            result = await tasks["aadd"].adelay(4, 4)
            assert await result.aget(timeout=10) == 8
            assert await (await tasks["add"].aapply_async((2, 3))) == 5

    asyncio.run(scenario())


def test_failure_keeps_type_message_and_traceback(app: App) -> None:
    tasks = define_tasks(app)
    with worker_thread(app):
        result = tasks["fail"].delay("something bad happened")
        with pytest.raises(ValueError, match="something bad happened") as info:
            result.get(timeout=10)
        assert isinstance(info.value, amqtask.RemoteTaskError)
        assert "raise ValueError(message)" in (info.value.remote_traceback or "")
        assert result.state == "FAILURE" and result.failed()
        custom = tasks["custom"].delay()
        with pytest.raises(amqtask.RemoteTaskError) as info2:
            custom.get(timeout=10)
        assert type(info2.value).__name__ == "CustomError"
        assert info2.value.args == ("bad thing", 42)


def test_ignore_result_sends_no_reply(app: App, broker_url: str) -> None:
    tasks = define_tasks(app)

    async def scenario() -> None:
        async with running_worker(app) as worker:
            result = await tasks["quiet"].adelay([1])
            probe = await tasks["add"].adelay(1, 1)  # runs after quiet on the same queue
            assert await probe.aget(timeout=10) == 2
            while worker.stats["processed"] < 2:
                await asyncio.sleep(0.01)
            assert result.state == "PENDING"
            assert await queue_depth(broker_url, app.reply_queue) == 0

    asyncio.run(scenario())


def test_apply_async_options_reach_the_wire(app: App, broker_url: str, unique: str) -> None:
    define_tasks(app)
    task_id = str(uuid.uuid4())
    other = f"other-{unique}"
    app.send_task(
        "t.add", args=(1, 2), queue=other, priority=3, task_id=task_id, headers={"x-tenant": "acme"},
        serializer="json", expires=60,
    )  # fmt: skip
    raw = asyncio.run(get_raw(broker_url, other))
    assert raw.content_type == "application/json"
    assert raw.correlation_id == task_id
    assert raw.priority == 3
    assert raw.headers["id"] == task_id and raw.headers["task"] == "t.add"
    assert raw.headers["x-tenant"] == "acme"
    assert raw.headers["expires"] is not None
    assert raw.reply_to == app.reply_queue
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


def test_tasks_sent_before_any_worker_wait_in_their_declared_queue(app: App, broker_url: str) -> None:
    tasks = define_tasks(app)
    result = tasks["add"].delay(20, 22)  # the queue does not exist yet: the producer declares it
    assert asyncio.run(queue_depth(broker_url, app.conf.task_default_queue)) == 1
    with worker_thread(app):
        assert result.get(timeout=10) == 42


def test_unroutable_publish_raises(app: App, unique: str) -> None:
    async def scenario() -> None:
        runtime = app.runtime()
        await topology.declare_exchange(runtime.broker, f"ex-{unique}", "direct")
        with pytest.raises(UnroutableError, match="no queue is bound"):
            await app.asend_task("t.add", (1, 2), exchange=f"ex-{unique}", routing_key="nowhere")
        await app.aclose()

    asyncio.run(scenario())


def test_a_send_to_a_missing_exchange_fails_alone(app: App, unique: str, broker_url: str) -> None:
    # RabbitMQ refuses a publish to a missing exchange by closing the channel, which the sends around it
    # share; those must still be confirmed, and the process must keep its connection.
    async def scenario() -> None:
        await app.asend_task("t.add", (0, 0), ignore_result=True)  # connected, the queue declared
        generation = app.runtime().broker.generation
        sends = [app.asend_task("t.add", (i, i), ignore_result=True) for i in range(300)]
        sends.append(app.asend_task("t.add", (1, 1), exchange=f"missing-{unique}", routing_key="k"))
        sends += [app.asend_task("t.add", (i, i), ignore_result=True) for i in range(300)]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        missing = outcomes.pop(300)
        assert isinstance(missing, amqtask.TopologyNotFoundError) and f"missing-{unique}" in str(missing)
        failed = [o for o in outcomes if not isinstance(o, amqtask.AsyncResult)]
        assert not failed, f"{len(failed)} send(s) to an existing queue failed, e.g. {failed[0]!r}"
        assert app.runtime().broker.generation == generation, "the connection was lost"
        assert await queue_depth(broker_url, f"q-{unique}") == 601
        await app.aclose()

    asyncio.run(scenario())


def test_a_nacked_send_is_sent_again_on_a_new_channel_until_confirmed(
    app: App, unique: str, broker_url: str, rabbitmq: TestBroker, broker_vhost: str
) -> None:
    # A nack says the broker cannot take the message now; on RabbitMQ 3.10 the channel that got it may
    # go on nacking a quorum queue's publishes after the queue recovered, so the send moves on.
    queue = f"bounded-{unique}"
    app.conf.task_queues = {queue: {"arguments": {"x-max-length": 1, "x-overflow": "reject-publish"}}}

    def confirm_channels() -> set[str]:
        rows = json.loads(rabbitmq.ctl("-q", "list_channels", "pid", "confirm", "vhost", "--formatter", "json"))
        return {row["pid"] for row in rows if row["confirm"] and row["vhost"] == broker_vhost}

    async def scenario() -> None:
        await app.asend_task("t.add", (0, 0), queue=queue, ignore_result=True)  # the queue is full now
        before = await asyncio.to_thread(confirm_channels)

        async def nacking_channel_closed() -> bool:
            return not before & await asyncio.to_thread(confirm_channels)

        sending = asyncio.ensure_future(app.asend_task("t.add", (1, 1), queue=queue, ignore_result=True))
        await wait_until(nacking_channel_closed, 10, "the nacking channel closed")
        assert not sending.done(), f"the nacked send gave up: {sending.exception()!r}"
        first = await get_raw(broker_url, queue)  # room for one
        await asyncio.wait_for(sending, 10)
        second = await get_raw(broker_url, queue)
        assert [m.headers["argsrepr"] for m in (first, second)] == ["(0, 0)", "(1, 1)"]
        await app.aclose()

    asyncio.run(scenario())


def test_queue_declared_with_other_arguments_is_named_in_the_error(app: App, unique: str) -> None:
    name = f"mismatch-{unique}"

    async def scenario() -> None:
        runtime = app.runtime()
        await topology.declare_queue(runtime.broker, QueueSpec(name, max_priority=10))
        with pytest.raises(TopologyMismatchError) as info:
            await topology.declare_queue(runtime.broker, QueueSpec(name))
        error = info.value
        assert error.name == name
        assert "x-max-priority" in str(error.existing) and "10" in str(error.existing)
        assert name in str(error) and "wanted" in str(error)
        await topology.delete_queue(runtime.broker, name)
        await app.aclose()

    asyncio.run(scenario())


def test_many_concurrent_sends_all_confirmed(app: App) -> None:
    tasks = define_tasks(app)

    async def scenario() -> None:
        async with running_worker(app, concurrency=8):
            results = await asyncio.gather(*(tasks["add"].adelay(i, i) for i in range(300)))
            values = await asyncio.gather(*(r.aget(timeout=30) for r in results))
            assert values == [2 * i for i in range(300)]

    asyncio.run(scenario())


LOOP_AFTER_LOOP = """
import asyncio, gc, sys
from amqtask import App
from amqtask.connection import Broker

app = App("loops", broker=sys.argv[1], task_default_queue=sys.argv[2])
add = app.task(name="loops.add")(lambda a, b: a + b)
for i in range(4):
    asyncio.run(add.adelay(i, i))
    gc.collect()
    print(sum(1 for thing in gc.get_objects() if isinstance(thing, Broker)))
"""


def test_sending_from_loop_after_loop_without_aclose_keeps_no_broker_of_the_ended_loops(
    broker_url: str, unique: str
) -> None:
    # A script calling asyncio.run(task.adelay(...)) again and again, never closing: in a process of its
    # own, as a user's script runs (pytest keeps the exceptions the ended loops' callbacks raise, and
    # with them the brokers).
    done = subprocess.run([sys.executable, "-c", LOOP_AFTER_LOOP, broker_url, unique],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The last loop's broker goes when the next send finds its loop closed; none before it stays.
    assert done.stdout.split() == ["1", "1", "1", "1"]


def test_sync_sends_from_many_threads(app: App) -> None:
    tasks = define_tasks(app)
    with worker_thread(app, concurrency=4):
        values: list[int] = []

        def send(i: int) -> None:
            values.append(tasks["add"].delay(i, 1).get(timeout=20))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(values) == list(range(1, 21))


async def _publish_raw(url: str, queue: str, message: aio_pika.Message) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(message, routing_key=queue)


def _valid_message(task: str, task_id: str, reply_to: str | None = None) -> aio_pika.Message:
    wire = encode_task(TaskMessage(task=task, id=task_id, args=[1, 2], reply_to=reply_to), JSON)
    return aio_pika.Message(wire.body, headers=wire.headers, content_type=wire.content_type,
                            correlation_id=task_id, reply_to=reply_to)  # fmt: skip


BAD_MESSAGES: dict[str, tuple[aio_pika.Message, str]] = {
    "random-bytes": (aio_pika.Message(b"\x00\xffgarbage", content_type="application/json",
                                      headers={"task": "t.add", "id": "x1"}), "malformed"),
    "no-headers": (aio_pika.Message(b"[[1,2],{},{}]", content_type="application/json"), "malformed"),
    "wrong-header-type": (aio_pika.Message(b"[[1,2],{},{}]", content_type="application/json",
                                           headers={"task": "t.add", "id": "x2", "retries": "many"}), "malformed"),
    "pickle-content": (aio_pika.Message(b"\x80\x04K\x01.", content_type="application/x-python-serialize",
                                        headers={"task": "t.add", "id": "x3"}), "malformed"),
    "bad-eta": (aio_pika.Message(b"[[1,2],{},{}]", content_type="application/json",
                                 headers={"task": "t.add", "id": "x4", "eta": "tomorrow-ish"}), "malformed"),
    "body-shape": (aio_pika.Message(b'{"args": [1]}', content_type="application/json",
                                    headers={"task": "t.add", "id": "x5"}), "malformed"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BAD_MESSAGES))
def test_bad_message_goes_to_the_dlq_with_a_reason_and_the_worker_goes_on(app: App, broker_url: str, kind: str) -> None:
    tasks = define_tasks(app)
    message, reason = BAD_MESSAGES[kind]
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        async with running_worker(app):
            await _publish_raw(broker_url, queue, message)
            good = await tasks["add"].adelay(2, 2)
            assert await good.aget(timeout=10) == 4
            dead = await get_raw(broker_url, f"{queue}.dlq")
            assert dead.headers["x-amqtask-reason"] == reason
            assert dead.body == message.body
            assert dead.headers["x-amqtask-detail"]

    asyncio.run(scenario())


def test_unknown_task_is_dead_lettered_and_the_caller_told(app: App, broker_url: str) -> None:
    define_tasks(app)
    queue = app.conf.task_default_queue

    async def scenario() -> None:
        async with running_worker(app):
            result = await app.asend_task("t.nope", (1,))
            with pytest.raises(amqtask.RemoteTaskError, match="not registered") as raised:
                await result.aget(timeout=10)
            assert raised.value.exc_type == "NotRegistered"  # Celery's name: its callers look for it
            dead = await get_raw(broker_url, f"{queue}.dlq")
            assert dead.headers["x-amqtask-reason"] == "unknown-task"
            assert dead.headers["task"] == "t.nope"

    asyncio.run(scenario())


def test_accept_content_is_enforced(broker_url: str, unique: str) -> None:
    app = App(f"acc-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", accept_content=["json"])
    tasks = define_tasks(app)

    async def scenario() -> None:
        async with running_worker(app):
            rejected = await tasks["add"].aapply_async((1, 1), serializer="msgpack")
            with pytest.raises(amqtask.RemoteTaskError, match="not accepted"):
                await rejected.aget(timeout=10)
            accepted = await tasks["add"].aapply_async((1, 1), serializer="json")
            assert await accepted.aget(timeout=10) == 2
            dead = await get_raw(broker_url, f"q-{unique}.dlq")
            assert dead.content_type == "application/x-msgpack"

    asyncio.run(scenario())


def test_track_started_reports_started(broker_url: str, unique: str) -> None:
    app = App(f"st-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", task_track_started=True)
    release = threading.Event()

    @app.task(name="t.wait")
    def wait() -> str:
        release.wait(20)
        return "ok"

    with worker_thread(app):
        result = wait.delay()
        from support.workers import wait_for

        wait_for(lambda: result.state == "STARTED", what="STARTED state")
        release.set()
        assert result.get(timeout=10) == "ok"


def test_calling_a_task_runs_it_locally(app: App) -> None:
    tasks = define_tasks(app)
    assert tasks["add"](2, 3) == 5
    assert asyncio.run(tasks["aadd"](2, 3)) == 5
