"""Celery's event messages: what they hold, and the publisher that sends them to the ``celeryev`` exchange.

An event is a JSON object with ``type`` (``task-succeeded``, ``worker-heartbeat``...), ``hostname``,
``pid``, ``clock`` (a Lamport clock), ``timestamp`` (``time.time()``) and ``utcoffset`` (Celery's: hours
*west* of UTC, ``time.timezone / 3600``, so UTC+1 is ``-1.0``), plus fields of its type. It goes to the
topic exchange ``celeryev`` with the type as routing key (``task.succeeded``); like a Celery worker,
task events are sent in batches as a JSON list under ``task.multi``, which every Celery receiver (Flower,
``celery events``, celery-exporter) unpacks. ``tests/fixtures/celery_events/events.json`` holds the real
thing, captured from Celery 5.7.

Cheap by construction: a hook only appends a dict to a list (no await, nothing on the ack path); one
pump task per publisher sends them, a message per ``MAX_BATCH`` task events once that many gathered,
else ``FLUSH_S`` after the first, and the rest when the publisher closes (a stopping worker loses none),
transient and without confirms, on a channel of its own. Nobody listening costs nothing: the worker
declares no queue, so the broker drops events that no consumer has bound. When the broker is away,
events are dropped, not hoarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from ..connection import RECOVERABLE_ERRORS, Broker, close_quietly
from ..remote.wire import LamportClock

log = logging.getLogger("amqtask.events")

EXCHANGE = "celeryev"
#: Events a publisher keeps while it cannot send (then the oldest go): monitoring never hoards memory.
MAX_PENDING = 10_000
#: Task events per ``task.multi`` message (Celery sends up to 24; larger batches cost receivers nothing).
MAX_BATCH = 100
#: How long events gather before they are sent, unless a batch fills first: one publish per many tasks is
#: what keeps events cheap, and a tenth of a second is nothing to a dashboard.
FLUSH_S = 0.1
#: How long a closing publisher waits for its pump to finish the send under way.
CLOSE_WAIT_S = 5.0


#: Compact JSON: a third less encoding time and a tenth fewer bytes than ``json.dumps``' default, for ~1 KB
#: of events per task with ``-E`` (their encoding and publishing are most of what events cost a worker).
_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def utcoffset() -> float:
    """Celery's ``utcoffset`` field: the local zone's offset in hours, positive west of UTC."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


def routing_key(event_type: str) -> str:
    """``task-succeeded`` → ``task.succeeded``, as Celery routes events."""
    return event_type.replace("-", ".")


def _is_task_event(event: dict[str, Any]) -> bool:
    return str(event["type"]).startswith("task-")


class EventPublisher:
    """Sends the events of one process (a worker, or a producer with ``task_send_sent_event``)."""

    def __init__(self, broker: Broker, hostname: str) -> None:
        self.broker = broker
        self.hostname = hostname
        self.pid = os.getpid()
        self.clock = LamportClock()
        self._pending: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    def _event(self, event_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        """The event, made of ``fields`` (a caller's fresh keyword dict: filled in, not copied, which halves
        this cost; receivers do not care about the order of keys)."""
        fields["hostname"] = self.hostname
        fields["utcoffset"] = 0.0  # filled in when the batch is sent: one clock-zone lookup per batch
        fields["pid"] = self.pid
        fields["clock"] = self.clock.forward()
        fields["timestamp"] = time.time()
        fields["type"] = event_type
        return fields

    async def send_now(self, event_type: str, **fields: Any) -> None:
        """Publish one event at once, without a confirm (a producer's ``task-sent``: a script may exit right
        after its last send, before any batch would leave)."""
        event = self._event(event_type, fields)
        event["utcoffset"] = utcoffset()
        await self._publish(event)

    def send(self, event_type: str, **fields: Any) -> None:
        """Queue an event for the pump; returns at once."""
        self._pending.append(self._event(event_type, fields))
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run(), name=f"amqtask-events-{self.hostname}")
        self._wake.set()
        if len(self._pending) >= MAX_BATCH:
            self._full.set()

    async def close(self) -> None:
        """Send what is queued, stop the pump, close the channel.

        The pump is asked to finish rather than cancelled: cancelled in the middle of a send, it would
        leave the broker wondering whether that batch arrived.
        """
        if self._pump is not None:
            self._closing = True
            self._wake.set()
            self._full.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, CLOSE_WAIT_S)  # cancels it if the broker does not answer
            self._pump = None
        await self._send_pending()
        if self._channel is not None:
            await close_quietly(self._channel)
            self._channel = None

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            try:
                await asyncio.wait_for(self._full.wait(), FLUSH_S)
            except asyncio.TimeoutError:
                whole_batches = False
            else:
                whole_batches = True
            self._wake.clear()
            self._full.clear()
            await self._send_pending(whole_batches)
            if self._pending:
                self._wake.set()  # what was left gathers for the next turn

    async def _send_pending(self, whole_batches: bool = False) -> None:
        """Send what is queued now, task events as lists under ``task.multi`` (as Celery's workers batch them),
        others one by one, in the order they were queued; with ``whole_batches``, no last partial batch.

        Only what was queued when it began: events queued while a batch is being written wait for the next
        turn's gathering, instead of leaving a few at a time (which made batches of 3 tasks' events at a
        few thousand tasks a second, and cost as much as running the tasks). A turn that a full batch
        began leaves the rest to gather too: one message per ``MAX_BATCH`` events while tasks stream in.
        """
        offset = utcoffset()
        left = len(self._pending)
        if whole_batches:
            left -= left % MAX_BATCH
        while left > 0 and self._pending:
            batch = list(itertools.takewhile(_is_task_event, itertools.islice(self._pending, min(left, MAX_BATCH))))
            sent = batch or [self._pending[0]]
            for event in sent:
                event["utcoffset"] = offset
            if not await self._publish(batch or sent[0]):
                return
            left -= len(sent)
            # Taken off only once sent: a stop that cancels the pump in the middle of a send leaves them
            # for close() to send, instead of losing the batch the pump held.
            for event in sent:
                if self._pending and self._pending[0] is event:
                    self._pending.popleft()

    async def _publish(self, body: dict[str, Any] | list[dict[str, Any]]) -> bool:
        key = "task.multi" if isinstance(body, list) else routing_key(body["type"])
        message = aio_pika.Message(
            _JSON.encode(body).encode(), content_type="application/json", content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT, priority=0, headers={"hostname": self.hostname},
        )  # fmt: skip
        try:
            exchange = await self._ready_exchange()
            await exchange.publish(message, key, mandatory=False)
        except RECOVERABLE_ERRORS as exc:
            # Monitoring must not hold anything up: drop what waits (stale by the time the broker is
            # back) and open a new channel next time.
            log.debug("could not send events (%s); dropped %s and %d more", exc, key, len(self._pending))
            self._pending.clear()
            self._exchange = None
            return False
        return True

    async def _ready_exchange(self) -> AbstractExchange:
        if self._exchange is None or self._channel is None or self._channel.is_closed:
            if self._channel is not None:
                await close_quietly(self._channel)
            self._channel = await self.broker.channel(confirms=False)
            # Declared as Celery declares it (durable topic), so either side may come first.
            self._exchange = await self._channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        return self._exchange
