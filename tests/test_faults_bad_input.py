"""Bad input: a worker fed 10,000 hostile messages among real tasks (issue 7, fault test 4).

Hostile messages are published raw with aio-pika, interleaved with 1,000 real task messages, into
the queue one in-process worker consumes (``message_max_bytes`` set low, 64 KiB). Promised: the
worker never crashes or stalls (its consumer never had to start again and it keeps serving), every
real task completes, and every hostile message ends in ``<queue>.dlq`` with an ``x-amqtask-reason``
header. The decoder's own property tests (hypothesis) live in tests/test_serializers.py.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import msgpack
import pamqp.encode
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.broker import TestBroker
from support.faults import queue_counts, wait_until
from support.workers import running_worker, wait_for

from amqtask import App, AsyncResult, protocol, serializers
from amqtask.producer import header_table_size, to_amqp

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(120)]

HOSTILE = 10_000
REAL = 1_000
MAX_BYTES = 64 * 1024
SEED = 20261121
#: A hostile message's kind -> the reason the worker must give when it dead-letters it.
Kind = tuple[str, str]


_ids = itertools.count()


def _valid(task: str = "fuzz.real", args: list[Any] | None = None, codec: str = "msgpack") -> protocol.WireMessage:
    message = protocol.TaskMessage(task=task, id=f"fuzz-{next(_ids)}", args=args if args is not None else [1])
    return protocol.encode_task(message, serializers.codec(codec))


def _random_body(rng: random.Random, size: int) -> bytes:
    # Never a msgpack fixarray of 3 or a JSON array: random bytes must not happen to be a real task.
    body = bytes(rng.getrandbits(8) for _ in range(size))
    return body if body[:1] not in (b"\x93", b"[", b" ") else b"\xc1" + body


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


class Hostile:
    """Generators of hostile messages; each returns the wire message and the reason expected for it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def kinds(self) -> list[Callable[[], tuple[protocol.WireMessage, str]]]:
        return [
            self.random_msgpack, self.random_json, self.truncated_msgpack, self.truncated_json,
            self.wrong_header_type, self.missing_headers, self.unknown_task, self.bad_dates,
            self.too_deep, self.too_big, self.wrong_content_type, self.wrong_body_shape,
            self.bad_time_limit, self.wrong_arity, self.undecodable_task_name, self.bad_reply_to,
            self.huge_headers,
        ]  # fmt: skip

    def random_msgpack(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        wire.body = _random_body(self.rng, self.rng.randint(0, 300))
        return wire, "malformed"

    def random_json(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(codec="json")
        wire.body = _random_body(self.rng, self.rng.randint(0, 300))
        return wire, "malformed"

    def truncated_msgpack(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(args=["x" * self.rng.randint(1, 100), {"k": [1, 2, 3]}])
        wire.body = wire.body[: self.rng.randint(0, len(wire.body) - 1)]
        return wire, "malformed"

    def truncated_json(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(args=["x" * self.rng.randint(1, 100), {"k": [1, 2, 3]}], codec="json")
        wire.body = wire.body[: self.rng.randint(0, len(wire.body) - 1)]
        return wire, "malformed"

    def wrong_header_type(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        header, value = self.rng.choice([
            ("task", 123), ("task", ["fuzz.real"]), ("id", 7), ("id", {"a": 1}), ("retries", "3"),
            ("retries", 1.5), ("group_index", "x"), ("root_id", 5), ("parent_id", [1]), ("argsrepr", 1),
            ("origin", {"x": 1}), ("shadow", 2), ("replaced_task_nesting", "deep"), ("eta", 1700000000),
            ("expires", [2026]), ("group", 3.5),
        ])  # fmt: skip
        wire.headers[header] = value
        return wire, "malformed"

    def missing_headers(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        choice = self.rng.randrange(3)
        if choice == 0:
            wire.headers = {}
        else:
            del wire.headers["task" if choice == 1 else "id"]
        return wire, "malformed"

    def unknown_task(self) -> tuple[protocol.WireMessage, str]:
        return _valid(task=f"fuzz.nope.{self.rng.randrange(10**6)}"), "unknown-task"

    def bad_dates(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        value = self.rng.choice(["not a date", "2026-13-45T00:00:00", "", "tomorrow", "2026-02-30", "1e9", "Z"])
        wire.headers[self.rng.choice(["eta", "expires"])] = value
        return wire, "malformed"

    def too_deep(self) -> tuple[protocol.WireMessage, str]:
        codec = self.rng.choice(["msgpack", "json"])
        if self.rng.random() < 0.5:
            return _valid(args=[_nested(self.rng.randint(70, 500))], codec=codec), "malformed"
        # Deeper than Python's recursion limit, in few bytes: each level is one byte.
        wire = _valid(codec=codec)
        depth = self.rng.randint(2_000, 20_000)
        wire.body = b"\x91" * depth + b"\x01" if codec == "msgpack" else b"[" * depth + b"1" + b"]" * depth
        return wire, "malformed"

    def too_big(self) -> tuple[protocol.WireMessage, str]:
        return _valid(args=["x" * (MAX_BYTES + self.rng.randint(1, 4096))]), "malformed"

    def wrong_content_type(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        wire.content_type = self.rng.choice(
            ["application/x-python-serialize", "text/plain", None, "", "application/x-yaml", "application/data"]
        )
        return wire, "malformed"

    def wrong_body_shape(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        body = self.rng.choice([
            {"task": "fuzz.real", "id": "v1", "args": [1]}, [[1], {}], [[1], {}, {}, {}], "text", 42, None,
            [1, {}, {}], [[1], [], {}], [[1], {1: 2}, {}], [[1], {}, []], [[1], {}, {"callbacks": "x"}],
            [[1], {}, {"chord": [1]}], [[1], {}, {"chain": [1, 2]}],
        ])  # fmt: skip
        wire.body = msgpack.packb(body, use_bin_type=True, strict_types=False)
        return wire, "malformed"

    def bad_time_limit(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        wire.headers["timelimit"] = self.rng.choice([[1, 2, 3], ["a", None], [True, None], "10", 5, [None]])
        return wire, "malformed"

    def wrong_arity(self) -> tuple[protocol.WireMessage, str]:
        # A well-formed message for a real task with arguments it cannot take: the task fails.
        return _valid(args=self.rng.choice([[], [1, 2, 3], ["x", "y"]])), "failed"

    def undecodable_task_name(self) -> tuple[protocol.WireMessage, str]:
        # A byte-array header ('x' in AMQP tables; not UTF-8 either) where a string belongs.
        wire = _valid()
        wire.headers["task"] = bytearray(b"\xff\xfe\x00fuzz")
        return wire, "malformed"

    def bad_reply_to(self) -> tuple[protocol.WireMessage, str]:
        # An unreadable message whose caller asks for the error to be sent to nonsense addresses. (A bare
        # "amq.rabbitmq.reply-to" cannot be sent at all: the broker refuses it from a non-consumer.)
        wire = _valid()
        wire.body = b"\xc1"
        wire.reply_to = self.rng.choice(
            ["no-such-queue", "amq.rabbitmq.reply-to.bogus", "amq.rabbitmq.reply-to.g1h2AA==", " ", "x" * 255]
        )
        return wire, "malformed"

    def huge_headers(self) -> tuple[protocol.WireMessage, str]:
        # Headers of a few KiB, and one time in eight as close to RabbitMQ's frame limit (128 KiB) as a
        # publisher can send: the worker's dead-letter copy, which adds its reason, cannot keep them all.
        self.calls = getattr(self, "calls", 0) + 1
        wire = _valid()
        wire.body = b"\xc1"
        size = self.rng.randint(120_000, 130_400) if self.calls % 8 == 0 else self.rng.randint(1_000, 16_000)
        wire.headers["x-padding"] = "p" * size
        return wire, "malformed"


def _to_amqp(wire: protocol.WireMessage, tag: str) -> aio_pika.Message:
    wire.correlation_id = tag  # how each hostile message is found again in the DLQ
    return to_amqp(wire)


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    app = App(f"fuzz-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", message_max_bytes=MAX_BYTES)
    yield app
    app.close()


def test_hostile_messages_go_to_the_dlq_and_real_tasks_complete(
    app: App, rabbitmq: TestBroker, broker_url: str, broker_vhost: str, unique: str
) -> None:
    queue = f"q-{unique}"
    rng = random.Random(SEED)

    @app.task(name="fuzz.real")
    async def real(n: int) -> int:
        return n

    hostile = Hostile(rng)
    kinds = hostile.kinds()
    expected: dict[str, tuple[str, str]] = {}  # correlation id -> (kind, reason)
    batch: list[aio_pika.Message | int] = []
    for i in range(HOSTILE):
        make = kinds[i % len(kinds)]
        wire, reason = make()
        tag = f"hostile-{i}"
        expected[tag] = (make.__name__, reason)
        batch.append(_to_amqp(wire, tag))
    batch.extend(range(REAL))  # real tasks, built once the app's reply queue is known
    rng.shuffle(batch)

    async def scenario() -> tuple[list[AsyncResult[int]], dict[str, Any], int]:
        async with running_worker(app, concurrency=16) as worker:
            await app.runtime().results.ensure_started()
            results = await _publish(app, queue, batch)
            for n, result in results:
                assert await result.aget(timeout=60) == n
            await wait_until(lambda: worker.stats["dead_lettered"] >= HOSTILE, 60, "every hostile message handled")
            # Still serving after the flood: one more real task goes through.
            assert await (await real.adelay(-1)).aget(timeout=10) == -1
            return [r for _, r in results], dict(worker.stats), worker.consumer.resumptions

    logging.getLogger("amqtask.worker").setLevel(logging.CRITICAL)  # 10,000 dead-letter errors: expected
    try:
        results, stats, resumptions = asyncio.run(scenario())
    finally:
        logging.getLogger("amqtask.worker").setLevel(logging.NOTSET)
    assert len(results) == REAL
    assert resumptions == 1, "the consumer had to start again: a message broke its channel"
    dead, slimmed = asyncio.run(_read_dlq(broker_url, f"{queue}.dlq", HOSTILE))
    assert slimmed, "no dead-letter copy had to drop headers: the frame-limit case was not exercised"
    wrong = {tag: (expected.get(tag), got) for tag, got in dead.items() if expected.get(tag, ("", ""))[1] != got}
    assert not wrong, f"{len(wrong)} message(s) dead-lettered with another reason, e.g. {list(wrong.items())[:5]}"
    assert set(dead) == set(expected), f"missing from the DLQ: {sorted(set(expected) - set(dead))[:10]}"
    # The last acks may trail the last dead-letter copies by a moment.
    wait_for(lambda: _settled(rabbitmq, broker_vhost, queue), 20, f"{queue} and its DLQ empty, nothing unacked")
    by_reason = collections.Counter(dead.values())
    print(
        f"\nbad input: {HOSTILE} hostile + {REAL} real; DLQ by reason {dict(by_reason)} ({slimmed} copies "
        f"without the received headers, too large to keep); worker stats {stats}"
    )


def _settled(rabbitmq: TestBroker, vhost: str, queue: str) -> bool:
    counts = queue_counts(rabbitmq, vhost)
    return counts[queue] == (0, 0) and counts[f"{queue}.dlq"] == (0, 0)


async def _publish(app: App, queue: str, batch: list[aio_pika.Message | int]) -> list[tuple[int, AsyncResult[int]]]:
    """Publish the interleaved batch raw, confirmed, 500 at a time; real tasks get the app's reply queue."""
    results: list[tuple[int, AsyncResult[int]]] = []
    connection = await aio_pika.connect(app.conf.broker_url[0])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, passive=True)
        for start in range(0, len(batch), 500):
            sends = []
            for item in batch[start : start + 500]:
                if isinstance(item, int):
                    message, _, codec = app.build_message("fuzz.real", [item], {}, None, {})
                    results.append((item, AsyncResult(message.id, app)))
                    item = to_amqp(protocol.encode_task(message, serializers.codec(codec)))
                sends.append(channel.default_exchange.publish(item, queue))
            await asyncio.gather(*sends)
    return results


async def _read_dlq(url: str, dlq: str, expected: int) -> tuple[dict[str, str], int]:
    """Every dead-lettered message's correlation id -> its ``x-amqtask-reason`` (taken off the queue), and
    how many copies had to leave the received headers out (too large to copy with the reason)."""
    found: dict[str, str] = {}
    slimmed = 0
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(dlq, passive=True)
        async with queue.iterator(no_ack=True) as messages:
            while len(found) < expected:
                message = await asyncio.wait_for(messages.__anext__(), 30)
                headers = message.headers or {}
                reason = headers.get("x-amqtask-reason")
                found[str(message.correlation_id)] = reason.decode() if isinstance(reason, bytes) else str(reason)
                slimmed += "x-amqtask-headers-dropped" in headers
    return found, slimmed


def test_the_hostile_generators_cover_the_issue_list() -> None:
    """Each kind the issue names has a generator, and each generator makes what it claims."""
    hostile = Hostile(random.Random(1))
    names = {kind.__name__ for kind in hostile.kinds()}
    for wanted in ("random_msgpack", "truncated_json", "wrong_header_type", "missing_headers", "unknown_task",
                   "bad_dates", "too_deep", "too_big", "wrong_content_type"):  # fmt: skip
        assert wanted in names
    accept = serializers.normalize_accept(["msgpack", "json"])
    limits = serializers.DecodeLimits(MAX_BYTES, 64)
    for kind in hostile.kinds():
        for _ in range(50):
            wire, reason = kind()
            if reason == "malformed":
                with pytest.raises((protocol.MessageError, protocol.SerializationError)):
                    protocol.decode_task(wire, accept, limits)
            else:
                assert protocol.decode_task(wire, accept, limits).task != ""
    assert json.dumps(_nested(3)) == "[[[1]]]"


_TABLE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, width=32) | st.text()
    | st.binary().map(bytearray),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@given(st.dictionaries(st.text(max_size=40), _TABLE_VALUES, max_size=10))
def test_the_header_size_bound_is_never_below_the_encoded_size(headers: dict[str, Any]) -> None:
    """The publisher's frame check must never let through headers whose real encoding is larger."""
    assert header_table_size(headers) >= len(pamqp.encode.field_table(headers))
