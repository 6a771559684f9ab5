"""Remote control cannot stall or steer a worker: no regexes from the wire, bounded intake, bounded replies.

Requests are published raw (as a hostile client on the vhost would) or through ``app.control``; each
test then checks what the worker still does (a task sent right after completes) and what the broker
saw (consumers, queues, exchanges).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import pytest
from support.broker import TestBroker
from support.workers import queue_depth, running_worker

from amqtask import App
from amqtask.remote import wire
from amqtask.remote.node import CONTROL_PREFETCH, _matches, glob_match


def run(scenario: Callable[[], Any], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def make_app(broker_url: str, queue: str) -> App:
    app = App("rsec", broker=broker_url, task_default_queue=queue)

    @app.task(name="rsec.add")
    async def add(x: int, y: int) -> int:
        return x + y

    return app


async def publish_requests(url: str, bodies: list[dict[str, Any]]) -> None:
    """Publish requests to every worker's mailbox, as any client on the vhost can."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.declare_exchange(wire.EXCHANGE, "fanout", durable=False)
        headers = {"clock": 1, "expires": math.ceil(time.time() + 60)}
        for body in bodies:
            message = aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                       content_encoding="utf-8", headers=headers)  # fmt: skip
            await exchange.publish(message, "")


# ---------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("w*@h", "w1@h", True),
        ("*", "", True),
        ("w?@h", "w12@h", False),
        ("*@*", "a@b", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXbY", False),
        ("[w]1@h", "w1@h", False),  # no character classes: "[" is literal
        ("*a*a*a*a*a*a*a*a*a*a*b", "a" * 250, False),
    ],
)
def test_glob_matching(pattern: str, name: str, expected: bool) -> None:
    assert glob_match(pattern, name) is expected


def test_pcre_and_oversized_patterns_address_nobody() -> None:
    assert not _matches("w1@h", {"pattern": "w1.*", "matcher": "pcre"})
    assert not _matches("w1@h", {"pattern": "*" * 257, "matcher": "glob"})
    assert _matches("w1@h", {"pattern": "*" * 256, "matcher": "glob"})


# ---------------------------------------------------------------------------------------------- a real worker


@pytest.mark.broker
def test_a_backtracking_pcre_request_does_not_stall_the_worker(broker_url: str, unique: str) -> None:
    """``(.+)+X`` against a 40-character hostname would backtrack for days on a regex engine."""
    queue, node = f"{unique}-q", f"{unique}-{'h' * 30}@x"
    app = make_app(broker_url, queue)

    async def scenario() -> None:
        async with running_worker(app, hostname=node):
            await publish_requests(broker_url, [{"method": "ping", "pattern": "(.+)+X", "matcher": "pcre",
                                                 "destination": None, "arguments": {}}])  # fmt: skip
            sent = time.monotonic()
            assert await (await app.asend_task("rsec.add", (1, 2))).aget(timeout=10) == 3
            assert time.monotonic() - sent < 10
            assert await app.control.aping(timeout=5, destination=[node]) == [{node: {"ok": "pong"}}]
        await app.aclose()

    run(scenario)


@pytest.mark.broker
def test_control_requests_are_acked_with_a_bounded_prefetch(
    rabbitmq: TestBroker, broker_url: str, broker_vhost: str, unique: str
) -> None:
    """A flood waits in the broker: the worker holds at most CONTROL_PREFETCH requests, tasks keep running."""
    queue, node = f"{unique}-q", f"{unique}@x"
    app = make_app(broker_url, queue)

    async def scenario() -> None:
        async with running_worker(app, hostname=node):
            listing = rabbitmq.ctl("list_consumers", "-p", broker_vhost, "--quiet", "--no-table-headers",
                                   "queue_name", "ack_required", "prefetch_count")  # fmt: skip
            [row] = [line.split() for line in listing.splitlines() if line.startswith(wire.worker_queue_name(node))]
            assert row[1:] == ["true", str(CONTROL_PREFETCH)]
            reply_to = {"exchange": wire.REPLY_EXCHANGE, "routing_key": f"{unique}-nobody"}
            flood = [{"method": "stats", "arguments": {}, "destination": None, "reply_to": reply_to, "ticket": "t"}]
            started = time.monotonic()
            await publish_requests(broker_url, flood * 500)
            sent = time.monotonic()
            assert await (await app.asend_task("rsec.add", (2, 2))).aget(timeout=20) == 4
            took = time.monotonic() - sent
            # Still answering once the flood is through: nothing wedged, nothing left behind.
            assert await app.control.aping(timeout=20, destination=[node]) == [{node: {"ok": "pong"}}]
        print(f"\nFLOOD: published in {sent - started:.2f}s; a task sent behind 500 requests took {took:.2f}s")
        await app.aclose()

    run(scenario, timeout=120)


@pytest.mark.broker
def test_reply_to_cannot_make_a_worker_declare_or_publish_elsewhere(broker_url: str, unique: str) -> None:
    queue, node = f"{unique}-q", f"{unique}@x"
    app = make_app(broker_url, queue)
    victim, evil_exchange = f"{unique}-victim", f"{unique}-evil"

    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            await (await connection.channel()).declare_queue(victim, durable=True)
            async with running_worker(app, hostname=node):
                targets = [{"exchange": "", "routing_key": victim}, {"exchange": evil_exchange, "routing_key": "k"},
                           {"exchange": wire.REPLY_EXCHANGE, "routing_key": "k" * 300}]  # fmt: skip
                requests = [{"method": "ping", "arguments": {}, "destination": [node], "reply_to": target,
                             "ticket": "t"} for target in targets]  # fmt: skip
                await publish_requests(broker_url, requests)
                # Requests are handled in order: once this one is answered, the others were refused.
                assert await app.control.aping(timeout=10, destination=[node]) == [{node: {"ok": "pong"}}]
            assert await queue_depth(broker_url, victim) == 0
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_exchange(evil_exchange, passive=True)
        await app.aclose()

    run(scenario)


@pytest.mark.broker
def test_inspect_active_truncates_arguments(broker_url: str, unique: str) -> None:
    queue, node = f"{unique}-q", f"{unique}@x"
    app = make_app(broker_url, queue)
    started, release = asyncio.Event(), asyncio.Event()

    @app.task(name="rsec.hold")
    async def hold(blob: str) -> int:
        started.set()
        await release.wait()
        return len(blob)

    async def scenario() -> None:
        async with running_worker(app, hostname=node):
            result = await app.asend_task("rsec.hold", ("x" * 100_000,), headers={}, task_id=str(uuid.uuid4()))
            await asyncio.wait_for(started.wait(), 10)
            inspect = app.control.inspect(timeout=10, destination=[node])
            for safe in (False, True):
                [info] = (await inspect.aactive(safe=safe))[node]
                assert isinstance(info["args"], str) and len(info["args"]) <= 1024
                assert info["args"].endswith("...")
            release.set()
            assert await result.aget(timeout=10) == 100_000
        await app.aclose()

    run(scenario)
