"""Signing (``signing_keys``): nothing unverified causes an action, and what is signed keeps working.

A worker verifies each delivery before anything else: tampered or unsigned messages go to the
dead-letter queue and cause nothing (no run, no follow-up, no reply). Retries, dead-letter replays,
results and remote control are signed and verified too. Each broker test checks broker state: what
ran, what reached which queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from support.broker import TestBroker
from support.queues import cleanup
from support.workers import get_raw, queue_depth, running_worker

from amqtask import App, AsyncResult, GroupResult, Reject, TimeoutError, deadletter, protocol, serializers, signing
from amqtask import dlq as dlq_module
from amqtask.chords import ChordKeeper, Outcome, Part, queue_name
from amqtask.producer import to_amqp, wire_of
from amqtask.protocol import TaskMessage, WireMessage
from amqtask.worker import triage

KEYS = ["new-key", "old-key"]


def run(scenario: Callable[[], Any], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def signed_wire(task: str, args: list[Any], keys: list[str] = KEYS, **fields: Any) -> WireMessage:
    """A task message as an amqtask producer with ``keys`` sends it."""
    wire = protocol.encode_task(TaskMessage(task=task, id=str(uuid.uuid4()), args=args, **fields), serializers.JSON)
    signing.seal(keys, wire, signing.Kind.TASK)
    return wire


async def publish_raw(url: str, queue: str, *wires: WireMessage) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for wire in wires:
            await channel.default_exchange.publish(to_amqp(wire), queue)


async def take_all(url: str, queue: str, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    return [await get_raw(url, queue) for _ in range(count)]


# ---------------------------------------------------------------------------------------------- pure logic


def test_canonical_encoding_is_unambiguous() -> None:
    pairs = [(["ab"], ["a", "b"]), ("1", 1), (None, ""), (True, 1), ({"a": "bc"}, {"ab": "c"}), (b"x", "x")]
    for left, right in pairs:
        assert signing.canonical(left) != signing.canonical(right), (left, right)


def test_float_headers_are_signed_as_amqp_carries_them() -> None:
    # pamqp sends a Python float as a 32-bit float: 0.1 arrives as 0.10000000149011612.
    assert signing.canonical(0.1) == signing.canonical(0.10000000149011612)


def _tampered_copies(wire: WireMessage) -> dict[str, WireMessage]:
    """One copy of ``wire`` per MAC-covered field, that field changed to another valid value."""
    body = serializers.encode([[1, 3], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                              serializers.JSON)  # fmt: skip
    props: dict[str, dict[str, Any]] = {
        "body": {"body": body},
        "content_type": {"content_type": "application/x-msgpack"},
        "content_encoding": {"content_encoding": "binary"},
        "reply_to": {"reply_to": "somewhere-else"},
        "correlation_id": {"correlation_id": str(uuid.uuid4())},
        "priority": {"priority": 9},
    }
    headers: dict[str, Any] = {
        "task": "sig.mul",
        "id": str(uuid.uuid4()),
        "eta": "2000-01-01T00:00:00+00:00",
        "expires": "2999-01-01T00:00:00+00:00",
        "retries": 7,
        "timelimit": [100, 50],
        "root_id": str(uuid.uuid4()),
        "parent_id": str(uuid.uuid4()),
        "group": str(uuid.uuid4()),
        "shadow": "renamed",
        "ignore_result": True,
        "tenant": "someone-else",  # any header a sender adds
        # amqtask's own x- headers that drive an action where they arrive
        "x-amqtask-requeues": 19,  # the worker dead-letters at task_requeue_limit
        "x-amqtask-record": "forget",  # a result reader deletes the result
        "x-amqtask-expires": 1,  # a result reader drops it as expired
        "x-amqtask-anything-new": "covered by default",
    }
    copies = {name: dataclasses.replace(wire, headers=dict(wire.headers), **change) for name, change in props.items()}
    for name, value in headers.items():
        copies[name] = dataclasses.replace(wire, headers={**wire.headers, name: value})
    return copies


def test_every_covered_field_changes_the_signature_and_transit_headers_do_not() -> None:
    wire = signed_wire("sig.add", [1, 2], reply_to="replies")
    assert signing.verify(KEYS, wire)
    for name, copy in _tampered_copies(wire).items():
        assert not signing.verify(KEYS, copy), name
    transit = {"x-death": [{"count": 1}], "x-first-death-reason": "expired", "x-delivery-count": 3,
               "x-acquired-count": 2, "x-stream-offset": 5, "x-user-note": "n", "amqtask-delay-queue": "q",
               **dict.fromkeys(deadletter.NOTES, "a note")}  # fmt: skip
    assert signing.verify(KEYS, dataclasses.replace(wire, headers={**wire.headers, **transit}))
    assert not signing.verify(KEYS, wire, signing.Kind.RESULT), "a task's signature is no use on a result"
    assert signing.verify(["old-key"], signed_wire("sig.add", [1], keys=["old-key"])) and signing.verify(
        KEYS, signed_wire("sig.add", [1], keys=["old-key"])
    ), "key rotation: the second key still verifies"


def test_answers_are_signed_with_the_key_the_caller_used() -> None:
    old = signed_wire("sig.add", [1], keys=["old-key"])
    assert signing.replying_keys(KEYS, old, signing.Kind.TASK) == ["old-key", "new-key"]
    assert signing.replying_keys(KEYS, signed_wire("sig.add", [1], keys=["forged"]), signing.Kind.TASK) == KEYS


# ---------------------------------------------------------------------------------------------- worker


def _signed_app(broker_url: str, queue: str, name: str = "sig", keys: list[str] | None = KEYS) -> App:
    return App(name, broker=broker_url, task_default_queue=queue, signing_keys=keys or [])


@pytest.mark.broker
def test_tampered_copies_of_each_covered_field_are_dead_lettered_and_cause_nothing(
    broker_url: str, unique: str
) -> None:
    queue, spy = f"{unique}-q", f"{unique}-spy"
    app = _signed_app(broker_url, queue)
    calls: list[tuple[str, Any]] = []
    done = asyncio.Event()

    @app.task(name="sig.add")
    async def add(x: int, y: int) -> int:
        calls.append(("add", (x, y)))
        done.set()
        return x + y

    @app.task(name="sig.mul")
    async def mul(x: int, y: int) -> int:
        calls.append(("mul", (x, y)))
        return x * y

    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(spy, durable=True)
        genuine = signed_wire("sig.add", [1, 2], reply_to=spy)
        copies = _tampered_copies(genuine)
        for name, copy in copies.items():
            copy.headers["x-case"] = name  # x- headers are not covered: this one does not break anything
            if name != "reply_to":
                copy.reply_to = spy
        async with running_worker(app):  # declares the queue and its dead-letter queue
            await publish_raw(broker_url, queue, *copies.values(), genuine)
            await asyncio.wait_for(done.wait(), 20)
            dead = await take_all(broker_url, f"{queue}.dlq", len(copies))
        assert sorted(m.headers["x-case"] for m in dead) == sorted(copies)
        for message in dead:
            assert message.headers["x-amqtask-reason"] == "rejected"
            assert "bad signature" in message.headers["x-amqtask-detail"]
        assert calls == [("add", (1, 2))]
        # The only reply is the genuine task's SUCCESS: none for the tampered ones, not even a failure.
        reply = await get_raw(broker_url, spy)
        assert reply.correlation_id == genuine.correlation_id
        assert await queue_depth(broker_url, spy) == 0
        await app.aclose()

    run(scenario)


@pytest.mark.broker
def test_unknown_task_with_follow_ups_under_signing_publishes_nothing_anywhere(
    rabbitmq: TestBroker, unique: str
) -> None:
    """The bypass of issue 11: an unknown task's errbacks were published, signed with the worker's key."""
    vhost = f"amqtask-test-{unique}"
    url = rabbitmq.add_vhost(vhost)
    queue, target = f"{unique}-q", f"{unique}-target"
    app = _signed_app(url, queue)
    ran: list[int] = []

    @app.task(name="sig.add")
    def add(x: int, y: int) -> int:
        ran.append(x)
        return x + y

    options = {"queue": target, "reply_to": target, "task_id": str(uuid.uuid4())}
    follow_up = {"task": "sig.add", "args": [100, 1], "kwargs": {}, "options": options, "immutable": True}
    embed = {"callbacks": [follow_up], "errbacks": [follow_up], "chain": [follow_up], "chord": None}
    body = serializers.encode([[1, 2], {}, embed], serializers.JSON)

    def hostile(keys: list[str]) -> WireMessage:
        wire = signed_wire("sig.nope", [1, 2], keys=keys, reply_to=target)
        wire.body = body
        if keys:
            signing.seal(keys, wire, signing.Kind.TASK)
        return wire

    async def scenario() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            await (await connection.channel()).declare_queue(target, durable=True)
        async with running_worker(app):
            await publish_raw(url, queue, hostile([]), hostile(["not-our-key"]))
            dead = await take_all(url, f"{queue}.dlq", 2)
        assert {m.headers["x-amqtask-reason"] for m in dead} == {"rejected"}
        await app.aclose()

    try:
        run(scenario)
        listing = rabbitmq.ctl("list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages")
        holding = {line.split()[0]: int(line.split()[1]) for line in listing.splitlines() if line.strip()}
        assert {name: count for name, count in holding.items() if count} == {}, "a message was published"
        assert ran == []
    finally:
        rabbitmq.delete_vhost(vhost)


@pytest.mark.broker
def test_retries_are_signed_again_by_the_worker_and_results_verified(broker_url: str, unique: str) -> None:
    queue = f"{unique}-q"
    app = _signed_app(broker_url, queue)

    @app.task(name="sig.flaky", bind=True, max_retries=2)
    def flaky(self: Any) -> int:
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return self.request.retries

    async def scenario() -> None:
        async with running_worker(app):
            # retries is covered: each retry verifies only because the worker signed it again.
            assert await (await app.asend_task("sig.flaky")).aget(timeout=20) == 2
        assert await queue_depth(broker_url, f"{queue}.dlq") == 0
        await app.aclose()

    run(scenario)


@pytest.mark.broker
def test_requeues_are_signed_again_and_bounded_and_a_forged_count_is_rejected(broker_url: str, unique: str) -> None:
    """The requeue count drives the worker (dead-letter at ``task_requeue_limit``), so it is signed: each
    requeue is signed again by the worker, and a count altered on the way fails verification."""
    queue = f"{unique}-q"
    app = _signed_app(broker_url, queue)
    app.conf.task_requeue_limit = 2
    runs: list[int] = []

    @app.task(name="sig.twice", bind=True)
    def twice(self: Any) -> int:
        runs.append(1)
        if len(runs) < 2:
            raise Reject("not yet", requeue=True)
        return len(runs)

    @app.task(name="sig.never")
    def never() -> None:
        raise Reject("never", requeue=True)

    async def scenario() -> None:
        forged = signed_wire("sig.twice", [])
        forged.headers[triage.REQUEUES_HEADER] = 1  # after signing, as a man in the middle would
        async with running_worker(app):
            assert await (await app.asend_task("sig.twice")).aget(timeout=20) == 2
            bounded = await app.asend_task("sig.never")
            await publish_raw(broker_url, queue, forged)
            dead = await take_all(broker_url, f"{queue}.dlq", 2)
        reasons = {message.correlation_id: message.headers["x-amqtask-reason"] for message in dead}
        assert reasons == {bounded.id: "requeue-limit", forged.correlation_id: "rejected"}
        bounded_copy = next(message for message in dead if message.correlation_id == bounded.id)
        assert bounded_copy.headers[triage.REQUEUES_HEADER] == 2 and signing.verify(KEYS, wire_of(bounded_copy))
        assert runs == [1, 1], "the forged copy did not run"
        await app.aclose()

    run(scenario)


@pytest.mark.broker
def test_a_result_record_whose_kind_is_altered_in_the_stream_is_ignored(broker_url: str, unique: str) -> None:
    """A signed result copied into the result stream as a ``forget`` (or a saved group) record deletes
    (or forges) nothing: a record's kind is signed."""
    queue, spy, stream = f"{unique}-q", f"{unique}-spy", f"{unique}-results"
    app = App("sig", broker=broker_url, task_default_queue=queue, signing_keys=KEYS, result_backend="amqp",
              result_stream=stream)  # fmt: skip

    @app.task(name="sig.add")
    def add(x: int, y: int) -> int:
        return x + y

    task = signed_wire("sig.add", [2, 2], reply_to=spy)

    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            await (await connection.channel()).declare_queue(spy, durable=True)
        async with running_worker(app):
            await publish_raw(broker_url, queue, task)
            # The worker sends the same signed report to the caller and to the stream: a reader of
            # either can copy it.
            genuine = wire_of(await get_raw(broker_url, spy, timeout=20))
        assert signing.verify(KEYS, genuine, signing.Kind.RESULT)
        copies = [dataclasses.replace(genuine, headers={**genuine.headers, "x-amqtask-record": kind})
                  for kind in ("forget", "group")]  # fmt: skip
        await publish_raw(broker_url, stream, *copies)
        await app.aclose()

    try:
        run(scenario)
        reader = App("reader", broker=broker_url, result_backend="amqp", result_stream=stream, signing_keys=KEYS)
        try:
            assert AsyncResult(task.correlation_id, app=reader).get(timeout=20) == 4
            assert GroupResult.restore(task.correlation_id, app=reader) is None
        finally:
            reader.close()
    finally:
        asyncio.run(cleanup(app, [stream]))
        app.close()


