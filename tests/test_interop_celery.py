"""Interoperability with Celery 5, proven against Celery itself: real ``celery worker`` and ``amqtask
worker`` processes on a real broker, every scenario in JSON and in msgpack.

- Celery client -> amqtask worker: ``send_task``/``delay``, results and failures through Celery's
  ``rpc://`` backend, countdown/eta (held in amqtask's broker-side delay levels), expires, priority,
  ``self.retry`` and chains started from Celery.
- amqtask client -> Celery worker: ``delay``/``send_task``/``apply_async`` (countdown, priority, queue),
  failures, expires, Celery-side retries and chains; the Celery worker replies to amqtask's reply queue.
- Queues shared with Celery, in every start order (Celery client, Celery worker or amqtask worker
  first) with no queue configuration: amqtask declares as Celery does and adopts what Celery declared;
  failures still end in ``<queue>.dlq``. ``task_queues_strict=True`` restores the refusal.
- Remote control: ``control.ping``/``inspect`` from Celery to an amqtask worker and the other way round.
- Django-style settings load through ``config_from_object("django.conf:settings", namespace="CELERY")``.
- ``import amqtask`` never imports Celery (a test-only dependency, the ``celery`` extra).

Workers are subprocesses, one of each kind per serializer (module-scoped); the tests that need their
own queue start their own. Their output goes to a file in the test's temporary directory.

The two task modules are ``interop_celery_app`` and ``interop_amqtask_app`` (same task names).
Run alone with ``pytest -m interop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from support.interop import (
    Process,
    celery_client,
    consumers,
    delete_objects,
    depth,
    queue_pair,
    start_amqtask_worker,
    start_celery_worker,
)
from support.workers import get_raw, wait_for, worker_thread

import amqtask
from amqtask import (
    App,
    ConfigurationError,
    QueueSpec,
    TaskRevokedError,
    TopologyMismatchError,
    Worker,
    protocol,
    serializers,
    topology,
)
from amqtask.topology import DLQ_SUFFIX

try:
    import celery  # a test-only dependency: the "celery" extra
except ImportError as exc:  # pragma: no cover - the CI envs install the extra
    raise ImportError(
        "the interoperability tests need Celery: pip install -e '.[dev,celery]' (tox envs install it)"
    ) from exc

import interop_amqtask_app as amq_side
import interop_celery_app as celery_side
import kombu.pools
import kombu.serialization
from celery.exceptions import TaskRevokedError as CeleryTaskRevokedError

pytestmark = pytest.mark.interop

SERIALIZERS = ("json", "msgpack")
CONTENT_TYPES = {"json": "application/json", "msgpack": "application/x-msgpack"}
RESULT_TIMEOUT = 30.0  # generous: the suite runs in 4 processes on 2 cores


# ---------------------------------------------------------------------------------------------- helpers


def _delayed(url: str) -> int:
    """Messages waiting in the first delay levels (up to 7 s: every delay these tests use)."""
    return sum(depth(url, f"amqtask.delay.L{level:02d}") for level in range(3))


def _parse(moment: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(moment)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=SERIALIZERS)
def serializer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Peer:
    """A worker subprocess serving one queue (and its priority queue) in one serializer."""

    url: str
    queue: str
    serializer: str
    process: Process


@pytest.fixture(scope="module")
def amqtask_worker(broker_url: str, serializer: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """A real ``amqtask worker`` process for the Celery clients of this module."""
    queue = f"interop-amq-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("amqtask-worker") / "worker.log"
    process = start_amqtask_worker(broker_url, queue, serializer, log)
    try:
        yield Peer(broker_url, queue, serializer, process)
    finally:
        process.stop()
        delete_objects(broker_url, queue_pair(queue), queue_pair(queue))


@pytest.fixture(scope="module")
def celery_worker(broker_url: str, serializer: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """A real ``celery worker`` process for the amqtask clients of this module."""
    queue = f"interop-cel-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("celery-worker") / "worker.log"
    process = start_celery_worker(broker_url, queue, serializer, log, f"{queue}-other")
    try:
        yield Peer(broker_url, queue, serializer, process)
    finally:
        process.stop()
        names = (*queue_pair(queue), f"{queue}-other")
        delete_objects(broker_url, names, names)


@pytest.fixture
def celery_app(amqtask_worker: Peer) -> Iterator[Any]:
    """A Celery client of the amqtask worker."""
    with celery_client(amqtask_worker.url, amqtask_worker.queue, amqtask_worker.serializer) as app:
        yield app
    amqtask_worker.process.check_running()


@pytest.fixture
def amq_app(celery_worker: Peer) -> Iterator[App]:
    """An amqtask client of the Celery worker."""
    queue = celery_worker.queue
    app = amq_side.create_app(
        celery_worker.url, queue, celery_worker.serializer, name=f"interop-client-{queue}",
        task_queues=amq_side.shared_queues(queue, f"{queue}-other"),
    )  # fmt: skip
    try:
        yield app
    finally:
        app.close()
    celery_worker.process.check_running()


# ---------------------------------------------------------------------------------------------- Celery -> amqtask


@pytest.mark.broker
def test_celery_send_task_and_delay_run_on_the_amqtask_worker(celery_app: Any) -> None:
    assert celery_app.send_task("interop.add", args=(2, 3)).get(timeout=RESULT_TIMEOUT) == 5
    add = celery_app.tasks["interop.add"]
    assert add.delay(4, 4).get(timeout=RESULT_TIMEOUT) == 8
    assert add.apply_async(args=(1,), kwargs={"y": 41}).get(timeout=RESULT_TIMEOUT) == 42
    info = celery_app.tasks["interop.info"].delay().get(timeout=RESULT_TIMEOUT)
    assert info["worker"] == "amqtask"


@pytest.mark.broker
def test_celery_client_gets_the_amqtask_failure_and_it_is_dead_lettered(celery_app: Any, amqtask_worker: Peer) -> None:
    result = celery_app.tasks["interop.fail"].delay("boom")
    with pytest.raises(ValueError, match="boom") as caught:
        result.get(timeout=RESULT_TIMEOUT)
    assert type(caught.value).__name__ == "ValueError"
    assert result.state == "FAILURE"
    assert "ValueError: boom" in (result.traceback or "")

    custom = celery_app.send_task("interop.custom_fail")
    with pytest.raises(Exception) as caught_custom:
        custom.get(timeout=RESULT_TIMEOUT)
    assert type(caught_custom.value).__name__ == "InteropError"
    assert caught_custom.value.args == ("bad thing", 42)

    # The queue is shared with Celery (no x-dead-letter arguments), yet the worker still keeps what failed.
    dead = [asyncio.run(get_raw(amqtask_worker.url, amqtask_worker.queue + DLQ_SUFFIX)) for _ in range(2)]
    assert {message.headers["id"] for message in dead} == {result.id, custom.id}
    assert {message.headers["x-amqtask-reason"] for message in dead} == {"failed"}


@pytest.mark.broker
def test_celery_countdown_and_eta_are_held_by_the_broker_and_run_after_the_eta(
    celery_app: Any, amqtask_worker: Peer
) -> None:
    info = celery_app.tasks["interop.info"]
    sent = dt.datetime.now(dt.timezone.utc)
    by_countdown = info.apply_async(countdown=2)
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1.5)
    by_eta = info.apply_async(eta=eta)
    # The worker does not hold them: it hands them to the broker's delay levels and acks.
    wait_for(lambda: _delayed(amqtask_worker.url) >= 2, 5, "both tasks in the delay levels")
    first, second = by_countdown.get(timeout=RESULT_TIMEOUT), by_eta.get(timeout=RESULT_TIMEOUT)
    assert _parse(first["ran_at"]) >= _parse(first["eta"]) >= sent + dt.timedelta(seconds=2)
    assert _parse(second["ran_at"]) >= eta
    assert _parse(second["eta"]) == eta


@pytest.mark.broker
def test_celery_expires(celery_app: Any) -> None:
    info = celery_app.tasks["interop.info"]
    assert info.apply_async(expires=60).get(timeout=RESULT_TIMEOUT)["worker"] == "amqtask"
    # Due after it expires: the delay levels hold it, then the worker revokes it as Celery's would.
    late = info.apply_async(countdown=2, expires=1)
    with pytest.raises(CeleryTaskRevokedError, match="expired"):
        late.get(timeout=RESULT_TIMEOUT)
    assert late.state == "REVOKED"


@pytest.mark.broker
def test_celery_priority_reaches_the_amqtask_worker(celery_app: Any, amqtask_worker: Peer) -> None:
    queue = celery_side.priority_queue(amqtask_worker.queue)
    result = celery_app.tasks["interop.info"].apply_async(priority=7, queue=queue)
    info = result.get(timeout=RESULT_TIMEOUT)
    assert (info["priority"], info["routing_key"]) == (7, queue)


@pytest.mark.broker
def test_amqtask_retry_is_seen_as_retries_then_the_result_by_celery(celery_app: Any) -> None:
    result = celery_app.tasks["interop.flaky"].delay(2)
    assert result.get(timeout=RESULT_TIMEOUT) == 2
    assert result.state == "SUCCESS"


@pytest.mark.broker
def test_celery_chain_runs_on_the_amqtask_worker(celery_app: Any) -> None:
    add, mul = celery_app.tasks["interop.add"], celery_app.tasks["interop.mul"]
    assert (add.s(2, 2) | mul.s(3)).delay().get(timeout=RESULT_TIMEOUT) == 12
    assert (add.s(1, 1) | add.s(1) | mul.s(10)).apply_async().get(timeout=RESULT_TIMEOUT) == 30
    assert celery.group(add.s(1, 1), add.s(2, 2)).delay().get(timeout=RESULT_TIMEOUT) == [2, 4]


def _other(serializer: str) -> str:
    return "msgpack" if serializer == "json" else "json"


@contextlib.contextmanager
def _reply_queue(url: str) -> Iterator[str]:
    """A queue declared like amqtask's reply queue (durable, ``x-expires``), deleted afterwards."""
    name = f"amqtask.reply.{uuid.uuid4()}"

    async def declare() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments={"x-expires": 60_000})

    asyncio.run(declare())
    try:
        yield name
    finally:
        delete_objects(url, (name,))


