"""Reading the event stream (``amqtask events``): a queue of our own on ``celeryev``, each event as a dict.

The queue is exclusive and auto-deleted, and drops events older than a few seconds, like Celery's event
receivers: a slow or vanished reader never makes the broker hoard events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from ..connection import CONNECTION_ERRORS, Broker, close_quietly
from .events import EXCHANGE

#: Celery's ``event_queue_ttl`` and ``event_queue_expires`` (seconds).
QUEUE_TTL_S = 5.0
QUEUE_EXPIRES_S = 60.0
#: Fields shown by :func:`describe`, after time, host, type and task id, when an event has them.
DETAIL_FIELDS = ("name", "args", "kwargs", "result", "runtime", "exception", "retries", "requeue", "expired",
                 "active", "processed")  # fmt: skip


async def stream(
    broker: Broker, routing_key: str = "#", ready: Callable[[], None] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Events as they arrive (``task.multi`` batches unpacked), until the caller stops iterating.

    ``ready`` is called once the queue is bound: events sent from then on are seen. A lost connection
    is ridden out: once the broker is back (within ``publish_timeout_s``, else
    :class:`~amqtask.errors.BrokerConnectionError`), a new queue is bound and the stream goes on; events
    sent while no queue was bound are gone, as for any event reader.
    """
    while True:
        # A new inbox per channel: a late close callback of the last channel cannot end the next one.
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the channel closed
        try:
            channel = await _subscribe(broker, routing_key, inbox)
        except CONNECTION_ERRORS:
            continue  # lost again while binding: the next channel waits for the next connection
        try:
            if ready is not None:
                ready()
                ready = None
            while (body := await inbox.get()) is not None:
                for event in _events(body):
                    yield event
        finally:
            await close_quietly(channel)


async def _subscribe(broker: Broker, routing_key: str, inbox: asyncio.Queue[bytes | None]) -> AbstractChannel:
    """A channel consuming a new queue bound to ``celeryev``, putting bodies in ``inbox`` and None when it closes.

    Consumed with a callback rather than aio-pika's queue iterator: the iterator of a channel whose
    connection was lost waits forever instead of ending.
    """

    async def deliver(message: AbstractIncomingMessage) -> None:
        inbox.put_nowait(message.body)

    channel = await broker.channel(confirms=False)
    channel.close_callbacks.add(lambda *_: inbox.put_nowait(None))
    try:
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            f"amqtask.events.{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True,
            arguments={"x-message-ttl": int(QUEUE_TTL_S * 1000), "x-expires": int(QUEUE_EXPIRES_S * 1000)},
        )  # fmt: skip
        await queue.bind(exchange, routing_key)
        await queue.consume(deliver, no_ack=True)
    except BaseException:
        await close_quietly(channel)
        raise
    return channel


def _events(body: bytes) -> list[dict[str, Any]]:
    try:
        decoded = json.loads(body)
    except ValueError:
        return []  # not an event; someone else publishes on celeryev
    items = decoded if isinstance(decoded, list) else [decoded]
    return [item for item in items if isinstance(item, dict) and isinstance(item.get("type"), str)]


def describe(event: dict[str, Any]) -> str:
    """One line for a person: ``22:01:05.123 worker@host task-succeeded <id> name=... runtime=...``."""
    stamp = event.get("timestamp")
    when = dt.datetime.fromtimestamp(stamp).strftime("%H:%M:%S.%f")[:-3] if isinstance(stamp, int | float) else "-"
    parts = [when, str(event.get("hostname", "-")), event["type"]]
    if "uuid" in event:
        parts.append(str(event["uuid"]))
    parts += [f"{name}={event[name]}" for name in DETAIL_FIELDS if event.get(name) not in (None, "")]
    return " ".join(parts)


async def print_events(
    broker: Broker, emit: Callable[[str], None], *, as_json: bool, count: int | None, ready: Callable[[], None]
) -> None:
    """Print events with ``emit`` (one line each) until ``count`` were printed, or forever."""
    printed = 0
    async for event in stream(broker, ready=ready):
        emit(json.dumps(event, sort_keys=True) if as_json else describe(event))
        printed += 1
        if count is not None and printed >= count:
            return