@pytest.mark.broker
def test_unsigned_or_forged_results_are_dropped_by_the_client(broker_url: str, unique: str) -> None:
    queue = f"{unique}-q"
    app = _signed_app(broker_url, queue)

    @app.task(name="sig.add")
    def add(x: int, y: int) -> int:
        return x + y

    async def scenario() -> None:
        result = await app.asend_task("sig.add", (2, 3))
        await app.runtime().results.ensure_started()
        for keys in ([], ["not-our-key"]):
            forged = protocol.encode_result(protocol.ResultMessage(result.id, protocol.SUCCESS, 666), serializers.JSON)
            signing.seal(keys, forged, signing.Kind.RESULT)
            await publish_raw(broker_url, app.reply_queue, forged)
        with pytest.raises(TimeoutError):
            await result.aget(timeout=1)
        async with running_worker(app):
            assert await result.aget(timeout=20) == 5
        await app.aclose()

    run(scenario)


@pytest.mark.broker
def test_replay_under_signing_runs_and_never_launders_or_follows_headers(broker_url: str, unique: str) -> None:
    queue, elsewhere = f"{unique}-q", f"{unique}-elsewhere"
    app = _signed_app(broker_url, queue)
    ran: list[int] = []
    healthy = asyncio.Event()
    broken = True

    @app.task(name="sig.charge")
    async def charge(order: int) -> int:
        if broken:
            raise RuntimeError("payment service down")
        ran.append(order)
        healthy.set()
        return order

    async def scenario() -> None:
        nonlocal broken
        connection = await aio_pika.connect(broker_url)
        async with connection:
            await (await connection.channel()).declare_queue(elsewhere, durable=True)
        async with running_worker(app):
            failed = await app.asend_task("sig.charge", (1,))
            with pytest.raises(RuntimeError):
                await failed.aget(timeout=20)
            # A signed message put straight into the dead-letter queue, naming another queue in its headers.
            redirected = signed_wire("sig.charge", [2])
            redirected.headers["x-amqtask-queue"] = elsewhere
            await publish_raw(broker_url, f"{queue}.dlq", redirected, signed_wire("sig.charge", [3], keys=["forged"]))
            broken = False
            outcome = await dlq_module.replay(app, queue)
            assert len(outcome.replayed) == 2 and len(outcome.refused) == 1
            while len(ran) < 2:
                healthy.clear()
                await asyncio.wait_for(healthy.wait(), 20)
        assert sorted(ran) == [1, 2]
        assert await queue_depth(broker_url, elsewhere) == 0
        assert await queue_depth(broker_url, f"{queue}.dlq") == 1, "the forged message stays dead-lettered"
        # The operator, and only the operator, names another target.
        await publish_raw(broker_url, f"{queue}.dlq", signed_wire("sig.charge", [4]))
        moved = await dlq_module.replay(app, queue, to=elsewhere)
        assert (len(moved.replayed), len(moved.refused)) == (1, 1)
        assert signing.verify(KEYS, wire_of(await get_raw(broker_url, elsewhere)))
        await app.aclose()

    run(scenario)