@pytest.mark.broker
def test_amqtask_reply_to_a_celery_client_on_the_wire(celery_app: Any, amqtask_worker: Peer) -> None:
    """The reply goes through the default exchange, correlated by task id, in the request's encoding."""
    with _reply_queue(amqtask_worker.url) as reply_to:
        sent = celery_app.send_task("interop.add", args=(2, 3), reply_to=reply_to)
        raw = asyncio.run(get_raw(amqtask_worker.url, reply_to, timeout=RESULT_TIMEOUT))
    assert (raw.exchange, raw.routing_key, raw.correlation_id) == ("", reply_to, sent.id)
    assert raw.content_type == CONTENT_TYPES[amqtask_worker.serializer]
    body = kombu.serialization.loads(raw.body, raw.content_type, raw.content_encoding, accept=[raw.content_type])
    assert (body["status"], body["result"], body["task_id"]) == ("SUCCESS", 5, sent.id)


@pytest.mark.broker
def test_the_reply_keeps_the_celery_clients_encoding_whatever_the_amqtask_workers_own(
    broker_url: str, serializer: str, unique: str
) -> None:
    """An amqtask worker whose ``task_serializer`` differs from the Celery client's answers in the client's."""
    queue = f"interop-{unique}"
    worker_app = amq_side.create_app(broker_url, queue, _other(serializer), name=f"interop-{unique}")
    try:
        with (
            celery_client(broker_url, queue, serializer) as client,
            worker_thread(worker_app, queues=[queue], hostname=f"amqtask-{unique}@localhost"),
        ):
            assert client.send_task("interop.add", args=(2, 3)).get(timeout=RESULT_TIMEOUT) == 5
            with pytest.raises(ValueError, match="boom"):
                client.send_task("interop.fail", args=("boom",)).get(timeout=RESULT_TIMEOUT)
    finally:
        worker_app.close()
        delete_objects(broker_url, queue_pair(queue), queue_pair(queue))


