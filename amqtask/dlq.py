"""Dead-letter queues: list, replay and purge ``<queue>.dlq``.

Two kinds of messages land in a dead-letter queue. Those a worker gave up on (the task failed after
its last retry, raised ``Reject``, or the message was unreadable or named an unknown task): the
worker copies them there with ``x-amqtask-*`` headers naming the reason, the exception, its
traceback, the worker and the time. And those the broker dead-lettered by itself through the
queue's ``x-dead-letter-*`` arguments (a quorum queue's delivery limit, a TTL): these carry
RabbitMQ's ``x-death`` headers instead. :class:`DeadLetter` reads both.

Listing does not take messages out. It holds them with ``basic.get`` without acking (a held
message is not handed out again, so each is seen once), then gives them all back with one
``basic.nack(multiple, requeue)``. Not by closing the channel: on RabbitMQ 4.3 a message returned by
a closed channel counts against a quorum queue's delivery limit (20 by default), and a dead-letter
queue with no dead-letter target of its own drops a message that used its limit up; a nack does not
count there. Classic queues put requeued messages back where they were.

Replay publishes a copy through the default exchange to the queue whose dead-letter queue it is in
(or to the queue the operator names), never to a queue named by the message's own headers, which
its sender wrote. The copy has ``retries`` reset to 0 and the dead-lettering headers (``x-amqtask-*``,
``x-death``, delivery counters) removed; replay waits for the broker's confirm, and only then acks
the dead-lettered message: a crash in between leaves a duplicate, never a loss. With
``signing_keys`` set, replay checks the message's original signature and signs the copy with the
first key; a message that does not verify (the reason it was dead-lettered, often) stays where it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from . import deadletter, signing, topology
from .deadletter import header_text
from .delays import strip_death_headers
from .errors import TopologyNotFoundError
from .producer import wire_of
from .protocol import WireMessage
from .topology import DLQ_SUFFIX

if TYPE_CHECKING:
    from .app import App

#: Prefix of the headers a worker adds when it dead-letters a message (see ``deadletter.py``).
HEADER_PREFIX = deadletter.PREFIX
#: Counters RabbitMQ adds to quorum queue deliveries; stale once the message is published again.
_DELIVERY_COUNTERS = ("x-delivery-count", "x-acquired-count")


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message, as ``amqtask dlq list`` shows it."""

    id: str | None
    task: str | None
    #: Why it was dead-lettered: the worker's reason (see ``deadletter.py``: ``failed``, ``rejected``,
    #: ``malformed``, ...) or the broker's (``delivery_limit``, ``expired``, ``rejected``, ``maxlen``).
    reason: str
    #: ``Type: message`` of the task's exception, or the worker's detail; empty for broker reasons.
    exception: str
    failed_at: str | None
    #: The queue it came from, as the worker that dead-lettered it wrote (a replay does not trust it).
    queue: str
    retries: int | None
    headers: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, dlq: str) -> DeadLetter:
        """Read a message taken from dead-letter queue ``dlq``."""
        headers = dict(message.headers or {})
        record = deadletter.read(headers)
        retries = headers.get("retries")
        return cls(
            id=header_text(headers.get("id")) or message.correlation_id,
            task=header_text(headers.get("task")),
            reason=record.reason,
            exception=record.exception,
            failed_at=record.failed_at,
            queue=record.queue or dlq.removesuffix(DLQ_SUFFIX),
            retries=retries if isinstance(retries, int) and not isinstance(retries, bool) else None,
            headers=headers,
        )


@dataclass(frozen=True)
class Listing:
    """A dead-letter queue's message count and its first messages."""

    queue: str
    count: int
    messages: list[DeadLetter]


@dataclass(frozen=True)
class Replayed:
    """The outcome of a replay: ids sent back, asked-for ids not found, and ids left because unverified."""

    replayed: list[str | None]
    missing: list[str]
    #: Messages that stay in the dead-letter queue: signing is on and their signature does not verify.
    refused: list[str | None] = field(default_factory=list)