# ---------------------------------------------------------------------------------------------- remote control


@pytest.mark.broker
def test_signed_workers_ignore_unsigned_control_and_clients_drop_unsigned_replies(
    broker_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = f"{unique}-q"
    signed_node, plain_node = f"{unique}-signed@sig", f"{unique}-plain@sig"
    signed, plain = _signed_app(broker_url, queue), _signed_app(broker_url, queue, "plain", keys=None)

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="amqtask.control"):
            async with running_worker(signed, hostname=signed_node), running_worker(plain, hostname=plain_node):
                nodes = [signed_node, plain_node]
                assert await signed.control.aping(timeout=2, destination=nodes) == [{signed_node: {"ok": "pong"}}]
                assert await plain.control.aping(timeout=2, destination=nodes) == [{plain_node: {"ok": "pong"}}]
                assert await plain.control.aping(timeout=1, destination=[signed_node]) == []
                await plain.control.arevoke("some-id", destination=[signed_node], reply=True, timeout=1)
                assert await signed.control.inspect(timeout=2, destination=[signed_node]).arevoked() == {
                    signed_node: []
                }
        ignored = [r for r in caplog.records if "ignoring a control request" in r.getMessage()]
        assert len(ignored) == 1, "an unsigned request is logged once, not once per request"
        for app in (signed, plain):
            await app.aclose()

    run(scenario)