@pytest.mark.broker
def test_a_celery_chain_keeps_the_clients_encoding_on_an_amqtask_worker_of_the_other(
    broker_url: str, serializer: str, unique: str
) -> None:
    queue = f"interop-{unique}"
    worker_app = amq_side.create_app(broker_url, queue, _other(serializer), name=f"interop-{unique}")
    try:
        with (
            celery_client(broker_url, queue, serializer) as client,
            worker_thread(worker_app, queues=[queue], hostname=f"amqtask-{unique}@localhost"),
        ):
            add, mul = client.tasks["interop.add"], client.tasks["interop.mul"]
            assert (add.s(2, 2) | mul.s(3)).delay().get(timeout=RESULT_TIMEOUT) == 12
    finally:
        worker_app.close()
        delete_objects(broker_url, queue_pair(queue), queue_pair(queue))


# ---------------------------------------------------------------------------------------------- amqtask -> Celery


@pytest.mark.broker
def test_celery_worker_reply_to_an_amqtask_client_on_the_wire(amq_app: App, celery_worker: Peer) -> None:
    """A Celery worker answers an amqtask reply queue (durable, x-expires) through the default exchange."""
    with _reply_queue(celery_worker.url) as reply_to:
        sent = amq_app.send_task("interop.add", args=(2, 3), reply_to=reply_to)
        raw = asyncio.run(get_raw(celery_worker.url, reply_to, timeout=RESULT_TIMEOUT))
    assert (raw.exchange, raw.routing_key, raw.correlation_id) == ("", reply_to, sent.id)
    assert raw.content_type == CONTENT_TYPES[celery_worker.serializer]
    wire = protocol.WireMessage(body=raw.body, content_type=raw.content_type, correlation_id=raw.correlation_id)
    result = protocol.decode_result(wire, frozenset({"json", "msgpack"}), serializers.DecodeLimits())
    assert (result.status, result.result, result.task_id) == ("SUCCESS", 5, sent.id)


