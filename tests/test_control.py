"""Remote control (``amqtask.remote``): Celery's pidbox on the wire, the commands, revokes, the CLI.

Celery's pidbox exchange is shared by every worker on a vhost, so broker tests run in the session's
own vhost, give their workers unique hostnames, and address them with ``destination`` or keep only
their replies. Waiting is always on an event or a reply, with a timeout; never a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pamqp.header
import pytest
from click.testing import CliRunner
from fixtures_celery import load
from support.broker import TestBroker

from amqtask import App, TaskRevokedError, Worker
from amqtask.cli import main
from amqtask.commands.replies import format_reply
from amqtask.remote import flatten
from amqtask.remote import wire as ctl
from amqtask.remote.commands import RevokedIds
from amqtask.remote.node import _matches
from amqtask.topology import queue_depth

# ---------------------------------------------------------------------------------------------- helpers


def make_app(broker_url: str, queue: str, main_name: str = "ctl") -> App:
    """An app whose default queue is the test's own, with one plain task."""
    app = App(main_name, broker=broker_url, task_default_queue=queue)

    @app.task(name=f"{queue}.add")
    def add(x: int, y: int) -> int:
        return x + y

    return app


@contextlib.asynccontextmanager
async def running(app: App, hostname: str, **options: Any) -> AsyncIterator[Worker]:
    """A worker of ``app`` consuming (and answering control requests) inside the block."""
    worker = Worker(app, hostname=hostname, **options)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(grace=5)


def ours(replies: list[dict[str, Any]], *nodes: str) -> dict[str, Any]:
    """The replies of the given nodes only (other workers on the vhost may answer a broadcast)."""
    return {node: reply for item in replies for node, reply in item.items() if node in nodes}


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


class RawMailbox:
    """A reply queue declared with aio-pika exactly like a Celery client's (fixture topology)."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, oid: str) -> None:
        self.connection = connection
        self.oid = oid
        self.replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def open(self) -> RawMailbox:
        channel = await self.connection.channel()
        self.channel = channel
        reply_exchange = await channel.declare_exchange(ctl.REPLY_EXCHANGE, "direct", durable=False)
        self.exchange = await channel.declare_exchange(ctl.EXCHANGE, "fanout", durable=False)
        queue = await channel.declare_queue(
            ctl.reply_queue_name(self.oid), exclusive=True, auto_delete=True, arguments=ctl.QUEUE_ARGUMENTS
        )
        await queue.bind(reply_exchange, self.oid)
        await queue.consume(self.replies.put, no_ack=True)
        return self

    async def request(self, body: dict[str, Any], expires: int) -> None:
        """Publish a request as a Celery client does (json.dumps body, clock and expires headers).

        ``expires`` is whole seconds: aio-pika (pamqp) would write a float as a 32-bit float, 128 s
        coarse at epoch magnitudes. Celery's double is covered by the Celery interop tests.
        """
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            content_encoding="utf-8",
            headers={"clock": 1, "expires": expires},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=0,
        )
        await self.exchange.publish(message, routing_key="")

    async def reply(self, timeout: float = 10) -> aio_pika.abc.AbstractIncomingMessage:
        return await asyncio.wait_for(self.replies.get(), timeout)


def fixture_request(name: str, destination: list[str], ticket: str, oid: str) -> dict[str, Any]:
    """The decoded request of a control fixture, readdressed to our worker and our reply queue."""
    body: dict[str, Any] = load(name)["requests"][0]["body_decoded"]
    body.update(destination=destination, ticket=ticket)
    body["reply_to"]["routing_key"] = oid
    return body


# ---------------------------------------------------------------------------------------------- pure logic


def test_revoked_ids_are_bounded_and_expire() -> None:
    revoked = RevokedIds(max_size=3, expires_s=3600)
    revoked.add(["a", "b", "c", "d"])
    assert revoked.ids() == ["b", "c", "d"]
    assert "a" not in revoked and "d" in revoked
    expired = RevokedIds(expires_s=-1)
    expired.add(["x"])
    assert "x" not in expired


@pytest.mark.parametrize(
    ("body", "addressed"),
    [
        ({}, True),
        ({"destination": None}, True),
        ({"destination": ["w1@h"]}, True),
        ({"destination": ["w2@h"]}, False),
        ({"pattern": "w*@h", "matcher": "glob"}, True),
        ({"pattern": "w2.*", "matcher": "pcre"}, False),
        ({"pattern": "w1", "matcher": "unknown"}, False),
    ],
)
def test_destination_and_pattern_rules(body: dict[str, Any], addressed: bool) -> None:
    assert _matches("w1@h", body) is addressed


def test_expires_header_as_celery_sends_it() -> None:
    """The fixture's raw content header (a double ``expires``), decoded as the worker receives it."""
    record = load("control_ping.json")["requests"][0]
    content = pamqp.header.ContentHeader()
    content.unmarshal(base64.b64decode(record["content_header_payload_b64"]))
    headers = content.properties.headers
    assert headers == record["properties"]["headers"]
    assert isinstance(headers["expires"], float)
    assert ctl.expired({**headers, "expires": time.time() - 0.5})
    assert not ctl.expired({**headers, "expires": time.time() + 30})
    assert not ctl.expired({**headers, "expires": 0})
    assert not ctl.expired({"clock": 1})


