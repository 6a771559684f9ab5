"""Results any process reads by id (``result_backend="amqp"``): one RabbitMQ stream, followed by each reader.

Why a stream (the measurements are in ``benchmarks/results_store.py`` and ``docs/results.md``): Celery's old
``amqp`` backend kept one queue per task. That costs the broker a queue process and metadata entry per
outstanding result (tens of KiB each, and on 4.x a Khepri write per create and expiry), a queue lives on one
node (so a node loss hides its results; a quorum queue per task is far too costly), and a message read
without being consumed is invisible to other readers while it is held, so two readers race. A stream is
one replicated log: appending a result is one publish, reading never consumes, any number of readers see
every record, and a node loss leaves the replicas readable.

The layout: every state report of an ``amqp`` task (STARTED, PROGRESS, RETRY, SUCCESS, FAILURE, REVOKED) is
appended, as the same message the sender gets on its reply queue, with ``x-amqtask-expires`` (epoch ms)
saying until when it counts. ``forget()`` appends a tombstone; a saved group is a record of its members'
ids. The stream keeps ``result_expires_s`` of records (``x-max-age``) and at most ``result_stream_max_bytes``.

A process that reads by id follows the stream from its start into the process's bounded
:class:`~amqtask.results.rpc.ResultStore` (on each event loop that reads, as the reply queue is consumed),
so reads are memory lookups, a reader waiting for a result is woken by the record's arrival, and no one
polls the broker. Before its first answer a reader appends a marker record and waits until it sees it:
everything written before is then in its store, so PENDING means "not known", not "not read yet".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .. import protocol, signing, topology
from ..connection import SETTLE_ERRORS, Broker
from ..errors import AmqtaskError, MessageError, TimeoutError
from ..protocol import ResultMessage, WireMessage
from ..serializers import JSON
from ..settings import Settings
from .rpc import ResultConsumer, ResultStore, expiry_header, remaining_s

if TYPE_CHECKING:
    from ..producer import Publisher

log = logging.getLogger("amqtask.result")

KIND_HEADER = "x-amqtask-record"
#: Record kinds besides a task's state report.
FORGET, GROUP, MARKER = "forget", "group", "marker"
#: Saved groups live in the store beside task results under this prefix (a group id is a task-id-like uuid).
GROUP_KEY = "group:"
_SEGMENT_PARTS = 16
ACK_EVERY = 200  # below the consumer's prefetch (1000)
_declared: weakref.WeakKeyDictionary[Publisher, int] = weakref.WeakKeyDictionary()


def stream_arguments(settings: Settings) -> dict[str, Any]:
    """How the result stream is declared: retention by age and by size, in segments small enough to let go."""
    max_bytes = settings.result_stream_max_bytes
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{settings.result_expires_s}s",
        "x-max-length-bytes": max_bytes,
        # Retention drops whole segments: 1/16 of the bound each keeps the disk used near the bound.
        "x-stream-max-segment-size-bytes": max(1024 * 1024, max_bytes // _SEGMENT_PARTS),
    }


async def declare_stream(broker: Broker, settings: Settings) -> None:
    """Declare the result stream (idempotent; other arguments than ours raise TopologyMismatchError)."""
    name, arguments = settings.result_stream, stream_arguments(settings)

    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True, arguments=arguments)

    try:
        await broker.run(declare)
    except aiormq.exceptions.AMQPChannelError as exc:
        raise topology.translate(exc, "queue", name, {"durable": True, **arguments}) from None


async def append(publisher: Publisher, settings: Settings, wire: WireMessage, headers: dict[str, Any]) -> None:
    """Append one record to the result stream, confirmed (the stream is declared once per connection)."""
    generation = publisher.broker.generation
    if _declared.get(publisher) != generation or not generation:
        await declare_stream(publisher.broker, settings)
        _declared[publisher] = generation
    record = WireMessage(**{**wire.__dict__, "headers": {**wire.headers, **headers}})
    await publisher.publish(record, "", settings.result_stream)


async def append_record(publisher: Publisher, settings: Settings, report: ResultMessage, kind: str) -> None:
    """Append a record that is not a task's state report: a tombstone, a saved group, a reader's marker."""
    wire = protocol.encode_result(report, JSON, persistent=kind != MARKER)
    wire.headers.update({KIND_HEADER: kind, **expiry_header(settings.result_expires_s)})
    signing.seal(settings.signing_keys, wire, signing.Kind.RESULT)  # after: the kind and expiry are signed too
    await append(publisher, settings, wire, {})


class StreamReader(ResultConsumer):
    """Follows the result stream on one event loop and feeds the process's result store."""

    def __init__(self, broker: Broker, publisher: Publisher, settings: Settings, store: ResultStore) -> None:
        super().__init__(broker, settings, settings.result_stream, store)
        self.publisher = publisher
        self._next_offset: int | str = "first"
        self._caught_up = asyncio.Event()
        self._marker: str | None = None
        self._unacked = 0

    async def follow(self, timeout: float | None = None) -> None:
        """Follow the stream (from now on, across reconnects) and return once every earlier record is read."""
        await self.ensure_started(timeout)
        if self._caught_up.is_set():
            return
        if self._marker is None:
            self._marker = uuid.uuid4().hex
            await append_record(self.publisher, self.settings, ResultMessage(self._marker, protocol.PENDING), MARKER)
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"could not read the result stream {self.queue_name} within {timeout}s") from None

    async def _declare(self, channel: AbstractChannel) -> AbstractQueue:
        await declare_stream(self.broker, self.settings)
        return await channel.declare_queue(self.queue_name, passive=True)

    def _consume_arguments(self) -> dict[str, Any] | None:
        # After a reconnect, on from the record after the last one read: nothing is read twice or missed.
        return {"x-stream-offset": self._next_offset}

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._next_offset = offset + 1
        try:
            self._record(message, headers)
        except (MessageError, AmqtaskError) as exc:
            log.error("skipping an unreadable result record (correlation_id=%s): %s", message.correlation_id, exc)
        self._unacked += 1
        if self._unacked >= ACK_EVERY or headers.get(KIND_HEADER) == MARKER:
            # A stream consumer's acks only return credit: one for many saves a frame per record (a third of
            # the time a catch-up took), and ACK_EVERY below the prefetch never stalls the flow.
            self._unacked = 0
            with contextlib.suppress(*SETTLE_ERRORS):
                await message.ack(multiple=True)

    def _record(self, message: AbstractIncomingMessage, headers: dict[str, Any]) -> None:
        kind = headers.get(KIND_HEADER)
        if kind == MARKER:
            if message.correlation_id == self._marker:
                self._caught_up.set()
            return
        ttl_s = remaining_s(headers)
        if ttl_s is not None and ttl_s <= 0:
            return
        wire = WireMessage(message.body, message.content_type, content_encoding=message.content_encoding,
                           headers=headers, correlation_id=message.correlation_id, reply_to=message.reply_to,
                           priority=message.priority)  # fmt: skip
        unverified = signing.problem(self.settings.signing_keys, wire, signing.Kind.RESULT)
        if unverified is not None:
            raise MessageError(unverified)
        report = protocol.decode_result(wire, self._accept, self._limits)
        if kind == FORGET:
            self.store.forget(report.task_id)
        elif kind == GROUP:
            report.task_id = GROUP_KEY + report.task_id
            self.store.put(report, len(message.body), ttl_s)
        else:
            self.store.put(report, len(message.body), ttl_s)


__all__ = [
    "GROUP_KEY",
    "FORGET",
    "GROUP",
    "StreamReader",
    "append",
    "append_record",
    "declare_stream",
    "stream_arguments",
]