@pytest.mark.broker
def test_amqtask_delay_and_send_task_run_on_the_celery_worker(amq_app: App) -> None:
    add = amq_app.tasks["interop.add"]
    assert add.delay(2, 3).get(timeout=RESULT_TIMEOUT) == 5
    assert amq_app.send_task("interop.add", args=(20, 22)).get(timeout=RESULT_TIMEOUT) == 42
    assert add.apply_async((1,), {"y": 1}).get(timeout=RESULT_TIMEOUT) == 2
    assert amq_app.tasks["interop.info"].delay().get(timeout=RESULT_TIMEOUT)["worker"] == "celery"


@pytest.mark.broker
def test_amqtask_client_gets_the_celery_failure(amq_app: App) -> None:
    with pytest.raises(ValueError, match="boom") as caught:
        amq_app.tasks["interop.fail"].delay("boom").get(timeout=RESULT_TIMEOUT)
    assert type(caught.value).__name__ == "ValueError"
    assert "ValueError: boom" in (caught.value.remote_traceback or "")  # type: ignore[attr-defined]
    with pytest.raises(Exception) as custom:
        amq_app.send_task("interop.custom_fail").get(timeout=RESULT_TIMEOUT)
    assert type(custom.value).__name__ == "InteropError"
    assert custom.value.args == ("bad thing", 42)


@pytest.mark.broker
def test_amqtask_countdown_is_held_by_the_broker_then_run_by_celery(amq_app: App, celery_worker: Peer) -> None:
    sent = dt.datetime.now(dt.timezone.utc)
    result = amq_app.tasks["interop.info"].apply_async(countdown=2)
    # Held in the delay levels, not by the Celery worker.
    assert _delayed(celery_worker.url) >= 1
    info = result.get(timeout=RESULT_TIMEOUT)
    assert _parse(info["ran_at"]) >= sent + dt.timedelta(seconds=2)
    assert _parse(info["eta"]) >= sent + dt.timedelta(seconds=2)


@pytest.mark.broker
def test_amqtask_priority_and_queue_reach_the_celery_worker(amq_app: App, celery_worker: Peer) -> None:
    info = amq_app.tasks["interop.info"]
    prio = celery_side.priority_queue(celery_worker.queue)
    got = info.apply_async(priority=7, queue=prio).get(timeout=RESULT_TIMEOUT)
    assert (got["priority"], got["routing_key"]) == (7, prio)
    other = f"{celery_worker.queue}-other"
    assert info.apply_async(queue=other).get(timeout=RESULT_TIMEOUT)["routing_key"] == other