def dlq_name(app: App, queue: str) -> str:
    """The dead-letter queue of task queue ``queue`` (a name already ending in ``.dlq`` is taken as is)."""
    return queue if queue.endswith(DLQ_SUFFIX) else app.router.queue(queue).dlq_name


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a replayed copy: no dead-lettering history, ``retries`` back at 0."""
    kept = {
        key: value
        for key, value in strip_death_headers(headers).items()
        if not key.startswith(HEADER_PREFIX) and key not in _DELIVERY_COUNTERS
    }
    kept["retries"] = 0
    return kept


async def inspect(app: App, queue: str, limit: int = 100) -> Listing:
    """Count the messages in ``queue``'s dead-letter queue and read the first ``limit`` of them."""
    name = dlq_name(app, queue)
    async with _browse(app, name) as browser:
        messages = [DeadLetter.from_message(m, name) async for m in browser.take(min(browser.count, limit))]
    return Listing(name, browser.count, messages)


async def replay(app: App, queue: str, ids: Collection[str] | None = None, *, to: str | None = None) -> Replayed:
    """Send dead-lettered messages back: those with ``ids``, or all when ``ids`` is None.

    They go to ``to`` when given, else to the queue whose dead-letter queue they are in. Only
    messages present when the replay starts are considered, so a message that fails again and
    comes back during a replay is not replayed twice.
    """
    name = dlq_name(app, queue)
    target = to or name.removesuffix(DLQ_SUFFIX)
    keys = app.conf.signing_keys
    wanted = None if ids is None else set(ids)
    replayed: list[str | None] = []
    refused: list[str | None] = []
    publisher = app.runtime().publisher
    async with _browse(app, name) as browser:
        async for message in browser.take(browser.count):
            entry = DeadLetter.from_message(message, name)
            if wanted is not None and entry.id not in wanted:
                continue
            wire = wire_of(message)
            if signing.problem(keys, wire, signing.Kind.TASK) is not None:
                refused.append(entry.id)
            else:
                copy = WireMessage(**{**wire.__dict__, "headers": replay_headers(wire.headers)})
                signing.seal(keys, copy, signing.Kind.TASK)
                await publisher.publish(copy, "", target)
                await browser.ack(message)
                replayed.append(entry.id)
            if wanted is not None:
                wanted.discard(entry.id or "")
                if not wanted:
                    break
    return Replayed(replayed, sorted(wanted or ()), refused)


async def purge(app: App, queue: str) -> int:
    """Delete every ready message of ``queue``'s dead-letter queue; returns how many were deleted."""
    name = dlq_name(app, queue)
    await _require(app, name)
    return await topology.purge_queue(app.runtime().broker, name)


async def _require(app: App, name: str) -> None:
    if not await topology.queue_exists(app.runtime().broker, name):
        base = name.removesuffix(DLQ_SUFFIX)
        raise TopologyNotFoundError(f"dead-letter queue {name!r} does not exist (is {base!r} a queue of this app?)")


class _Browser:
    """Takes messages from a queue without acking them, and gives back whatever it did not ack."""

    def __init__(self, queue: AbstractQueue, count: int) -> None:
        self.queue = queue
        #: Messages in the queue when browsing began.
        self.count = count
        self._held: list[AbstractIncomingMessage] = []

    async def take(self, limit: int) -> AsyncIterator[AbstractIncomingMessage]:
        """Up to ``limit`` messages, each held until :meth:`ack` or :meth:`give_back`."""
        for _ in range(limit):
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                return
            self._held.append(message)
            yield message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Remove a held message from the queue for good."""
        await message.ack()
        self._held.remove(message)

    async def give_back(self) -> None:
        """Requeue every held message with one nack of the newest (``multiple`` covers the older ones)."""
        if self._held:
            await self._held[-1].nack(multiple=True, requeue=True)
            self._held.clear()


@contextlib.asynccontextmanager
async def _browse(app: App, name: str) -> AsyncIterator[_Browser]:
    """A :class:`_Browser` on queue ``name``; what it still holds at exit goes back to the queue."""
    await _require(app, name)
    channel = await app.runtime().broker.channel(confirms=False)
    try:
        queue = await channel.declare_queue(name, passive=True)
        browser = _Browser(queue, int(queue.declaration_result.message_count or 0))
        try:
            yield browser
        finally:
            if not channel.is_closed:
                await browser.give_back()
    finally:
        await channel.close()


__all__ = ["DeadLetter", "Listing", "Replayed", "dlq_name", "inspect", "purge", "replay", "replay_headers"]
