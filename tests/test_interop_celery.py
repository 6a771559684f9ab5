"""Interoperability with Celery 5, proven against Celery itself: real ``celery worker`` and ``amqtask
worker`` processes on a real broker, every scenario in JSON and in msgpack.

- Celery client -> amqtask worker: ``send_task``/``delay``, results and failures through Celery's
  ``rpc://`` backend, countdown/eta (held in amqtask's broker-side delay levels), expires, priority,
  ``self.retry`` and chains started from Celery.
- amqtask client -> Celery worker: ``delay``/``send_task``/``apply_async`` (countdown, priority, queue),
  failures, expires, Celery-side retries and chains; the Celery worker replies to amqtask's reply queue.
- Queues shared with Celery: who declares first does not matter with ``dead_letter=False``; without
  it the broker refuses the second declaration and amqtask's error names both sides and the fix.
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
import os
import signal
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
from support.workers import TESTS_DIR, get_raw, wait_for, worker_thread

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


def _consumers(url: str, queue: str) -> int:
    """Consumers on ``queue`` (0 when it does not exist yet), from a passive declare."""

    async def count() -> int:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return 0
            return int(declared.declaration_result.consumer_count or 0)

    return asyncio.run(count())


def _depth(url: str, queue: str) -> int:
    async def depth() -> int:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    return asyncio.run(depth())


def _delayed(url: str) -> int:
    """Messages waiting in the first delay levels (up to 7 s: every delay these tests use)."""
    return sum(_depth(url, f"amqtask.delay.L{level:02d}") for level in range(3))


def _delete(url: str, queues: tuple[str, ...] = (), exchanges: tuple[str, ...] = ()) -> None:
    """Delete what a test declared (queues with their dead-letter queues; exchanges Celery made)."""

    async def delete() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            for name in queues:
                await channel.queue_delete(name)
                await channel.queue_delete(name + DLQ_SUFFIX)
            for name in exchanges:
                await channel.exchange_delete(name)

    asyncio.run(delete())


@dataclass
class Process:
    """A worker subprocess whose output goes to a file (a pipe nobody reads could fill up and block it)."""

    popen: subprocess.Popen[bytes]
    log: Path
    name: str
    hostname: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")

    def stop(self, timeout: float = 20) -> str:
        """SIGTERM (a warm shutdown for both workers), wait, and return the output."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM:\n{self.output()}") from None
        return self.output()


def _start(name: str, argv: list[str], env: dict[str, str], log: Path, hostname: str) -> Process:
    environment = {**os.environ, **env}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), environment.get("PYTHONPATH", "")])
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*argv, "-n", hostname], env=environment, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(popen, log, name, hostname)


def _wait_consuming(process: Process, url: str, queues: tuple[str, ...], timeout: float = 30) -> None:
    def ready() -> bool:
        process.check_running()
        return all(_consumers(url, queue) >= 1 for queue in queues)

    try:
        wait_for(ready, timeout, f"{process.name} to consume {', '.join(queues)}")
    except AssertionError:
        process.stop()
        raise


def _env(url: str, queue: str, serializer: str) -> dict[str, str]:
    return {"INTEROP_BROKER_URL": url, "INTEROP_QUEUE": queue, "INTEROP_SERIALIZER": serializer}


def start_celery_worker(url: str, queue: str, serializer: str, log: Path, *extra_queues: str) -> Process:
    """``celery worker -P solo`` consuming ``queue``, its priority queue and ``extra_queues``."""
    queues = (queue, celery_side.priority_queue(queue), *extra_queues)
    argv = [sys.executable, "-m", "celery", "-A", "interop_celery_app", "worker", "-P", "solo", "-c", "1",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
            "-Q", ",".join(queues)]  # fmt: skip
    process = _start(
        "celery worker", argv, _env(url, queue, serializer), log, f"celeryw-{uuid.uuid4().hex[:8]}@localhost"
    )
    _wait_consuming(process, url, queues)
    return process


def start_amqtask_worker(url: str, queue: str, serializer: str, log: Path) -> Process:
    """``amqtask worker -A interop_amqtask_app`` consuming ``queue`` and its priority queue."""
    queues = (queue, amq_side.priority_queue(queue))
    argv = [sys.executable, "-m", "amqtask", "worker", "-A", "interop_amqtask_app", "-l", "info",
            "-c", "4", "-Q", ",".join(queues)]  # fmt: skip
    process = _start(
        "amqtask worker", argv, _env(url, queue, serializer), log, f"amqtask-{uuid.uuid4().hex[:8]}@localhost"
    )
    _wait_consuming(process, url, queues)
    return process


@contextlib.contextmanager
def celery_client(url: str, queue: str, serializer: str, **kwargs: Any) -> Iterator[Any]:
    """A Celery app in this process (a client), its connections closed afterwards."""
    app = celery_side.create_app(url, queue, serializer, **kwargs)
    try:
        yield app
    finally:
        consumer = app.backend.result_consumer
        if getattr(consumer, "_consumer", None) is not None:
            consumer.stop()
        app.close()
        # kombu keeps producer connections in process-wide pools keyed by URL, and each remembers the
        # queues it declared: close them, so the next client declares again (and leaks no socket).
        kombu.pools.reset()