def test_lamport_clock_moves_past_peers() -> None:
    clock = ctl.LamportClock()
    assert clock.forward() == 1
    clock.adjust(10)
    assert clock.value == 11
    clock.adjust("not a number")
    assert clock.value == 11


def test_flatten_and_human_output() -> None:
    assert flatten([{"a@h": 1}, {"b@h": 2}]) == {"a@h": 1, "b@h": 2}
    assert format_reply("a@h", {"ok": "pong"}) == "-> a@h: OK pong"
    assert format_reply("a@h", {"error": "boom"}) == "-> a@h: ERROR boom"
    assert format_reply("a@h", []) == "-> a@h: OK\n    - empty -"
    assert format_reply("a@h", ["t.add", "t.mul"]) == "-> a@h: OK\n    t.add\n    t.mul"


# ---------------------------------------------------------------------------------------------- broker


@pytest.mark.broker
@pytest.mark.parametrize("control_serializer", ["json", "msgpack"])
def test_ping_reaches_every_worker(broker_url: str, unique: str, control_serializer: str) -> None:
    a, b = f"{unique}-a@ctl", f"{unique}-b@ctl"

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        client.conf.update({"control_serializer": control_serializer})
        async with running(make_app(broker_url, unique), a), running(make_app(broker_url, unique), b):
            broadcast = await client.control.aping(timeout=1.0)
            assert ours(broadcast, a, b) == {a: {"ok": "pong"}, b: {"ok": "pong"}}
            # The synchronous API, from a thread (it must not block the loop the workers run on).
            replies = await asyncio.to_thread(client.control.ping, 5.0, [a, b])
            assert sorted(replies, key=str) == [{a: {"ok": "pong"}}, {b: {"ok": "pong"}}]
            await asyncio.to_thread(client.close)
        await client.aclose()

    run(scenario)


@pytest.mark.broker
def test_destination_and_pattern_select_workers(broker_url: str, unique: str) -> None:
    a, b = f"{unique}-a@ctl", f"{unique}-b@ctl"

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        async with running(make_app(broker_url, unique), a), running(make_app(broker_url, unique), b):
            started = time.monotonic()
            assert await client.control.aping(timeout=10, destination=[a]) == [{a: {"ok": "pong"}}]
            # limit defaults to len(destination): the wait ends with the reply, not the timeout.
            assert time.monotonic() - started < 5
            assert await client.control.inspect(timeout=10, destination=[b]).aping() == {b: {"ok": "pong"}}
            by_pattern = await client.control.abroadcast(
                "ping", reply=True, timeout=10, limit=1, pattern=f"{unique}-b@*", matcher="glob"
            )
            assert by_pattern == [{b: {"ok": "pong"}}]
            assert await client.control.aping(timeout=0.3, destination=[f"{unique}-nobody@ctl"]) == []
        await client.aclose()

    run(scenario)


