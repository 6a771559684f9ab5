"""Remote control of workers over RabbitMQ, wire-compatible with Celery's pidbox.

A client publishes a request to the fanout exchange ``celery.pidbox``. Every worker consumes an
exclusive queue ``<hostname>.celery.pidbox`` bound to it, runs the command when the request is meant
for it (``destination``), and, when the request names a ``reply_to``, publishes ``{hostname: reply}``
to ``reply.celery.pidbox`` with the request's ticket in its headers. The client collects replies on a
private queue ``<oid>.reply.celery.pidbox`` bound with routing key ``oid``, until the timeout or the
reply limit. Exchanges, queue arguments, bodies and headers are Celery 5.7's
(``shared/fixtures/celery-v2/control_*.json``), so ``celery inspect ping`` reaches amqtask workers and
``amqtask inspect ping`` reaches Celery workers on the same vhost.

This module holds the wire format and the client (:class:`Control`, ``app.control``); the worker's
side is :class:`amqtask.middleware.control.ControlMiddleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from . import serializers
from .connection import close_quietly
from .errors import ConfigurationError, SerializationError
from .protocol import PERSISTENT, TRANSIENT, WireMessage
from .serializers import CONTROL_LIMITS
from .topology import translate

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("amqtask.control")

#: Celery derives the mailbox names from its ``control_exchange`` setting, "celery" by default. amqtask
#: uses that default (a constant, not a setting) so that Celery and amqtask clients and workers on one
#: vhost answer each other.
NAMESPACE = "celery"
EXCHANGE = f"{NAMESPACE}.pidbox"
REPLY_EXCHANGE = f"reply.{NAMESPACE}.pidbox"
#: kombu's arguments for both mailbox queues: a queue outlives its consumer by 10 s, and a request or
#: reply nobody read within 5 minutes is dropped.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-expires": 10_000, "x-message-ttl": 300_000}


def worker_queue_name(hostname: str) -> str:
    """The queue a worker with this node name receives requests on."""
    return f"{hostname}.{EXCHANGE}"


def reply_queue_name(oid: str) -> str:
    """The queue a client collects the replies to one call on."""
    return f"{oid}.{REPLY_EXCHANGE}"


async def declare_exchange(channel: AbstractChannel, name: str, kind: ExchangeType) -> None:
    """Declare a mailbox exchange as kombu does (transient); a mismatch raises a TopologyError."""
    try:
        await channel.declare_exchange(name, kind, durable=False)
    except aiormq.exceptions.AMQPChannelError as exc:
        raise translate(exc, "exchange", name, {"type": kind.value, "durable": False}) from None


class LamportClock:
    """The logical clock kombu sends in the ``clock`` header (nobody orders by it; peers expect it)."""

    def __init__(self) -> None:
        self.value = 0

    def forward(self) -> int:
        """Advance for an event of our own and return the new value."""
        self.value += 1
        return self.value

    def adjust(self, other: Any) -> None:
        """Move past a clock value received from a peer (non-numbers are ignored)."""
        if isinstance(other, int) and not isinstance(other, bool):
            self.value = max(self.value, other) + 1


def header_text(value: Any) -> str | None:
    """A string header as text (AMQP long strings may arrive as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def expired(headers: dict[str, Any]) -> bool:
    """Whether the ``expires`` header (epoch seconds; 0 or absent: never) lies in the past."""
    expires = headers.get("expires")
    return isinstance(expires, int | float) and not isinstance(expires, bool) and 0 < expires < time.time()


def encode_message(body: Any, headers: dict[str, Any], codec: serializers.Codec, *, reply: bool) -> WireMessage:
    """A request (persistent) or reply (transient) with the properties kombu gives them."""
    return WireMessage(
        body=serializers.encode(body, codec),
        content_type=codec.content_type,
        content_encoding=codec.content_encoding,
        headers=headers,
        delivery_mode=TRANSIENT if reply else PERSISTENT,
        priority=0,
    )


def flatten(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``[{node: reply}, ...]`` as one ``{node: reply}``; a name seen twice means two workers share it."""
    merged: dict[str, Any] = {}
    for item in replies:
        for node, reply in item.items():
            if node in merged:
                log.warning("two workers answered as %r; give each worker its own hostname (-n)", node)
            merged[node] = reply
    return merged


class Control:
    """Remote control of the workers: ``app.control.ping()``, ``app.control.inspect().stats()``, revokes.

    Every method has an ``a``-prefixed twin for async code. Requests are encoded with
    ``control_serializer`` (JSON by default, whatever the task serializer: Celery workers accept only
    JSON by default; a Celery worker that accepts only msgpack needs ``control_serializer="msgpack"``).
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.clock = LamportClock()

    async def abroadcast(
        self,
        method: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> list[dict[str, Any]]:
        """Send ``method`` to the workers (all, or those in ``destination``) and collect their replies.

        Without ``reply`` nothing is awaited and the result is ``[]``. With it, replies are collected
        for ``timeout`` seconds, or until ``limit`` arrived (by default ``len(destination)``). Workers
        drop the request once ``timeout`` has passed.
        """
        if isinstance(destination, str) or (
            destination is not None and not all(isinstance(node, str) for node in destination)
        ):
            raise ConfigurationError(f"destination must be a list of node names, got {destination!r}")
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout!r}")
        if limit is None and destination:
            limit = len(destination)
        runtime = self.app.runtime()
        body: dict[str, Any] = {
            "method": method,
            "arguments": arguments or {},
            "destination": list(destination) if destination is not None else None,
            "pattern": pattern,
            "matcher": matcher,
        }
        channel = await runtime.broker.channel(confirms=False, timeout=self.app.conf.publish_timeout_s)
        try:
            await declare_exchange(channel, EXCHANGE, ExchangeType.FANOUT)
            collector = None
            if reply:
                collector = _Collector(self, channel)
                await collector.listen()
                body["ticket"] = collector.ticket
                body["reply_to"] = {"exchange": REPLY_EXCHANGE, "routing_key": collector.oid}
            # Celery sends a double; pamqp writes every Python float as a 32-bit float, which at epoch
            # magnitudes is 128 s coarse. Whole seconds, rounded up, keep the request alive long enough.
            headers = {"clock": self.clock.forward(), "expires": math.ceil(time.time() + timeout)}
            wire = encode_message(body, headers, serializers.codec(self.app.conf.control_serializer), reply=False)
            # Not mandatory: with no worker on the vhost the request reaches no queue, and that is an
            # empty answer, not an error.
            await runtime.publisher.publish(wire, EXCHANGE, "", mandatory=False)
            return await collector.collect(timeout, limit) if collector is not None else []
        finally:
            await close_quietly(channel)

    def broadcast(
        self,
        method: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`abroadcast` for synchronous code."""
        return self.app.portal.run(
            self.abroadcast(
                method,
                arguments,
                destination=destination,
                reply=reply,
                timeout=timeout,
                limit=limit,
                pattern=pattern,
                matcher=matcher,
            )
        )

    async def aping(self, timeout: float = 1.0, destination: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Ping the workers: ``[{"node@host": {"ok": "pong"}}, ...]``, one item per worker that answered."""
        return await self.abroadcast("ping", destination=destination, reply=True, timeout=timeout)

    def ping(self, timeout: float = 1.0, destination: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """:meth:`aping` for synchronous code."""
        return self.app.portal.run(self.aping(timeout, destination))

    async def arevoke(
        self,
        task_id: str | Sequence[str],
        *,
        terminate: bool = False,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Tell the workers running now not to run these task ids (their deliveries are acked, REVOKED).

        A worker started later does not learn of it. amqtask workers do not stop a task that is
        already running, even with ``terminate=True`` (Celery workers do).
        """
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return await self.abroadcast(
            "revoke",
            {"task_id": ids, "terminate": terminate},
            destination=destination,
            reply=reply,
            timeout=timeout,
        )

    def revoke(
        self,
        task_id: str | Sequence[str],
        *,
        terminate: bool = False,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict[str, Any]]:
        """:meth:`arevoke` for synchronous code."""
        return self.app.portal.run(
            self.arevoke(task_id, terminate=terminate, destination=destination, reply=reply, timeout=timeout)
        )

    def inspect(
        self, timeout: float = 1.0, destination: Sequence[str] | None = None, limit: int | None = None
    ) -> Inspect:
        """Queries whose answers are ``{node: reply}``: ``app.control.inspect().stats()``."""
        return Inspect(self, timeout=timeout, destination=destination, limit=limit)


class Inspect:
    """Read-only queries to the workers; each returns ``{node: reply}`` (empty when nobody answered)."""

    def __init__(
        self,
        control: Control,
        *,
        timeout: float = 1.0,
        destination: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> None:
        self.control = control
        self.timeout = timeout
        self.destination = destination
        self.limit = limit

    async def _arequest(self, method: str, **arguments: Any) -> dict[str, Any]:
        replies = await self.control.abroadcast(
            method,
            arguments,
            destination=self.destination,
            reply=True,
            timeout=self.timeout,
            limit=self.limit,
        )
        return flatten(replies)

    def _request(self, method: str, **arguments: Any) -> dict[str, Any]:
        return self.control.app.portal.run(self._arequest(method, **arguments))

    async def aping(self) -> dict[str, Any]:
        """``{node: {"ok": "pong"}}``."""
        return await self._arequest("ping")

    def ping(self) -> dict[str, Any]:
        """:meth:`aping` for synchronous code."""
        return self._request("ping")

    async def aregistered(self, *taskinfoitems: str) -> dict[str, Any]:
        """``{node: [task name, ...]}``; with option names, ``"name [option=value ...]"`` (as Celery)."""
        return await self._arequest("registered", taskinfoitems=list(taskinfoitems))

    def registered(self, *taskinfoitems: str) -> dict[str, Any]:
        """:meth:`aregistered` for synchronous code."""
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    async def aactive(self, safe: bool = False) -> dict[str, Any]:
        """``{node: [task info, ...]}`` for the tasks running now; ``safe`` sends argument reprs instead."""
        return await self._arequest("active", safe=safe)

    def active(self, safe: bool = False) -> dict[str, Any]:
        """:meth:`aactive` for synchronous code."""
        return self._request("active", safe=safe)

    async def astats(self) -> dict[str, Any]:
        """``{node: {pid, total, pool, broker, uptime, ...}}``."""
        return await self._arequest("stats")

    def stats(self) -> dict[str, Any]:
        """:meth:`astats` for synchronous code."""
        return self._request("stats")

    async def arevoked(self) -> dict[str, Any]:
        """``{node: [revoked task id, ...]}``, oldest first."""
        return await self._arequest("revoked")

    def revoked(self) -> dict[str, Any]:
        """:meth:`arevoked` for synchronous code."""
        return self._request("revoked")


class _Collector:
    """One call's private reply queue and the replies that arrived on it."""

    def __init__(self, control: Control, channel: AbstractChannel) -> None:
        conf = control.app.conf
        self.clock = control.clock
        self.channel = channel
        self.oid = str(uuid.uuid4())
        self.ticket = str(uuid.uuid4())
        self.replies: list[dict[str, Any]] = []
        self._enough = asyncio.Event()
        self._limit: int | None = None
        self._accept = serializers.normalize_accept(conf.result_accept_content)
        self._limits = CONTROL_LIMITS

    async def listen(self) -> None:
        """Declare and consume the reply queue; done before the request goes out, so no reply is missed."""
        await declare_exchange(self.channel, REPLY_EXCHANGE, ExchangeType.DIRECT)
        queue = await self.channel.declare_queue(
            reply_queue_name(self.oid), exclusive=True, auto_delete=True, arguments=QUEUE_ARGUMENTS
        )
        await queue.bind(REPLY_EXCHANGE, self.oid)
        await queue.consume(self._on_reply, no_ack=True)

    async def collect(self, timeout: float, limit: int | None) -> list[dict[str, Any]]:
        """The replies that arrived within ``timeout`` seconds (fewer if ``limit`` is reached first)."""
        self._limit = limit
        self._check_limit()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._enough.wait(), timeout)
        return list(self.replies)

    def _check_limit(self) -> None:
        if self._limit is not None and len(self.replies) >= self._limit:
            self._enough.set()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        self.clock.adjust(headers.get("clock"))
        if expired(headers) or header_text(headers.get("ticket")) != self.ticket:
            return
        try:
            body = serializers.decode(message.body, message.content_type, self._accept, self._limits)
        except SerializationError as exc:
            log.warning("dropping an unreadable control reply: %s", exc)
            return
        if not isinstance(body, dict):
            log.warning("dropping a control reply that is not {node: reply}: %r", body)
            return
        self.replies.append(body)
        self._check_limit()


__all__ = [
    "EXCHANGE",
    "NAMESPACE",
    "QUEUE_ARGUMENTS",
    "REPLY_EXCHANGE",
    "Control",
    "Inspect",
    "LamportClock",
    "flatten",
    "reply_queue_name",
    "worker_queue_name",
]
