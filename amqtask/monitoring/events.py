"""Celery's event messages: what they hold, and the publisher that sends them to the ``celeryev`` exchange.

An event is a JSON object with ``type`` (``task-succeeded``, ``worker-heartbeat``...), ``hostname``,
``pid``, ``clock`` (a Lamport clock), ``timestamp`` (``time.time()``) and ``utcoffset`` (Celery's: hours
*west* of UTC, ``time.timezone / 3600``, so UTC+1 is ``-1.0``), plus fields of its type. It goes to the
topic exchange ``celeryev`` with the type as routing key (``task.succeeded``); like a Celery worker,
task events are sent in batches as a JSON list under ``task.multi``, which every Celery receiver (Flower,
``celery events``, celery-exporter) unpacks. ``tests/fixtures/celery_events/events.json`` holds the real
thing, captured from Celery 5.7.

Cheap by construction: a hook only appends the events' JSON text to a queue (no await, nothing on the ack
path); one pump task per publisher sends them, a message per ``MAX_BATCH`` queued entries once that many
gathered, else ``FLUSH_S`` after the first, and the rest when the publisher closes (a stopping worker
loses none), transient and without confirms, on a channel of its own (a worker's on a connection of its
own, see ``event_middleware.py``). Nothing accumulates when nobody listens: the worker declares no
queue, so the broker drops events that no consumer has bound. When the broker is away, events are
dropped, not hoarded.
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
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from ..connection import RECOVERABLE_ERRORS, Broker, close_quietly
from ..remote.wire import LamportClock

log = logging.getLogger("amqtask.events")

EXCHANGE = "celeryev"
#: Events a publisher keeps while it cannot send (then the oldest go): monitoring never hoards memory.
MAX_PENDING = 10_000
#: Queued task-event entries per ``task.multi`` message: a received-and-started pair counts once, so a
#: message carries the events of about 100 tasks. Celery sends up to 24 events per message; larger batches
#: cost receivers nothing and cost the worker less (a publish costs as much as formatting 20 events).
MAX_BATCH = 200
#: How long events gather before they are sent, unless a batch fills first: one publish per many tasks is
#: what keeps events cheap, and a tenth of a second is nothing to a dashboard.
FLUSH_S = 0.1
#: How long a closing publisher waits for its pump to finish the send under way.
CLOSE_WAIT_S = 5.0


#: Compact JSON for an event's own fields, when they are not already written as JSON text (``send``).
_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)
#: A string as JSON: quoted, and escaped down to ASCII (json's own C function).
quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def json_string(value: str | None) -> str:
    """``value`` as JSON: a quoted, escaped string, or ``null``."""
    return "null" if value is None else quote(value)


def utcoffset() -> float:
    """Celery's ``utcoffset`` field: the local zone's offset in hours, positive west of UTC."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


def routing_key(event_type: str) -> str:
    """``task-succeeded`` → ``task.succeeded``, as Celery routes events."""
    return event_type.replace("-", ".")


class EventPublisher:
    """Sends the events of one process (a worker, or a producer with ``task_send_sent_event``).

    An event is written as JSON text when it is queued: the fields every event has (``type``,
    ``hostname``, ``pid``, ``utcoffset``) are one string per event type, made once, and the hooks that run
    for every task write their own fields as JSON text (:meth:`text`, :meth:`send_task_events`). Filling
    dicts for ``json`` to walk was the largest part of what events cost a worker (the hooks and the flush
    took 12 microseconds per task that way, 7 now, measured alone).
    """

    def __init__(self, broker: Broker, hostname: str) -> None:
        self.broker = broker
        self.hostname = hostname
        self.pid = os.getpid()
        self.clock = LamportClock()
        #: What waits to be sent: task events' JSON (one or more events, sent in batches), or a worker event's
        #: routing key and JSON (sent alone).
        self._pending: deque[str | tuple[str, str]] = deque(maxlen=MAX_PENDING)
        self._utcoffset = utcoffset()
        self._common: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    def text(self, event_type: str, members: str = "") -> str:
        """One event's JSON, now (the clock moves on). ``members`` are its own fields as JSON members, each
        followed by a comma (``'"uuid":"…",'``; :func:`json_string` quotes text); the fields every event has
        come after them."""
        common = self._common.get(event_type)
        if common is None:
            common = self._common[event_type] = (
                f'"type":{quote(event_type)},"hostname":{quote(self.hostname)},"pid":{self.pid:d},'
                f'"utcoffset":{self._utcoffset!r},"clock":'
            )  # fmt: skip
        return f'{{{members}{common}{self.clock.forward():d},"timestamp":{time.time()!r}}}'

    async def send_now(self, event_type: str, members: str = "", /, **fields: Any) -> None:
        """Publish one event at once, without a confirm (a producer's ``task-sent``: a script may exit right
        after its last send, before any batch would leave); its fields are ``members`` (as for
        :meth:`text`), then ``fields``."""
        self._refresh_utcoffset()
        await self._publish(routing_key(event_type), self.text(event_type, members + _members(fields)))

    def send(self, event_type: str, **fields: Any) -> None:
        """Queue an event for the pump; returns at once."""
        text = self.text(event_type, _members(fields))
        self._queue(text if event_type.startswith("task-") else (routing_key(event_type), text))

    def send_task_events(self, texts: str) -> None:
        """Queue task events made by :meth:`text`, joined by commas (what the hooks that run for every task
        use: fields written straight as JSON, two events of one moment queued as one); returns at once."""
        self._queue(texts)

    def _queue(self, entry: str | tuple[str, str]) -> None:
        self._pending.append(entry)
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

    def _refresh_utcoffset(self) -> None:
        """Follow a change of daylight saving time (checked once per batch, not per event)."""
        offset = utcoffset()
        if offset != self._utcoffset:
            self._utcoffset = offset
            self._common.clear()

    async def _send_pending(self, whole_batches: bool = False) -> None:
        """Send what is queued now, task events as lists under ``task.multi`` (as Celery's workers batch them),
        others one by one, in the order they were queued; with ``whole_batches``, no last partial batch.

        Only what was queued when it began: events queued while a batch is being written wait for the next
        turn's gathering, instead of leaving a few at a time (which made batches of 3 tasks' events at a
        few thousand tasks a second, and cost as much as running the tasks). A turn that a full batch
        began leaves the rest to gather too: one message per ``MAX_BATCH`` entries while tasks stream in.
        """
        self._refresh_utcoffset()
        left = len(self._pending)
        if whole_batches:
            left -= left % MAX_BATCH
        while left > 0 and self._pending:
            first = self._pending[0]
            batch: Sequence[object]
            if isinstance(first, str):
                texts: list[str] = []
                for entry in itertools.islice(self._pending, min(left, MAX_BATCH)):
                    if not isinstance(entry, str):
                        break
                    texts.append(entry)
                sent, batch = await self._publish("task.multi", "[" + ",".join(texts) + "]"), texts
            else:
                sent, batch = await self._publish(*first), [first]
            if not sent:
                return
            left -= len(batch)
            # Taken off only once sent: a stop that cancels the pump in the middle of a send leaves them
            # for close() to send, instead of losing the batch the pump held.
            for taken in batch:
                if self._pending and self._pending[0] is taken:
                    self._pending.popleft()

    async def _publish(self, key: str, body: str) -> bool:
        message = aio_pika.Message(
            body.encode(), content_type="application/json", content_encoding="utf-8",
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


def _members(fields: dict[str, Any]) -> str:
    """``fields`` as JSON members, each followed by a comma."""
    return _JSON.encode(fields)[1:-1] + "," if fields else ""