@pytest.mark.broker
def test_registered_lists_task_names(broker_url: str, unique: str) -> None:
    a = f"{unique}-a@ctl"
    app = make_app(broker_url, unique)

    @app.task(name=f"{unique}.routed", queue=unique, routing_key="rk")
    def routed() -> None:
        pass

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        async with running(app, a):
            inspect = client.control.inspect(timeout=10, destination=[a])
            assert await inspect.aregistered() == {a: [f"{unique}.add", f"{unique}.routed [routing_key=rk]"]}
            assert await inspect.aregistered("queue") == {a: [f"{unique}.add", f"{unique}.routed [queue={unique}]"]}
        await client.aclose()

    run(scenario)


@pytest.mark.broker
def test_active_shows_running_tasks(broker_url: str, unique: str) -> None:
    a = f"{unique}-a@ctl"
    app = make_app(broker_url, unique)

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        @app.task(name=f"{unique}.block")
        async def block(x: int, k: int = 0) -> int:
            started.set()
            await release.wait()
            return x + k

        client = make_app(broker_url, unique, "client")
        async with running(app, a) as worker:
            before = time.time()
            result = await client.asend_task(f"{unique}.block", (1,), {"k": 2})
            await asyncio.wait_for(started.wait(), 10)
            inspect = client.control.inspect(timeout=10, destination=[a])
            [info] = (await inspect.aactive())[a]
            assert {k: info[k] for k in ("id", "name", "type", "args", "kwargs", "hostname", "worker_pid")} == {
                "id": result.id, "name": f"{unique}.block", "type": f"{unique}.block", "args": [1],
                "kwargs": {"k": 2}, "hostname": a, "worker_pid": os.getpid(),
            }  # fmt: skip
            assert info["acknowledged"] is False
            assert before <= info["time_start"] <= time.time()
            assert set(info["delivery_info"]) == {"exchange", "routing_key", "priority", "redelivered"}
            [safe] = (await inspect.aactive(safe=True))[a]
            assert (safe["args"], safe["kwargs"]) == ("(1,)", "{'k': 2}")
            release.set()
            assert await result.aget(timeout=10) == 3
            assert worker.active == {}
            assert await inspect.aactive() == {a: []}
        await client.aclose()

    run(scenario)


@pytest.mark.broker
def test_stats_has_celery_keys(broker_url: str, unique: str) -> None:
    a = f"{unique}-a@ctl"

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        async with running(make_app(broker_url, unique), a, concurrency=3):
            assert await (await client.asend_task(f"{unique}.add", (2, 3))).aget(timeout=10) == 5
            stats = (await client.control.inspect(timeout=10, destination=[a]).astats())[a]
        await client.aclose()
        assert stats["pid"] == os.getpid()
        assert stats["hostname"] == a
        assert stats["queues"] == [unique]
        assert stats["pool"]["max-concurrency"] == 3
        assert isinstance(stats["total"], dict)
        assert isinstance(stats["uptime"], int)
        assert isinstance(stats["rusage"]["utime"], float)
        broker = stats["broker"]
        assert broker["transport"] == "amqp"
        assert broker["virtual_host"] == broker_url.rsplit("/", 1)[1]
        assert broker["uri"].startswith("amqp://guest:***@")
        assert "guest:guest" not in json.dumps(stats)

    run(scenario)


@pytest.mark.broker
def test_revoked_task_is_acked_and_answered_without_running(broker_url: str, unique: str) -> None:
    a = f"{unique}-a@ctl"
    app = make_app(broker_url, unique)
    ran: list[str] = []

    @app.task(name=f"{unique}.record")
    def record(value: str) -> str:
        ran.append(value)
        return value

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        revoked_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
        async with running(app, a):
            replies = await client.control.arevoke(revoked_id, destination=[a], reply=True, timeout=10)
            assert replies == [{a: {"ok": f"tasks {{'{revoked_id}'}} flagged as revoked"}}]
            # Celery clients may send one id as a string rather than a list.
            await client.control.abroadcast("revoke", {"task_id": other_id}, destination=[a], reply=True, timeout=10)
            assert await client.control.inspect(timeout=10, destination=[a]).arevoked() == {a: [revoked_id, other_id]}
            result = await client.asend_task(f"{unique}.record", ("revoked",), task_id=revoked_id)
            with pytest.raises(TaskRevokedError):
                await result.aget(timeout=10)
            assert await (await client.asend_task(f"{unique}.record", ("ran",))).aget(timeout=10) == "ran"
        # The worker has stopped: an unacked delivery would be back in the queue now.
        broker = client.runtime().broker
        assert await queue_depth(broker, unique) == 0
        assert await queue_depth(broker, app.router.queue(unique).dlq_name) == 0
        await client.aclose()
        assert ran == ["ran"]

    run(scenario)


