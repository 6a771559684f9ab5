"""Results any process reads by id (``result_backend="amqp"``): one RabbitMQ stream, followed by each reader.

Why a stream (the measurements are in ``benchmarks/results_store.py`` and ``docs/results.md``): Celery's old
``amqp`` backend kept one queue per task. That costs the broker a queue process and metadata entry per
outstanding result (tens of KiB each, and on 4.x a Khepri write per create and expiry), a queue lives on one
node (so a node loss hides its results; a quorum queue per task is far too costly), and a message read
without being consumed is invisible to other readers while it is held, so two readers race. A stream is
one replicated log: appending a result is one publish, reading never consumes, any number of readers see
every record, and a node loss leaves the replicas readable.

The layout: every state report of an ``amqp`` task (STARTED, PROGRESS, RETRY, SUCCESS, FAILURE, REVOKED) is
appended, as the same message the sender gets on its reply queue (one publish reaches both), with
``x-amqtask-expires`` (epoch ms) saying until when it counts. A client's send appends a SENT record of the
ids it hands out (one record for the sends of one loop turn), so a reader tells a queued task from an id
nobody sent. ``forget()`` appends a tombstone; a saved group is a record of its members' ids. The stream
keeps ``result_expires_s`` of records (``x-max-age``) and at most ``result_stream_max_bytes``.

A process that reads by id follows the stream into the process's bounded
:class:`~amqtask.results.rpc.ResultStore` (on each event loop that reads, as the reply queue is consumed),
so reads are memory lookups, a reader waiting for a result is woken by the record's arrival, and no one
polls the broker. It starts ``result_stream_lookback_s`` back; the older records are read once, in the
background, by a second consumer. Before its first answer a reader appends a marker record and waits until
it sees it: everything written before is then in its store (the window's, or with the history all), so
PENDING means "not known", not "not read yet".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .. import protocol, signing, topology
from ..connection import SETTLE_ERRORS, Broker
from ..errors import AmqtaskError, MessageError, TimeoutError
from ..producer import wire_of
from ..protocol import ResultMessage, WireMessage
from ..serializers import JSON
from ..settings import Settings
from .rpc import ResultConsumer, ResultStore, expiry_header, remaining_s

if TYPE_CHECKING:
    from ..producer import Publisher

log = logging.getLogger("amqtask.result")

KIND_HEADER = "x-amqtask-record"
#: Record kinds besides a worker's state report (a sent task's PENDING record is read as one).
FORGET, GROUP, MARKER, SENT = "forget", "group", "marker", "sent"
#: Saved groups live in the store beside task results under this prefix (a group id is a task-id-like uuid).
GROUP_KEY = "group:"
_SEGMENT_PARTS = 16
ACK_EVERY = 200  # below the consumer's prefetch (1000)
SENT_BATCH = 500  # ids in one SENT record at most (~20 KiB)
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


async def append(publisher: Publisher, settings: Settings, wire: WireMessage, *, copy_to: str | None = None) -> None:
    """Append one record to the result stream, confirmed (the stream is declared once per connection).

    ``copy_to``: a queue (the caller's reply queue) that gets the same message from the same publish. The
    broker routes it to both by the ``BCC`` header, which it removes before storing, and confirms it once
    both queues have it: half the publishes and confirms of two sends, and the same guarantee when it
    returns. A caller's reply queue that expired is nobody to tell, as with ``rpc``. The publish is
    mandatory, but the broker returns it only when no queue took it: a stream deleted while this connection
    lives (it is declared again after each reconnect) would leave a record that found its reply queue with
    the caller only.
    """
    generation = publisher.broker.generation
    if _declared.get(publisher) != generation or not generation:
        await declare_stream(publisher.broker, settings)
        _declared[publisher] = generation
    # Added after signing, and removed by the broker before anyone reads the message.
    record = WireMessage(**{**wire.__dict__, "headers": {**wire.headers, "BCC": [copy_to]}}) if copy_to else wire
    await publisher.publish(record, "", settings.result_stream)


async def append_record(
    publisher: Publisher, settings: Settings, report: ResultMessage, kind: str, *, expires_s: float | None = None
) -> None:
    """Append a record that is not a worker's state report: a sent task, a tombstone, a saved group, a marker."""
    wire = protocol.encode_result(report, JSON, persistent=kind != MARKER)
    expiry = expiry_header(settings.result_expires_s if expires_s is None else expires_s)
    wire.headers.update({KIND_HEADER: kind, **expiry})
    signing.seal(settings.signing_keys, wire, signing.Kind.RESULT)  # after: the kind and expiry are signed too
    await append(publisher, settings, wire)


@dataclass
class _SentBatch:
    """Ids announced on one publisher, with one lifetime, in one turn of its event loop: one record for all."""

    expires_s: float
    ids: list[str] = field(default_factory=list)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


_batches: weakref.WeakKeyDictionary[Publisher, dict[float, _SentBatch]] = weakref.WeakKeyDictionary()


async def announce(publisher: Publisher, settings: Settings, ids: list[str], expires_s: float) -> None:
    """Append a SENT record for ``ids``, confirmed; sends of one loop turn share one record (and its confirm).

    Many clients send concurrently (a web server, a canvas, a loop of ``adelay``): one record per send
    would double the publishes of sending. A single send waits no longer: the batch goes out at once.
    """
    open_batches = _batches.setdefault(publisher, {})
    batch = open_batches.get(expires_s)
    if batch is None or len(batch.ids) >= SENT_BATCH:
        batch = open_batches[expires_s] = _SentBatch(expires_s)
        _spawn(_flush(publisher, settings, batch))  # runs after this turn's other sends joined the batch
    batch.ids.extend(ids)
    await asyncio.shield(batch.done)  # one caller cancelled must not cancel the others' wait


async def _flush(publisher: Publisher, settings: Settings, batch: _SentBatch) -> None:
    open_batches = _batches.get(publisher, {})
    if open_batches.get(batch.expires_s) is batch:
        del open_batches[batch.expires_s]
    record = ResultMessage(batch.ids[0], protocol.PENDING, children=batch.ids)
    try:
        await append_record(publisher, settings, record, SENT, expires_s=batch.expires_s)
    except Exception as exc:  # handed to every sender waiting on the batch
        batch.done.set_exception(exc)
        batch.done.exception()  # marked retrieved: the senders report it, not the loop
    else:
        batch.done.set_result(None)
    finally:
        if not batch.done.done():  # the loop is shutting down
            batch.done.cancel()


def _spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _running.add(task)  # kept from the garbage collector until done
    task.add_done_callback(_running.discard)


class _Follower(ResultConsumer):
    """Consumes the result stream from an offset on, across reconnects, returning credit in batches."""

    def __init__(self, broker: Broker, settings: Settings, store: ResultStore, start: int | str | dt.datetime) -> None:
        super().__init__(broker, settings, settings.result_stream, store)
        self._next_offset = start
        self._unacked = 0

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
            urgent = self._take(message, headers, offset if isinstance(offset, int) else None)
        except (MessageError, AmqtaskError) as exc:
            log.error("skipping an unreadable result record (correlation_id=%s): %s", message.correlation_id, exc)
            urgent = False
        self._unacked += 1
        if self._unacked >= ACK_EVERY or urgent:
            # A stream consumer's acks only return credit: one for many saves a frame per record (a third of
            # the time a catch-up took), and ACK_EVERY below the prefetch never stalls the flow.
            self._unacked = 0
            with contextlib.suppress(*SETTLE_ERRORS):
                await message.ack(multiple=True)

    def _take(self, message: AbstractIncomingMessage, headers: dict[str, Any], offset: int | None) -> bool:
        """Handle one record; True when credit should go back now (a wait ends on it)."""
        raise NotImplementedError

    def _read(self, message: AbstractIncomingMessage, headers: dict[str, Any]) -> list[ResultMessage]:
        """The reports a record holds, each under its store key (raises MessageError if unverified)."""
        report = self._decode(wire_of(message))
        kind = headers.get(KIND_HEADER)
        if kind == GROUP:
            report.task_id = GROUP_KEY + report.task_id
        elif kind == SENT:
            ids = report.children or [report.task_id]
            return [ResultMessage(task_id, protocol.PENDING) for task_id in ids if isinstance(task_id, str)]
        return [report]

    def _apply(self, kind: Any, report: ResultMessage, size: int, ttl_s: float | None) -> None:
        if ttl_s is not None and ttl_s <= 0:
            return
        if kind == FORGET:
            self.store.forget(report.task_id)
        else:
            self.store.put(report, size, ttl_s)


class StreamReader(_Follower):
    """Follows the result stream on one event loop and feeds the process's result store.

    It starts ``result_stream_lookback_s`` back (a stream offset can be a time), so a process's first read
    of a recent task costs the records of that window, not the whole retention. The records before the
    window are read by a second consumer (:class:`_History`) in the background, up to the first record
    this one read: a read that finds nothing in the window waits for it, ``get()`` only for its record.
    """

    def __init__(self, broker: Broker, publisher: Publisher, settings: Settings, store: ResultStore) -> None:
        super().__init__(broker, settings, store, "first")
        self.publisher = publisher
        self._started = False
        self._caught_up = asyncio.Event()
        self._marker: str | None = None
        self._history = _History(self)
        self._fresh: set[str] = set()  # keys read here while the history is still being read

    async def follow(self, timeout: float | None = None, *, history: bool = False) -> None:
        """Follow the stream (from now on, across reconnects) and return once every record of the window
        (``history``: every record) written before is read."""
        if not self._started:
            lookback = dt.timedelta(seconds=self.settings.result_stream_lookback_s)
            self._next_offset = dt.datetime.now(dt.timezone.utc) - lookback
            self._started = True
        await self.ensure_started(timeout)
        if not self._caught_up.is_set():
            if self._marker is None:
                self._marker = uuid.uuid4().hex
                marker = ResultMessage(self._marker, protocol.PENDING)
                await append_record(self.publisher, self.settings, marker, MARKER)
            await _within(self._caught_up, timeout, self.queue_name)
        if history:
            await _within(self._history.done, timeout, self.queue_name)

    async def lookup(self, key: str, timeout: float | None = None) -> ResultMessage | None:
        """The latest record for ``key``: from the window when there is one, else after reading the history."""
        await self.follow(timeout)
        found = self.store.get(key)
        if found is None:
            await self.follow(timeout, history=True)
            found = self.store.get(key)
        return found

    def _take(self, message: AbstractIncomingMessage, headers: dict[str, Any], offset: int | None) -> bool:
        if offset is not None and self._history.end is None:
            self._history.end = offset
        kind = headers.get(KIND_HEADER)
        if kind == MARKER:
            if message.correlation_id == self._marker:
                self._caught_up.set()
                self._history.begin()  # only now: the window's reads do not wait behind the history's
            return True
        reports, ttl_s = self._read(message, headers), remaining_s(headers)
        for report in reports:
            if not self._history.done.is_set():
                self._fresh.add(report.task_id)
            self._apply(kind, report, len(message.body) // len(reports), ttl_s)
        return False

    async def close(self) -> None:
        await self._history.close()
        await super().close()


class _History(_Follower):
    """Reads the records before the live reader's first one, once; never over a record the live one read."""

    def __init__(self, live: StreamReader) -> None:
        super().__init__(live.broker, live.settings, live.store, "first")
        self.live = live
        self.done = asyncio.Event()
        #: The live reader's first offset: where the history ends.
        self.end: int | None = None

    def begin(self) -> None:
        """Start reading, from the stream's first record up to (not including) :attr:`end`."""
        if self.end is None or self.done.is_set() or self._wanted:
            return
        if self.end == 0:
            self._finish()
            return
        self._wanted = True
        _spawn(self._start_reading())

    async def _start_reading(self) -> None:
        try:
            await self.ensure_started(None)
        except AmqtaskError as exc:
            log.error("cannot read the result stream's history: %s", exc)

    def _take(self, message: AbstractIncomingMessage, headers: dict[str, Any], offset: int | None) -> bool:
        if self.done.is_set():
            return False
        if offset is None or self.end is None or offset >= self.end:
            self._finish()
            return True
        kind = headers.get(KIND_HEADER)
        if kind == MARKER:
            return False
        reports, ttl_s = self._read(message, headers), remaining_s(headers)
        for report in reports:
            if report.task_id not in self.live._fresh:  # else the live reader has a later record for it
                self._apply(kind, report, len(message.body) // len(reports), ttl_s)
        return False

    def _finish(self) -> None:
        self.done.set()
        self.live._fresh.clear()
        self._wanted = False  # not resumed after a reconnect
        if self._channel is not None:
            _spawn(self.close())


_running: set[asyncio.Task[None]] = set()


async def _within(event: asyncio.Event, timeout: float | None, stream: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"could not read the result stream {stream} within {timeout}s") from None


__all__ = [
    "GROUP_KEY",
    "FORGET",
    "GROUP",
    "SENT",
    "StreamReader",
    "append",
    "announce",
    "append_record",
    "declare_stream",
    "stream_arguments",
]
