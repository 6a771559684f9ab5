"""Bad input: two worker processes fed 10,000 hostile messages among real tasks (issue 7 fault test 4, issue 11).

Hostile messages are published raw with aio-pika, interleaved with 1,000 real task messages, into
the queue two ``amqtask worker -A fault_tasks`` processes consume (``message_max_bytes`` 64 KiB and
``message_max_items`` 4,096, so bombs fit in small bodies), while a flood of hostile remote-control
requests (regex patterns that backtrack for minutes, huge patterns, garbage) reaches the same workers.
Promised: no worker restarts or stalls (both processes live and consume to the end, their consumers
never had to start again, and a real task sent after the flood completes within seconds), every real
task completes, every hostile message ends in ``<queue>.dlq`` with the ``x-amqtask-reason`` its kind
calls for, and each worker's peak RSS stays bounded. The decoder's own property tests (hypothesis)
live in tests/test_serializers.py.

Under signing (:func:`test_under_signing_unverified_messages_cause_nothing`) every message that does
not verify is dead-lettered (``rejected``) and causes nothing: no errback, callback or chord step
runs, no reply reaches the address it names, tampered copies of a signed message do not run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pamqp.encode
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.broker import TestBroker
from support.faults import (
    consumer_count,
    declare_sink,
    message_count,
    queue_counts,
    read_sink,
    wait_until,
    worker_processes,
)
from support.hostile import MAX_BYTES, MAX_ITEMS, REAL_TASK, Hostile, Unverified, control_flood
from support.workers import wait_for
from test_faults_decoder_memory import peak_rss_mib

from amqtask import App, AsyncResult, protocol, serializers
from amqtask.producer import header_table_size, to_amqp

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(300)]

HOSTILE = 10_000
REAL = 1_000
CONTROL = 1_000
#: Unverified messages (and a tenth as many real tasks) in the signing test.
UNVERIFIED = 1_000
CONCURRENCY = 8
SEED = 20261121
#: How long the flood may take to be handled (measured 96-108 s for 10,000 on a loaded 2-core machine).
SETTLE_S = 180
#: A real task sent after the flood must be done within this (it waits behind nothing).
AFTER_FLOOD_S = 5.0
#: Peak RSS a worker may reach: ~40 MiB of interpreter and libraries (38 measured), its prefetch (32
#: bodies of at most 64 KiB, a few copies each) and one decode at a time bounded by message_max_items
#: (4,096 values, well under 1 MiB). Far above, a message cost more than its bounded share.
RSS_BOUND_MIB = 80
#: Lines a worker logs (at warning) when its consumer had to start again or a delivery's handling escaped it.
TROUBLE = ("consumer interrupted", "cancelled the consumer", "delivery handling crashed")


def _env(queue: str, **extra: str) -> dict[str, str]:
    return {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "AMQTASK_MESSAGE_MAX_BYTES": str(MAX_BYTES),
            "AMQTASK_MESSAGE_MAX_ITEMS": str(MAX_ITEMS), **extra}  # fmt: skip


def _to_amqp(wire: protocol.WireMessage, tag: str) -> aio_pika.Message:
    if not wire.correlation_id:
        wire.correlation_id = tag  # how each hostile message is found again in the DLQ
    message = to_amqp(wire)
    message.message_id = tag
    return message


@pytest.fixture
def client(broker_url: str, unique: str) -> Iterator[App]:
    app = App(f"fuzz-{unique}", broker=broker_url, task_default_queue=f"q-{unique}")
    yield app
    app.close()


def _batch(hostile: list[Any], count: int) -> tuple[dict[str, str], list[aio_pika.Message | int]]:
    """``count`` hostile messages, the kinds in turn, and the reason each must be dead-lettered with, by tag."""
    expected: dict[str, str] = {}
    batch: list[aio_pika.Message | int] = []
    for i in range(count):
        make = hostile[i % len(hostile)]
        wire, reason = make()
        tag = f"hostile-{i}"
        expected[tag] = reason
        batch.append(_to_amqp(wire, tag))
    return expected, batch


def test_hostile_messages_go_to_the_dlq_and_real_tasks_complete(
    client: App, rabbitmq: TestBroker, broker_vhost: str, unique: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    control = control_flood(rng, CONTROL, regex=True)
    summary = _flood(client, rabbitmq, broker_vhost, unique, tmp_path, Hostile(rng).kinds(), HOSTILE, REAL, control)
    print(f"\nbad input: {summary}")


def _flood(
    client: App,
    rabbitmq: TestBroker,
    broker_vhost: str,
    unique: str,
    tmp_path: Path,
    kinds: list[Any],
    hostile: int,
    real: int,
    control: list[aio_pika.Message],
) -> str:
    """``hostile`` messages of ``kinds`` among ``real`` tasks into two worker processes, with ``control``
    requests at the same time; assert every promise of this module, and say what was seen."""
    url = client.conf.broker_url[0]
    queue = client.conf.task_default_queue
    rng = random.Random(SEED)
    expected, batch = _batch(kinds, hostile)
    batch.extend(range(real))  # real tasks, built once the client's reply queue is known
    rng.shuffle(batch)
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    # Node names of 40+ characters: a backtracking pattern run against them would take hours.
    names = [f"fuzz-{unique}-worker-{x}@a-rather-long-host.example" for x in "ab"]
    figures: dict[str, Any] = {}

    async def scenario() -> None:
        await wait_until(lambda: _consumers(url, queue, 2), 30, "both workers consuming")
        await client.runtime().results.ensure_started()
        started = time.monotonic()
        results, _ = await asyncio.gather(_publish(client, queue, batch), _publish_control(url, control))
        for n, result in results:
            assert await result.aget(timeout=SETTLE_S) == n
        await wait_until(lambda: _count(url, f"{queue}.dlq", hostile), SETTLE_S, "every hostile message handled")
        figures["flood handled in"] = f"{time.monotonic() - started:.1f}s"
        # No stall: a real task sent after the flood is done within seconds.
        sent = time.monotonic()
        assert await (await client.asend_task(REAL_TASK, (-1,))).aget(timeout=AFTER_FLOOD_S) == -1
        figures["real task after the flood"] = f"{time.monotonic() - sent:.2f}s"
        assert await consumer_count(url, queue) == 2
        await client.aclose()

    with worker_processes(url, logs, "-c", str(CONCURRENCY), env=_env(queue), names=names) as workers:
        asyncio.run(scenario())
        peaks = [peak_rss_mib(w.pid) for w in workers]
        assert all(w.poll() is None for w in workers), "a worker process exited during the flood"
    for path in logs:
        trouble = [line for line in path.read_text(errors="replace").splitlines() if any(t in line for t in TROUBLE)]
        assert not trouble, f"{path.name}: {trouble[:5]}"
    dead, slimmed = asyncio.run(_read_dlq(url, f"{queue}.dlq", hostile))
    _assert_reasons(dead, expected)
    if any(kind.__name__ == "huge_headers" for kind in kinds) and hostile >= 1000:
        assert slimmed, "no dead-letter copy had to drop headers: the frame-limit case was not exercised"
    wait_for(lambda: _settled(rabbitmq, broker_vhost, queue), 20, f"{queue} and its DLQ empty, nothing unacked")
    assert max(peaks) < RSS_BOUND_MIB, f"worker peak RSS {peaks} MiB"
    return (
        f"{hostile} hostile + {real} real + {len(control)} control requests, 2 workers; DLQ by reason "
        f"{dict(collections.Counter(dead.values()))} ({slimmed} copies without the received headers); "
        f"worker peak RSS {', '.join(f'{p:.0f}' for p in peaks)} MiB; "
        + ", ".join(f"{k} {v}" for k, v in figures.items())
    )


def test_under_signing_unverified_messages_cause_nothing(
    broker_url: str, rabbitmq: TestBroker, broker_vhost: str, unique: str, tmp_path: Path
) -> None:
    queue, sink, probe, key = f"q-{unique}", f"sink-{unique}", f"probe-{unique}", f"key-{unique}"
    client = App(f"fuzz-signed-{unique}", broker=broker_url, task_default_queue=queue, signing_keys=[key])
    rng = random.Random(SEED)
    expected, batch = _batch(Unverified(rng, key, queue, probe).kinds(), UNVERIFIED)
    batch.extend(range(UNVERIFIED // 10))
    rng.shuffle(batch)
    asyncio.run(declare_sink(broker_url, sink))
    asyncio.run(declare_sink(broker_url, probe))
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    env = _env(queue, AMQTASK_SIGNING_KEYS=key, FAULT_SINK_QUEUE=sink)

    async def scenario() -> None:
        await wait_until(lambda: _consumers(broker_url, queue, 2), 30, "both workers consuming")
        await client.runtime().results.ensure_started()
        results = await _publish(client, queue, batch)
        for n, result in results:
            assert await result.aget(timeout=60) == n
        await wait_until(lambda: _count(broker_url, f"{queue}.dlq", UNVERIFIED), 60, "every message handled")
        await client.aclose()

    try:
        with worker_processes(broker_url, logs, "-c", str(CONCURRENCY), env=env):
            asyncio.run(scenario())
        dead, _ = asyncio.run(_read_dlq(broker_url, f"{queue}.dlq", UNVERIFIED))
        _assert_reasons(dead, expected)
        # Nothing they named ran (follow-ups, tampered copies: all fault.record) and nobody was answered.
        runs = asyncio.run(read_sink(broker_url, sink))
        assert not runs.by_task, f"{len(runs.by_task)} task(s) ran because of unverified messages"
        assert asyncio.run(message_count(broker_url, probe)) == 0, "a reply reached an unverified message's reply_to"
        wait_for(lambda: _settled(rabbitmq, broker_vhost, queue), 20, f"{queue} and its DLQ empty, nothing unacked")
    finally:
        asyncio.run(_delete(broker_url, probe, sink))
        client.close()


def _assert_reasons(dead: dict[str, str], expected: dict[str, str]) -> None:
    """Every hostile message is in the DLQ, each with the reason its kind calls for."""
    wrong = {tag: (expected.get(tag), got) for tag, got in dead.items() if got != expected.get(tag)}
    assert not wrong, f"{len(wrong)} message(s) dead-lettered with another reason, e.g. {list(wrong.items())[:5]}"
    assert set(dead) == set(expected), f"missing from the DLQ: {sorted(set(expected) - set(dead))[:10]}"


async def _consumers(url: str, queue: str, count: int) -> bool:
    return await consumer_count(url, queue) == count


async def _count(url: str, queue: str, count: int) -> bool:
    return await message_count(url, queue) >= count


async def _delete(url: str, *queues: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)


def _settled(rabbitmq: TestBroker, vhost: str, queue: str) -> bool:
    counts = queue_counts(rabbitmq, vhost)
    return counts[queue] == (0, 0) and counts[f"{queue}.dlq"] == (0, 0)


async def _publish(app: App, queue: str, batch: list[aio_pika.Message | int]) -> list[tuple[int, AsyncResult[Any]]]:
    """Publish the interleaved batch raw, confirmed, 500 at a time; real tasks are built (and signed) by ``app``."""
    results: list[tuple[int, AsyncResult[Any]]] = []
    connection = await aio_pika.connect(app.conf.broker_url[0])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, passive=True)
        for start in range(0, len(batch), 500):
            sends = []
            for item in batch[start : start + 500]:
                if isinstance(item, int):
                    message, _, codec = app.build_message(REAL_TASK, [item], {}, None, {})
                    results.append((item, AsyncResult(message.id, app)))
                    wire = protocol.encode_task(message, serializers.codec(codec))
                    for middleware in app.middleware:
                        await middleware.before_publish(app, message, wire)  # signs, when signing is on
                    item = to_amqp(wire)
                sends.append(channel.default_exchange.publish(item, queue))
            await asyncio.gather(*sends)
    return results


async def _publish_control(url: str, requests: list[aio_pika.Message]) -> None:
    """Publish the control requests to the workers' fanout exchange, confirmed, 200 at a time."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("celery.pidbox", ensure=True)
        for start in range(0, len(requests), 200):
            await asyncio.gather(*(exchange.publish(r, "") for r in requests[start : start + 200]))