@pytest.mark.broker
def test_expired_request_is_ignored(broker_url: str, unique: str) -> None:
    a = f"{unique}-a@ctl"

    async def scenario() -> None:
        async with running(make_app(broker_url, unique), a), await aio_pika.connect(broker_url) as connection:
            mailbox = await RawMailbox(connection, str(uuid.uuid4())).open()
            stale, fresh = str(uuid.uuid4()), str(uuid.uuid4())
            await mailbox.request(fixture_request("control_ping.json", [a], stale, mailbox.oid), int(time.time()) - 1)
            await mailbox.request(fixture_request("control_ping.json", [a], fresh, mailbox.oid), int(time.time()) + 30)
            # The worker handles requests in order: once the fresh one is answered, the stale one was dropped.
            reply = await mailbox.reply()
            assert reply.headers["ticket"] == fresh
            assert mailbox.replies.empty()

    run(scenario)


@pytest.mark.broker
def test_answers_a_celery_request_like_celery(broker_url: str, unique: str) -> None:
    """A request byte-for-byte like the fixture's gets a reply with the fixture's properties and layout."""
    a = f"{unique}-a@ctl"
    expected = load("control_ping.json")["replies"][0]

    async def scenario() -> None:
        async with running(make_app(broker_url, unique), a), await aio_pika.connect(broker_url) as connection:
            mailbox = await RawMailbox(connection, str(uuid.uuid4())).open()
            ticket = str(uuid.uuid4())
            body = fixture_request("control_ping.json", [a], ticket, mailbox.oid)
            await mailbox.request(body, int(time.time()) + 10)
            reply = await mailbox.reply()
            assert (reply.exchange, reply.routing_key) == (ctl.REPLY_EXCHANGE, mailbox.oid)
            props = expected["properties"]
            assert reply.content_type == props["content_type"]
            assert reply.content_encoding == props["content_encoding"]
            assert reply.delivery_mode == props["delivery_mode"] == 1
            assert reply.priority == props["priority"]
            assert reply.correlation_id is None and reply.reply_to is None
            assert set(reply.headers) == set(props["headers"])
            assert reply.headers["ticket"] == ticket
            assert isinstance(reply.headers["clock"], int)
            assert reply.body == json.dumps({a: {"ok": "pong"}}).encode()

            registered = fixture_request("control_inspect_registered.json", [a], ticket, mailbox.oid)
            await mailbox.request(registered, int(time.time()) + 10)
            assert json.loads((await mailbox.reply()).body) == {a: [f"{unique}.add"]}

    run(scenario)


