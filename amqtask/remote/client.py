"""The remote-control client: ``app.control`` sends requests to the workers and collects their replies.

The wire format is :mod:`amqtask.remote.wire`; the worker's side is :mod:`amqtask.remote.node`;
the read-only queries, ``app.control.inspect()``, are :mod:`amqtask.remote.inspect`.
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

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .. import serializers
from ..connection import SETTLE_ERRORS, close_quietly
from ..errors import ConfigurationError
from ..serializers import CONTROL_LIMITS
from . import wire
from .inspect import Inspect
from .wire import EXCHANGE, QUEUE_ARGUMENTS, REPLY_EXCHANGE, LamportClock, declare_exchange, encode_message

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("amqtask.control")
#: Replies in flight to one call at once.
REPLY_PREFETCH = 64
#: The most replies one call keeps (one per worker; more than this many workers is not a real vhost).
MAX_REPLIES = 10_000


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
            conf = self.app.conf
            codec = serializers.codec(conf.control_serializer)
            request = encode_message(body, headers, codec, reply=False, keys=conf.signing_keys)
            # Not mandatory: with no worker on the vhost the request reaches no queue, and that is an
            # empty answer, not an error.
            await runtime.publisher.publish(request, EXCHANGE, "", mandatory=False)
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

    async def arate_limit(
        self,
        task_name: str,
        rate_limit: str | float | None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Set ``task_name``'s rate limit (``"10/s"``, ``"5/m"``, ``"100/h"``; ``0`` for none) in every worker process.

        As in Celery, the limit is per worker process and lasts until it restarts.
        """
        return await self.abroadcast(
            "rate_limit",
            {"task_name": task_name, "rate_limit": rate_limit},
            destination=destination,
            reply=reply,
            timeout=timeout,
        )

    def rate_limit(
        self,
        task_name: str,
        rate_limit: str | float | None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict[str, Any]]:
        """:meth:`arate_limit` for synchronous code."""
        return self.app.portal.run(
            self.arate_limit(task_name, rate_limit, destination=destination, reply=reply, timeout=timeout)
        )

    async def aadd_consumer(
        self, queue: str, *, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        """Make the workers consume ``queue`` too (defined by their app's routing, or a plain durable queue)."""
        return await self.abroadcast("add_consumer", {"queue": queue}, destination=destination, reply=reply,
                                     timeout=timeout)  # fmt: skip

    def add_consumer(
        self, queue: str, *, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        """:meth:`aadd_consumer` for synchronous code."""
        return self.app.portal.run(self.aadd_consumer(queue, destination=destination, reply=reply, timeout=timeout))

    async def acancel_consumer(
        self, queue: str, *, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        """Make the workers stop consuming ``queue``; what they already hold from it still runs."""
        return await self.abroadcast("cancel_consumer", {"queue": queue}, destination=destination, reply=reply,
                                     timeout=timeout)  # fmt: skip

    def cancel_consumer(
        self, queue: str, *, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        """:meth:`acancel_consumer` for synchronous code."""
        return self.app.portal.run(self.acancel_consumer(queue, destination=destination, reply=reply, timeout=timeout))

    async def ashutdown(
        self, *, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        """Stop the workers as SIGTERM does (running tasks finish, the rest go back to their queues)."""
        return await self.abroadcast("shutdown", destination=destination, reply=reply, timeout=timeout)

    def shutdown(
        self, *, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        """:meth:`ashutdown` for synchronous code."""
        return self.app.portal.run(self.ashutdown(destination=destination, reply=reply, timeout=timeout))

    def inspect(
        self, timeout: float = 1.0, destination: Sequence[str] | None = None, limit: int | None = None
    ) -> Inspect:
        """Queries whose answers are ``{node: reply}``: ``app.control.inspect().stats()``."""
        return Inspect(self, timeout=timeout, destination=destination, limit=limit)


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
        self._reader = wire.Reader(
            self.clock,
            serializers.normalize_accept(conf.result_accept_content),
            CONTROL_LIMITS,
            "control reply",
            conf.signing_keys,
        )

    async def listen(self) -> None:
        """Declare and consume the reply queue; done before the request goes out, so no reply is missed."""
        await declare_exchange(self.channel, REPLY_EXCHANGE, ExchangeType.DIRECT)
        queue = await self.channel.declare_queue(
            wire.reply_queue_name(self.oid), exclusive=True, auto_delete=True, arguments=QUEUE_ARGUMENTS
        )
        await queue.bind(REPLY_EXCHANGE, self.oid)
        # Acked, with a bounded prefetch: a flood of replies waits in the broker, not in this process.
        await self.channel.set_qos(prefetch_count=REPLY_PREFETCH)
        await queue.consume(self._on_reply)

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
        try:
            envelope = wire.read(self._reader, message)
            if envelope is None or wire.header_text(envelope.headers.get("ticket")) != self.ticket:
                return
            if len(self.replies) >= MAX_REPLIES:
                log.warning("more than %d replies to one control request; ignoring the rest", MAX_REPLIES)
                self._enough.set()
                return
            self.replies.append(envelope.body)
            self._check_limit()
        finally:
            with contextlib.suppress(*SETTLE_ERRORS):
                await message.ack()


__all__ = ["Control"]