@pytest.mark.broker
def test_amqtask_expires_is_honoured_by_the_celery_worker(amq_app: App) -> None:
    info = amq_app.tasks["interop.info"]
    assert info.apply_async(expires=60).get(timeout=RESULT_TIMEOUT)["worker"] == "celery"
    late = info.apply_async(countdown=2, expires=1)
    with pytest.raises(TaskRevokedError, match="expired"):
        late.get(timeout=RESULT_TIMEOUT)


@pytest.mark.broker
def test_celery_retry_is_seen_by_the_amqtask_client(amq_app: App) -> None:
    assert amq_app.tasks["interop.flaky"].delay(2).get(timeout=RESULT_TIMEOUT) == 2


@pytest.mark.broker
def test_amqtask_chain_runs_on_the_celery_worker(amq_app: App) -> None:
    add, mul = amq_app.tasks["interop.add"], amq_app.tasks["interop.mul"]
    assert (add.s(2, 2) | mul.s(3)).delay().get(timeout=RESULT_TIMEOUT) == 12
    assert (add.s(1, 1) | add.s(1) | mul.s(10)).apply_async().get(timeout=RESULT_TIMEOUT) == 30
    assert amqtask.group(add.s(1, 1), add.s(2, 2)).delay().get(timeout=RESULT_TIMEOUT) == [2, 4]


# ---------------------------------------------------------------------------------------------- remote control


@pytest.mark.broker
def test_celery_control_ping_reaches_the_amqtask_worker(celery_app: Any, amqtask_worker: Peer) -> None:
    """Stretch goal: ``celery inspect ping`` / ``control.ping`` is answered by an amqtask worker."""
    hostname = amqtask_worker.process.hostname
    replies = celery_app.control.ping(destination=[hostname], timeout=5, limit=1)
    assert replies == [{hostname: {"ok": "pong"}}]
    registered = celery_app.control.inspect(destination=[hostname], timeout=5, limit=1).registered()
    assert "interop.add" in registered[hostname]


@pytest.mark.broker
def test_amqtask_control_ping_reaches_the_celery_worker(amq_app: App, celery_worker: Peer) -> None:
    """Requests go in ``control_serializer``: JSON by default (all a Celery worker accepts by default),
    msgpack for a Celery worker that accepts nothing else."""
    assert amq_app.conf.control_serializer == "json"
    amq_app.conf.update({"control_serializer": celery_worker.serializer})
    hostname = celery_worker.process.hostname
    assert amq_app.control.ping(timeout=5, destination=[hostname]) == [{hostname: {"ok": "pong"}}]


# ---------------------------------------------------------------------------------------------- shared queues
# Every start order, with no queue configuration on either side but the priority queue's max_priority:
# kombu declares the queue again on every publish and a Celery worker at start, so each of them must
# find amqtask's declaration equivalent, and amqtask must take theirs.


def _worker_name(unique: str) -> str:
    return f"amqtask-{unique}@localhost"


def _assert_dead_lettered(url: str, queue: str, task_id: str) -> None:
    dead = asyncio.run(get_raw(url, queue + DLQ_SUFFIX, timeout=RESULT_TIMEOUT))
    assert (dead.headers["id"], dead.headers["x-amqtask-reason"]) == (task_id, "failed")


@pytest.mark.broker
def test_celery_client_first_then_an_amqtask_worker_on_celery(broker_url: str, serializer: str, unique: str) -> None:
    """A Celery client declares ``celery`` and sends; an amqtask worker that names only its default
    queue starts on it, answers the waiting client, and keeps the failure in ``celery.dlq``."""
    queue = "celery"
    worker_app = amq_side.create_app(broker_url, queue, serializer, name=f"interop-{unique}")
    try:
        with celery_client(broker_url, queue, serializer) as client:
            pending = client.send_task("interop.add", args=(2, 2))  # declares the queue, kombu's way
            failing = client.send_task("interop.fail", args=("celery first",))
            with worker_thread(worker_app, queues=[queue], hostname=_worker_name(unique)):
                assert pending.get(timeout=RESULT_TIMEOUT) == 4
                with pytest.raises(ValueError, match="celery first"):
                    failing.get(timeout=RESULT_TIMEOUT)
                # kombu declares the queue again on this publish: amqtask's declaration is equivalent.
                assert client.send_task("interop.mul", args=(3, 3)).get(timeout=RESULT_TIMEOUT) == 9
        _assert_dead_lettered(broker_url, queue, failing.id)
    finally:
        worker_app.close()
        delete_objects(broker_url, queue_pair(queue), queue_pair(queue))