@pytest.mark.broker
def test_client_request_and_topology_match_celery(
    rabbitmq: TestBroker, broker_vhost: str, broker_url: str, unique: str
) -> None:
    a = f"{unique}-a@ctl"
    fixture = load("control_ping_destination.json")["requests"][0]
    topology = load("broker_topology_control.json")["topology"]

    def listing(kind: str, *columns: str) -> dict[str, dict[str, Any]]:
        out = rabbitmq.ctl("-q", f"list_{kind}", "-p", broker_vhost, "name", *columns, "--formatter", "json")
        return {row["name"]: row for row in json.loads(out)}

    def queue_shape(row: dict[str, Any]) -> tuple[Any, ...]:
        # RabbitMQ 4.x lists the queue type it filled in; kombu never sends one.
        arguments = {name: value for name, _, value in row["arguments"] if name != "x-queue-type"}
        return bool(row["durable"]), bool(row["auto_delete"]), bool(row["exclusive"]), arguments

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        async with running(make_app(broker_url, unique), a), await aio_pika.connect(broker_url) as connection:
            channel = await connection.channel()
            spy = await channel.declare_queue(exclusive=True)
            await spy.bind(ctl.EXCHANGE, "")
            assert await client.control.aping(timeout=10, destination=[a]) == [{a: {"ok": "pong"}}]
            request = await spy.get(timeout=5)
            assert (request.exchange, request.routing_key) == (ctl.EXCHANGE, "")
            props = fixture["properties"]
            assert (request.content_type, request.content_encoding) == (
                props["content_type"],
                props["content_encoding"],
            )
            assert (request.delivery_mode, request.priority) == (props["delivery_mode"], props["priority"])
            assert request.correlation_id is None and request.reply_to is None
            assert set(request.headers) == {"clock", "expires"}
            assert isinstance(request.headers["clock"], int) and isinstance(request.headers["expires"], int)
            body = json.loads(request.body)
            assert list(body) == list(fixture["body_decoded"])
            assert (body["method"], body["arguments"], body["destination"]) == ("ping", {}, [a])
            assert body["reply_to"]["exchange"] == ctl.REPLY_EXCHANGE

            # The client's reply queue exists only during a call: look while one waits for nobody.
            waiting = asyncio.create_task(client.control.aping(timeout=60, destination=[f"{unique}-x@ctl"]))
            reply_queues: list[dict[str, Any]] = []
            while not reply_queues and not waiting.done():
                queues = await asyncio.to_thread(listing, "queues", "durable", "auto_delete", "exclusive", "arguments")
                reply_queues = [q for q in queues.values() if q["name"].endswith(".reply.celery.pidbox")]
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            worker_queue = queues[ctl.worker_queue_name(a)]
            exchanges = await asyncio.to_thread(listing, "exchanges", "type", "durable", "auto_delete")
        await client.aclose()

        want = {q["name"]: q for q in topology["queues"]}
        assert queue_shape(worker_queue) == queue_shape(want["cwworker@localhost.celery.pidbox"])
        assert reply_queues, "no client reply queue seen while a call was waiting"
        fixture_reply = next(q for q in want.values() if q["name"].endswith(".reply.celery.pidbox"))
        assert queue_shape(reply_queues[0]) == queue_shape(fixture_reply)
        for wanted in topology["exchanges"]:
            found = exchanges[wanted["name"]]
            assert (found["type"], found["durable"], found["auto_delete"]) == (
                wanted["type"], wanted["durable"], wanted["auto_delete"],
            )  # fmt: skip

    run(scenario)


@pytest.mark.broker
def test_control_resumes_after_a_lost_connection(broker_url: str, unique: str) -> None:
    a = f"{unique}-a@ctl"

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        async with running(make_app(broker_url, unique), a) as worker:
            assert await client.control.aping(timeout=10, destination=[a])
            worker.runtime.broker.connection_lost()
            deadline = time.monotonic() + 30
            replies: list[dict[str, Any]] = []
            while not replies and time.monotonic() < deadline:
                replies = await client.control.aping(timeout=0.5, destination=[a])
            assert replies == [{a: {"ok": "pong"}}]
        await client.aclose()

    run(scenario)