# ---------------------------------------------------------------------------------------------- chords


@pytest.mark.broker
def test_a_chord_ignores_parts_that_are_not_signed(broker_url: str, unique: str) -> None:
    """A forged outcome put into a chord's queue neither completes the chord nor reaches its body."""
    app = _signed_app(broker_url, f"{unique}-q")
    group_id = f"g-{unique}"
    finished: list[list[Part]] = []

    async def finish(parts: list[Part]) -> None:
        finished.append(parts)

    async def scenario() -> None:
        runtime, keeper = app.runtime(), ChordKeeper()
        await keeper.record(runtime, group_id, Part(0, "task-0", protocol.SUCCESS, 0))
        forged = WireMessage(serializers.encode(Part(1, "task-1", protocol.SUCCESS, 666).to_wire(), serializers.JSON),
                             "application/json", "utf-8", correlation_id="task-1")  # fmt: skip
        await publish_raw(broker_url, queue_name(group_id), forged)
        assert await keeper.complete(runtime, group_id, 2, finish) is not Outcome.COMPLETED
        assert finished == []
        await keeper.record(runtime, group_id, Part(1, "task-1", protocol.SUCCESS, 10))
        assert await keeper.complete(runtime, group_id, 2, finish) is Outcome.COMPLETED
        assert [[part.result for part in parts] for parts in finished] == [[0, 10]]
        await keeper.close()
        await app.aclose()

    run(scenario)