@pytest.mark.broker
def test_celery_worker_first_then_amqtask_client_and_worker(
    broker_url: str, serializer: str, unique: str, tmp_path: Path
) -> None:
    """A Celery worker declares the queues; an amqtask client gets its results, then an amqtask worker
    joins on the same queues and takes over when the Celery worker stops."""
    queue = f"interop-{unique}"
    app = amq_side.create_app(broker_url, queue, serializer, name=f"interop-{unique}")
    celery_worker = start_celery_worker(broker_url, queue, serializer, tmp_path / "celery.log")
    try:
        assert app.send_task("interop.info").get(timeout=RESULT_TIMEOUT)["worker"] == "celery"
        with worker_thread(app, queues=list(queue_pair(queue)), hostname=_worker_name(unique)):
            celery_worker.stop()
            failing = app.send_task("interop.fail", args=("celery worker first",))
            with pytest.raises(ValueError, match="celery worker first"):
                failing.get(timeout=RESULT_TIMEOUT)
            info = app.tasks["interop.info"].apply_async(queue=celery_side.priority_queue(queue), priority=5)
            assert info.get(timeout=RESULT_TIMEOUT)["worker"] == "amqtask"
        _assert_dead_lettered(broker_url, queue, failing.id)
    finally:
        celery_worker.stop()
        app.close()
        delete_objects(broker_url, queue_pair(queue), queue_pair(queue))


@pytest.mark.broker
def test_amqtask_worker_first_then_celery_client_and_worker(
    broker_url: str, serializer: str, unique: str, tmp_path: Path
) -> None:
    """An amqtask worker declares the queues; a Celery client and then a Celery worker declare them
    their way without a refusal, and the Celery worker serves an amqtask client once amqtask's stops."""
    queue = f"interop-{unique}"
    app = amq_side.create_app(broker_url, queue, serializer, name=f"interop-{unique}")
    celery_worker: Process | None = None
    try:
        with worker_thread(app, queues=list(queue_pair(queue)), hostname=_worker_name(unique)):
            with celery_client(broker_url, queue, serializer) as client:
                assert client.send_task("interop.info").get(timeout=RESULT_TIMEOUT)["worker"] == "amqtask"
                failing = client.send_task("interop.fail", args=("amqtask first",))
                with pytest.raises(ValueError, match="amqtask first"):
                    failing.get(timeout=RESULT_TIMEOUT)
            celery_worker = start_celery_worker(broker_url, queue, serializer, tmp_path / "celery.log")
        _assert_dead_lettered(broker_url, queue, failing.id)
        wait_for(lambda: consumers(broker_url, queue) == 1, RESULT_TIMEOUT, "the Celery worker alone on the queue")
        celery_worker.check_running()  # its declarations were accepted
        assert app.send_task("interop.info").get(timeout=RESULT_TIMEOUT)["worker"] == "celery"
    finally:
        if celery_worker is not None:
            celery_worker.stop()
        app.close()
        delete_objects(broker_url, queue_pair(queue), queue_pair(queue))


@pytest.mark.broker
def test_strict_queues_refuse_a_queue_celery_declared_otherwise(broker_url: str, serializer: str) -> None:
    """``task_queues_strict=True`` keeps the refusal, naming both sides and the fix."""
    queue = "celery"
    with celery_client(broker_url, queue, serializer) as client:
        try:
            client.send_task("interop.add", args=(2, 2))  # declares the queue, Celery's way
            strict = App(
                "interop-strict", broker=broker_url, task_default_queue=queue, publish_timeout_s=10,
                task_queues={queue: {"dead_letter": True}}, task_queues_strict=True,
            )  # fmt: skip
            error = asyncio.run(_refused_start(strict, queue))
            assert (error.name, error.existing) == (queue, {"x-dead-letter-exchange": None})
            assert error.wanted["x-dead-letter-routing-key"] == "celery.dlq"
            assert "'dead_letter': False" in str(error)
        finally:
            delete_objects(broker_url, queue_pair(queue), (queue,))