def _names(queue: str) -> tuple[str, ...]:
    return (queue, celery_side.priority_queue(queue))


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
        _delete(broker_url, _names(queue), _names(queue))


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
        names = (*_names(queue), f"{queue}-other")
        _delete(broker_url, names, names)


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
        _delete(url, (name,))


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
        _delete(broker_url, _names(queue), _names(queue))


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
        _delete(broker_url, _names(queue), _names(queue))


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


@pytest.mark.broker
def test_amqtask_worker_on_a_queue_celery_declared(broker_url: str, serializer: str, tmp_path: Path) -> None:
    """Celery declares ``celery`` first; amqtask's default declaration is refused with a clear error, and
    ``dead_letter=False`` makes amqtask take the queue as Celery made it."""
    queue = "celery"
    with celery_client(broker_url, queue, serializer) as client:
        try:
            pending = client.send_task("interop.add", args=(2, 2))  # declares the queue, Celery's way
            plain = App("interop-plain", broker=broker_url, task_default_queue=queue, publish_timeout_s=10)
            error = asyncio.run(_refused_start(plain, queue))
            assert error.name == queue
            assert error.existing == {"x-dead-letter-exchange": None}
            assert error.wanted["x-dead-letter-routing-key"] == "celery.dlq"
            text = str(error)
            assert "queue 'celery'" in text and "existing={'x-dead-letter-exchange': None}" in text
            assert "wanted={" in text and "'dead_letter': False" in text

            shared = amq_side.create_app(broker_url, queue, serializer, name="interop-shared")
            try:
                with worker_thread(shared, queues=[queue], hostname=f"amqtask-{uuid.uuid4().hex[:8]}@localhost"):
                    assert pending.get(timeout=RESULT_TIMEOUT) == 4
                    assert client.send_task("interop.mul", args=(3, 3)).get(timeout=RESULT_TIMEOUT) == 9
            finally:
                shared.close()
            assert _depth(broker_url, queue + DLQ_SUFFIX) == 0  # declared for amqtask's own dead-lettering
        finally:
            _delete(broker_url, (queue, celery_side.priority_queue(queue)), (queue,))


async def _refused_start(app: App, queue: str) -> TopologyMismatchError:
    try:
        with pytest.raises(TopologyMismatchError) as refused:
            await Worker(app, queues=[queue], hostname=f"amqtask-{uuid.uuid4().hex[:8]}@localhost").start()
    finally:
        await app.aclose()
    return refused.value


@pytest.mark.broker
def test_celery_on_a_queue_amqtask_declared(broker_url: str, serializer: str, unique: str, tmp_path: Path) -> None:
    """amqtask declares first: with ``dead_letter=False`` a Celery worker and client take the queue as is;
    with amqtask's default dead-letter arguments the broker refuses Celery's declaration."""
    shared_queue, dlx_queue = f"interop-{unique}", f"interop-{unique}-dlx"
    app = amq_side.create_app(broker_url, shared_queue, serializer, name="interop-first")
    try:
        pending = app.send_task("interop.add", args=(5, 5))  # declares the queues (dead_letter=False)
        app.send_task("interop.add", args=(0, 0), queue=dlx_queue, ignore_result=True)  # default: dead-lettering
        worker = start_celery_worker(broker_url, shared_queue, serializer, tmp_path / "celery.log")
        try:
            assert pending.get(timeout=RESULT_TIMEOUT) == 10
            with celery_client(broker_url, shared_queue, serializer) as client:
                assert client.send_task("interop.add", args=(1, 2)).get(timeout=RESULT_TIMEOUT) == 3
                with pytest.raises(Exception, match=r"inequivalent arg 'x-dead-letter-exchange'") as refused:
                    client.send_task("interop.add", args=(1, 2), queue=dlx_queue)
                assert type(refused.value).__name__ == "PreconditionFailed"
        finally:
            worker.stop()
    finally:
        app.close()
        _delete(broker_url, (*_names(shared_queue), dlx_queue), (*_names(shared_queue), dlx_queue))


@pytest.mark.parametrize(
    ("spec", "existing", "hint"),
    [
        (
            QueueSpec("celery"),
            {"x-dead-letter-exchange": None},
            "set dead_letter=False for it: task_queues={'celery': {'dead_letter': False}}",
        ),
        (QueueSpec("q", dead_letter=False), {"x-dead-letter-exchange": ""}, "drop dead_letter=False"),
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
        "    if info.name != 'amqtask.__main__':\n"
        "        importlib.import_module(info.name)\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in {'celery', 'kombu', 'amqp', 'billiard'})\n"
        "print(found)\n"
        "sys.exit(1 if found else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"