@pytest.mark.broker
def test_second_worker_with_the_same_name_runs_without_control(
    broker_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = f"{unique}-a@ctl"

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        with caplog.at_level(logging.ERROR, logger="amqtask.control"):
            async with running(make_app(broker_url, unique), a), running(make_app(broker_url, unique), a):
                replies = await client.control.aping(timeout=0.5)
                assert [reply for reply in replies if a in reply] == [{a: {"ok": "pong"}}]
                assert await (await client.asend_task(f"{unique}.add", (1, 1))).aget(timeout=10) == 2
        await client.aclose()
        assert any("remote control is off" in r.getMessage() for r in caplog.records)

    run(scenario)


@pytest.mark.broker
def test_cli_inspect_and_control(broker_url: str, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = f"{unique}-a@ctl"
    module = f"ctlcli_{unique}"
    (tmp_path / f"{module}.py").write_text(
        f"from amqtask import App\napp = App('cli', broker={broker_url!r}, task_default_queue={unique!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()

    async def invoke(*args: str) -> Any:
        return await asyncio.to_thread(runner.invoke, main, [*args, "-A", module])

    async def scenario() -> None:
        async with running(make_app(broker_url, unique), a):
            ping = await invoke("inspect", "ping", "-d", a, "-t", "10")
            assert ping.exit_code == 0, ping.output
            assert ping.stdout == f"-> {a}: OK pong\n\n1 node online.\n"
            registered = await invoke("inspect", "registered", "-d", a, "-t", "10", "--json")
            assert json.loads(registered.stdout) == {a: [f"{unique}.add"]}
            stats = await invoke("inspect", "stats", "-d", a, "-t", "10")
            assert stats.exit_code == 0 and '"max-concurrency":' in stats.stdout
            active = await invoke("inspect", "active", "-d", a, "-t", "10")
            assert active.stdout.startswith(f"-> {a}: OK\n    - empty -")
            revoke = await invoke("control", "revoke", "id-1", "id-2", "-d", a, "-t", "10")
            assert revoke.stdout.startswith(f"-> {a}: OK tasks {{'id-1', 'id-2'}} flagged as revoked")
            nobody = await invoke("inspect", "ping", "-d", f"{unique}-nobody@ctl", "-t", "0.3")
            assert nobody.exit_code == 1
            assert "no worker replied within 0.3s" in nobody.stderr

    run(scenario)


# ---------------------------------------------------------------------------------------------- Celery


async def _communicate(*argv: str, cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _celery_module(tmp_path: Path, broker_url: str, unique: str) -> str:
    module = f"celeryctl_{unique}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from celery import Celery
        app = Celery("celeryctl", broker={broker_url!r})

        @app.task(name="{unique}.mul")
        def mul(x, y):
            return x * y
    """))  # fmt: skip
    return module


@pytest.mark.broker
@pytest.mark.interop
def test_celery_inspect_ping_reaches_an_amqtask_worker(broker_url: str, unique: str, tmp_path: Path) -> None:
    pytest.importorskip("celery")
    a = f"{unique}-a@ctl"
    module = _celery_module(tmp_path, broker_url, unique)

    async def scenario() -> None:
        async with running(make_app(broker_url, unique), a):
            code, out = await _communicate(
                sys.executable, "-m", "celery", "-A", module, "inspect", "ping", "-d", a, "-t", "10", "--json",
                cwd=tmp_path,
            )  # fmt: skip
        assert code == 0, out
        assert json.loads(out.strip().splitlines()[-1]) == {a: {"ok": "pong"}}

    run(scenario, timeout=90)


@pytest.mark.broker
@pytest.mark.interop
@pytest.mark.slow
def test_amqtask_client_controls_a_celery_worker(broker_url: str, unique: str, tmp_path: Path) -> None:
    """amqtask's client against a real Celery worker, which also syncs our revokes at startup (mingle)."""
    pytest.importorskip("celery")
    a, c = f"{unique}-a@ctl", f"{unique}-celery@ctl"
    module = _celery_module(tmp_path, broker_url, unique)

    async def scenario() -> None:
        client = make_app(broker_url, unique, "client")
        async with running(make_app(broker_url, unique), a):
            await client.control.arevoke("revoked-before-celery-started", destination=[a], reply=True, timeout=10)
            log_path = tmp_path / "celery-worker.log"
            with log_path.open("wb") as log:
                # Its own queue: amqtask declared the test queue with dead-letter arguments Celery lacks.
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "celery", "-A", module, "worker", "-n", c, "-P", "solo",
                    "-Q", f"{unique}-celery", "-l", "info", cwd=tmp_path, stdout=log, stderr=log,
                )  # fmt: skip
            try:
                # The worker needs a few seconds to start: ask until it answers (each ask waits 0.5 s).
                deadline = time.monotonic() + 60
                pong: list[dict[str, Any]] = []
                while not pong and time.monotonic() < deadline and proc.returncode is None:
                    pong = await client.control.aping(timeout=0.5, destination=[c])
                assert pong == [{c: {"ok": "pong"}}], log_path.read_text()
                inspect = client.control.inspect(timeout=10, destination=[c])
                assert await inspect.aregistered() == {c: [f"{unique}.mul"]}
                assert "revoked-before-celery-started" in (await inspect.arevoked())[c]
                assert {"pid", "total", "pool", "broker"} <= set((await inspect.astats())[c])
                assert await inspect.aactive() == {c: []}
                replies = await client.control.arevoke("by-amqtask", destination=[c], reply=True, timeout=10)
                assert replies == [{c: {"ok": "tasks {'by-amqtask'} flagged as revoked"}}]
            finally:
                if proc.returncode is None:
                    proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
        await client.aclose()

    run(scenario, timeout=120)