async def _refused_start(app: App, queue: str) -> TopologyMismatchError:
    try:
        with pytest.raises(TopologyMismatchError) as refused:
            await Worker(app, queues=[queue], hostname=f"amqtask-{uuid.uuid4().hex[:8]}@localhost").start()
    finally:
        await app.aclose()
    return refused.value


@pytest.mark.parametrize(
    ("spec", "existing", "hint"),
    [
        (
            QueueSpec("celery", dead_letter=True),
            {"x-dead-letter-exchange": None},
            "set dead_letter=False for it: task_queues={'celery': {'dead_letter': False}}",
        ),
        (QueueSpec("q"), {"x-dead-letter-exchange": ""}, "set dead_letter=True"),
        (QueueSpec("q"), {"x-max-priority": "10"}, "set max_priority in task_queues={'q': {...}}"),
        (QueueSpec("q"), {"x-queue-type": "quorum"}, "set queue_type in task_queues"),
        (QueueSpec("q"), {"x-message-ttl": "5"}, "(arguments=... for others)"),
        (QueueSpec("q"), "unknown", "make the options in task_queues={'q': {...}} match"),
    ],
    ids=["celery-queue", "amqtask-queue", "priority", "type", "other", "unknown"],
)
def test_a_mismatch_says_how_to_make_both_declarations_agree(spec: QueueSpec, existing: Any, hint: str) -> None:
    assert hint in topology.mismatch_hint(spec, existing)
    error = TopologyMismatchError("queue", spec.name, existing, {"durable": True}, "broker text", hint="the hint")
    assert str(error).endswith("(broker said: broker text); the hint")


class _LazySettings:
    """What ``django.conf.settings`` is: a lazy proxy whose settings exist only through ``__getattr__``/``__dir__``."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_wrapped", types.SimpleNamespace(**values))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def __dir__(self) -> list[str]:
        return dir(self._wrapped)


def test_django_settings_load_through_the_celery_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """``app.config_from_object("django.conf:settings", namespace="CELERY")`` works as in Celery."""
    conf_module = types.ModuleType("fake_django.conf")
    conf_module.settings = _LazySettings(  # type: ignore[attr-defined]
        {
            "DEBUG": True,
            "INSTALLED_APPS": ["app"],
            "CELERY_BROKER_URL": "amqp://guest:guest@rabbit:5672/prod",
            "CELERY_TASK_DEFAULT_QUEUE": "celery",
            "CELERY_TASK_SERIALIZER": "json",
            "CELERY_ACCEPT_CONTENT": ["json"],
            "CELERY_TIMEZONE": "Europe/Berlin",
        }
    )
    monkeypatch.setitem(sys.modules, "fake_django", types.ModuleType("fake_django"))
    monkeypatch.setitem(sys.modules, "fake_django.conf", conf_module)
    app = App("django-proj")
    app.config_from_object("fake_django.conf:settings", namespace="CELERY")
    conf = app.conf
    assert conf.broker_url == ("amqp://guest:guest@rabbit:5672/prod",)
    assert (conf.task_default_queue, conf.task_serializer, conf.accept_content) == ("celery", "json", ("json",))
    assert conf.timezone == "Europe/Berlin"
    # A Celery setting amqtask has no equivalent for is refused by name, not ignored.
    conf_module.settings._wrapped.CELERY_RESULT_BACKEND = "redis://"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="CELERY_RESULT_BACKEND"):
        app.config_from_object("fake_django.conf:settings", namespace="CELERY")


# ---------------------------------------------------------------------------------------------- dependency


def test_importing_amqtask_never_imports_celery() -> None:
    """Celery is a test-only dependency: no amqtask module imports celery, kombu, py-amqp or billiard."""
    code = (
        "import importlib, pkgutil, sys, amqtask\n"
        "for info in pkgutil.walk_packages(amqtask.__path__, 'amqtask.'):\n"
        "    if info.name != 'amqtask.__main__' and not info.name.startswith('amqtask.contrib.'):\n"
        "        importlib.import_module(info.name)\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in {'celery', 'kombu', 'amqp', 'billiard'})\n"
        "print(found)\n"
        "sys.exit(1 if found else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"
