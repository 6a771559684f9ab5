"""A queue another client declared with other arguments is used as it is (issue 16).

Every foreign shape a team migrating from Celery meets: Celery's priority queue (``x-max-priority``),
a plain classic queue where the app asked for more, a quorum queue with settings of its own, a queue
with a dead-letter exchange of its own. The worker consumes it, a failing task still ends in
``<queue>.dlq`` (amqtask's own dead-lettering), and exactly one WARNING names the differences and what
is lost. ``task_queues_strict=True`` refuses instead (tests/test_topology.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from support.queues import delete
from support.workers import get_raw, worker_thread

from amqtask import App, QueueSpec, adoption

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"adopt-{unique}", broker=broker_url, publish_timeout_s=10)
    yield application
    application.close()


async def _declare_foreign(url: str, name: str, arguments: dict[str, Any]) -> None:
    """Declare ``name`` as another client would, on a connection of its own."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments=arguments)


async def _delete_and_close(app: App, name: str) -> None:
    """Delete the queues on a loop of its own, and close that loop's connection before it ends."""
    try:
        await delete(app, [name])
    finally:
        await app.aclose()


SHAPES = {
    # Celery's priority queue; the app declares the queue plainly.
    "celery-priority": ({"x-max-priority": 10}, {}, "x-max-priority: wanted None, held 10", "nothing the app"),
    # A plain Celery queue; the app asked for priorities and broker-side dead-lettering.
    "plain": (
        {},
        {"max_priority": 5, "dead_letter": True},
        "x-dead-letter-exchange: wanted '', held None",
        "message priorities",
    ),
    # A quorum queue with a delivery limit of its own; the app asked for a classic queue.
    "quorum": (
        {"x-queue-type": "quorum", "x-delivery-limit": 7},
        {},
        "x-delivery-limit: wanted None, held 7; x-queue-type: wanted None, held 'quorum'",
        "nothing the app",
    ),
    # A dead-letter exchange of the queue's own.
    "own-dlx": (
        {"x-dead-letter-exchange": "elsewhere"},
        {"dead_letter": True},
        "x-dead-letter-exchange: wanted '', held 'elsewhere'",
        "broker-side dead-lettering",
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_worker_adopts_a_foreign_queue_runs_tasks_and_dead_letters_failures_itself(
    app: App, broker_url: str, unique: str, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    foreign, options, difference, lost = SHAPES[shape]
    name = f"{unique}-{shape}"
    app.conf.task_queues = {name: options}

    @app.task(name="adopt.add", queue=name)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="adopt.fail", queue=name)
    def fail() -> None:
        raise ValueError("adopted and failed")

    asyncio.run(_declare_foreign(broker_url, name, foreign))
    try:
        with (
            caplog.at_level(logging.WARNING, logger="amqtask.topology"),
            worker_thread(app, queues=[name], hostname=f"adopt-{unique}@localhost"),
        ):
            assert add.delay(2, 3).get(timeout=30) == 5
            failed = fail.delay()
            with pytest.raises(ValueError, match="adopted and failed"):
                failed.get(timeout=30)
            dead = asyncio.run(get_raw(broker_url, name + ".dlq"))
        assert dead.headers["id"] == failed.id
        assert dead.headers["x-amqtask-reason"] == "failed"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
        assert len(warnings) == 1, warnings  # the worker and the producer found it; one warning
        assert difference in warnings[0] and lost in warnings[0].split("Lost: ")[1]
        assert "task_queues_strict=True" in warnings[0]
    finally:
        asyncio.run(_delete_and_close(app, name))


def test_the_broker_arguments_are_learned_typed_and_declaring_them_changes_nothing(
    app: App, broker_url: str, unique: str
) -> None:
    name = f"{unique}-learn"
    held = {"x-max-priority": 9, "x-message-ttl": 60000, "x-dead-letter-exchange": "other", "x-max-length": 50}

    async def scenario() -> None:
        await _declare_foreign(broker_url, name, held)
        broker = app.runtime().broker
        try:
            found, complete = await adoption.held_arguments(broker, QueueSpec(name, dead_letter=True))
            assert complete
            # The routing key amqtask wanted is one the queue does not have: the broker names it too.
            assert found == held
            found_again = await adoption.adoption_of(broker, QueueSpec(name, max_priority=9))
            assert set(found_again.differences) == {"x-message-ttl", "x-dead-letter-exchange", "x-max-length"}
        finally:
            await delete(app, [name])
            await app.aclose()

    asyncio.run(scenario())


def test_a_producer_sends_to_an_adopted_queue(app: App, broker_url: str, unique: str) -> None:
    name = f"{unique}-send"
    app.conf.task_queues = {name: {"max_priority": 3}}

    async def scenario() -> None:
        await _declare_foreign(broker_url, name, {"x-max-priority": 10})
        try:
            await app.asend_task("adopt.any", queue=name, ignore_result=True, priority=8)
            message = await get_raw(broker_url, name)
            assert (message.headers["task"], message.priority) == ("adopt.any", 8)
        finally:
            await delete(app, [name])
            await app.aclose()

    asyncio.run(scenario())


def test_broker_values_are_read_in_every_spelling() -> None:
    spellings = {
        "none": None,
        "the value '5' of type 'byte'": 5,
        "the value '60000' of type 'signedint'": 60000,
        "the value 'quorum' of type 'longstr'": "quorum",
        "the value 'true' of type 'bool'": True,
        "'7'": 7,
        "'classic'": "classic",
    }
    assert {text: adoption._broker_value(text) for text in spellings} == spellings