async def _read_dlq(url: str, dlq: str, expected: int) -> tuple[dict[str, str], int]:
    """Every dead-lettered message's tag -> its ``x-amqtask-reason`` (taken off the queue), and how many
    copies had to leave the received headers out (too large to copy with the reason)."""
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
                found[str(message.message_id)] = reason.decode() if isinstance(reason, bytes) else str(reason)
                slimmed += "x-amqtask-headers-dropped" in headers
    return found, slimmed


def test_the_hostile_generators_cover_the_issue_lists() -> None:
    """Each kind issues 7 and 11 name has a generator, and each generator makes what it claims."""
    hostile = Hostile(random.Random(1))
    names = {kind.__name__ for kind in hostile.kinds()}
    for wanted in ("random_msgpack", "truncated_json", "wrong_header_type", "missing_headers", "unknown_task",
                   "bad_dates", "too_deep", "too_big", "wrong_content_type", "msgpack_bomb", "json_bomb",
                   "far_future_eta", "huge_retries", "retry_with_huge_countdown"):  # fmt: skip
        assert wanted in names
    accept = serializers.normalize_accept(["msgpack", "json"])
    limits = serializers.DecodeLimits(MAX_BYTES, 64, MAX_ITEMS)
    for kind in hostile.kinds():
        for _ in range(50):
            wire, reason = kind()
            if reason == "malformed":
                with pytest.raises((protocol.MessageError, protocol.SerializationError)):
                    protocol.decode_task(wire, accept, limits)
            else:
                assert protocol.decode_task(wire, accept, limits).task != ""
    unverified = Unverified(random.Random(1), "k", "q", "probe")
    for kind in unverified.kinds():
        for _ in range(20):
            wire, reason = kind()
            assert reason == "rejected" and wire.headers.get("task", "").startswith("fault.")
    flood = control_flood(random.Random(1), 14, regex=True)
    assert all(json.dumps(request.headers["expires"]).isdigit() for request in flood)
    assert sum(b"pcre" in request.body for request in flood) >= 2


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
