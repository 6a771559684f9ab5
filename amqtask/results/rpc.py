"""Results over RPC: the process's reply-to queue and the store of the results that arrived on it.

Each process has one reply queue (``amqtask.reply.<uuid>``). It is durable and not auto-delete, with
``x-expires``, so replies wait in it while the client's connection is down and the queue goes away
by itself once the process is gone for ``result_expires_s``. Every event loop of the process that
sends tasks consumes from it and feeds one thread-safe :class:`ResultStore`, so a result can be
awaited from any loop or thread of the process. As with Celery's ``rpc://`` backend, only the process
that sent a task receives its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .. import protocol, signing
from ..connection import CONNECTION_ERRORS, SETTLE_ERRORS, Broker, raise_if_cancelled, replica_starting
from ..errors import AmqtaskError, BrokerConnectionError, MessageError, TimeoutError
from ..producer import wire_of
from ..protocol import READY_STATES, ResultMessage, WireMessage
from ..serializers import limits_of, normalize_accept
from ..settings import Settings

#: A lost connection, or the CancelledError aiormq fails a stuck connection's calls with.
_LOST_OR_STUCK: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncio.CancelledError)
log = logging.getLogger("amqtask.result")
_RESUME_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, AmqtaskError)
_ORDER = {protocol.PENDING: 0, protocol.STARTED: 1, protocol.RETRY: 2}
EXPIRES_HEADER = "x-amqtask-expires"
#: A custom state from ``update_state`` (PROGRESS) ranks with STARTED: it follows it and is followed by RETRY.
_CUSTOM = 1


@dataclass
class _Entry:
    report: ResultMessage
    size: int
    deadline: float


class ResultStore:
    """Thread-safe latest state per task id, with waiters on any event loop.

    Bounded three ways, so a process that sends tasks and never asks for their results cannot grow
    without end: by entries, by bytes (each report counts its encoded size), and by age (a report
    older than ``ttl_s`` is dropped, as the broker drops an unused result). The oldest reports go first;
    a waiter is resolved when its report arrives, so eviction only forgets what nobody waits for.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_s: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._results: OrderedDict[str, _Entry] = OrderedDict()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[ResultMessage]]]] = {}
        self._max = max_entries
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """The encoded size of the reports held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._results)

    def put(self, result: ResultMessage, size: int = 0, ttl_s: float | None = None) -> None:
        """Record a report of ``size`` bytes, kept ``ttl_s`` (default: the store's); the first ready state wins,
        earlier states never overwrite later ones."""
        with self._lock:
            current = self._results.get(result.task_id)
            if current is not None and not _newer(result, current.report):
                return
            if current is not None:
                self._bytes -= current.size
            deadline = self._clock() + (self._ttl_s if ttl_s is None else ttl_s)
            self._results[result.task_id] = _Entry(result, size, deadline)
            self._results.move_to_end(result.task_id)
            self._bytes += size
            self._evict()
            waiters = self._waiters.pop(result.task_id, []) if result.status in READY_STATES else []
        here = _running_loop()
        for loop, future in waiters:
            if loop is here:
                _resolve(future, result)  # the usual case: no wake-up through the loop's self-pipe per result
            else:
                loop.call_soon_threadsafe(_resolve, future, result)

    def forget(self, task_id: str) -> None:
        """Drop what is known about ``task_id``."""
        with self._lock:
            entry = self._results.pop(task_id, None)
            if entry is not None:
                self._bytes -= entry.size

    def _evict(self) -> None:
        now = self._clock()
        while self._results:
            entry = next(iter(self._results.values()))
            if len(self._results) <= self._max and self._bytes <= self._max_bytes and entry.deadline > now:
                return
            self._results.popitem(last=False)
            self._bytes -= entry.size

    def get(self, task_id: str) -> ResultMessage | None:
        """The latest report for ``task_id``, if any arrived and has not expired."""
        with self._lock:
            entry = self._results.get(task_id)
            if entry is None:
                return None
            if entry.deadline <= self._clock():
                del self._results[task_id]
                self._bytes -= entry.size
                return None
            return entry.report

    async def wait(self, task_id: str, timeout: float | None) -> ResultMessage:
        """Wait until ``task_id`` is ready (SUCCESS, FAILURE or REVOKED)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultMessage] = loop.create_future()
        current = self.get(task_id)
        with self._lock:
            if current is not None and current.status in READY_STATES:
                return current
            self._waiters.setdefault(task_id, []).append((loop, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"result of task {task_id} did not arrive within {timeout}s") from None
        finally:
            with self._lock:
                waiters = self._waiters.get(task_id)
                if waiters and (loop, future) in waiters:
                    waiters.remove((loop, future))
                    if not waiters:
                        del self._waiters[task_id]


def _newer(new: ResultMessage, old: ResultMessage) -> bool:
    if old.status in READY_STATES:
        return False
    return new.status in READY_STATES or _ORDER.get(new.status, _CUSTOM) >= _ORDER.get(old.status, _CUSTOM)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(future: asyncio.Future[ResultMessage], result: ResultMessage) -> None:
    if not future.done():
        future.set_result(result)


class ResultConsumer:
    """Consumes the process's reply queue on one event loop and feeds the shared store."""

    def __init__(self, broker: Broker, settings: Settings, queue_name: str, store: ResultStore) -> None:
        self.broker = broker
        self.settings = settings
        self.queue_name = queue_name
        self.store = store
        self._accept = normalize_accept(settings.result_accept_content)
        self._limits = limits_of(settings)
        self._channel: AbstractChannel | None = None
        self._started_generation = 0
        self._lock = asyncio.Lock()
        self._wanted = False
        broker.on_reconnect(self._restart)

    async def ensure_started(self, timeout: float | None = None) -> None:
        """Declare the reply queue and consume it (once per connection, and after every reconnect from now on)."""
        self._wanted = True
        if self._is_started():
            return
        async with self._lock:
            if self._is_started():
                return
            attempts = self.broker.attempts(timeout, f"cannot consume reply queue {self.queue_name}")
            while True:
                try:
                    await self._start(max(0.01, attempts.remaining()))
                    return
                except _LOST_OR_STUCK as exc:
                    if isinstance(exc, asyncio.CancelledError):
                        raise_if_cancelled(exc)  # only a connection aiormq found stuck
                    await attempts.after(exc)
                except aiormq.exceptions.AMQPError as exc:  # a refusal: translated at the boundary
                    if not replica_starting(exc):
                        raise BrokerConnectionError(f"cannot consume reply queue {self.queue_name}: {exc}") from exc
                    await attempts.after(exc)  # a result stream's replica here restarts after a node loss

    def _is_started(self) -> bool:
        return (
            self._started_generation == self.broker.generation
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def _start(self, timeout: float) -> None:
        channel = await self.broker.channel(confirms=False, timeout=timeout)
        generation = self.broker.generation  # the channel's, even if a reconnect comes during the awaits below
        await channel.set_qos(prefetch_count=1000)
        queue = await self._declare(channel)
        channel.close_callbacks.add(lambda *_: self._channel_closed())
        await queue.consume(self._on_message, arguments=self._consume_arguments())
        self._channel = channel
        self._started_generation = generation

    async def _declare(self, channel: AbstractChannel) -> AbstractQueue:
        arguments = reply_queue_arguments(self.settings)
        return await channel.declare_queue(self.queue_name, durable=True, arguments=arguments)

    def _consume_arguments(self) -> dict[str, Any] | None:
        return None

    def _channel_closed(self) -> None:
        self._started_generation = 0

    async def _restart(self, generation: int) -> None:
        if not self._wanted or self._lock.locked():
            # Never wanted: a process that never waited for a result (a worker) has no reply queue to
            # resume, and declaring one now would only add a queue, made while a cluster may be failing
            # over. Locked: the start under way consumes on the newest connection by itself.
            return
        try:
            await self.ensure_started(self.settings.publish_timeout_s)
        except _RESUME_ERRORS as exc:
            log.warning("could not resume consuming results: %s", exc)

    def _decode(self, wire: WireMessage) -> ResultMessage:
        """Verify (when signing is on) and decode a result: the one check every reader of results makes."""
        unverified = signing.problem(self.settings.signing_keys, wire, signing.Kind.RESULT)
        if unverified is not None:
            raise MessageError(unverified)
        return protocol.decode_result(wire, self._accept, self._limits)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        wire = wire_of(message)
        try:
            report = self._decode(wire)
            self.store.put(report, len(message.body), remaining_s(wire.headers))
        except (MessageError, AmqtaskError) as exc:
            log.error("dropping a result (correlation_id=%.100s): %s", message.correlation_id, exc)
        with contextlib.suppress(*SETTLE_ERRORS):
            await message.ack()

    async def close(self) -> None:
        """Stop consuming (the queue stays until it expires, keeping replies that still arrive)."""
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()


def expiry_header(expires_s: float) -> dict[str, Any]:
    """The header saying until when a report counts (epoch milliseconds), for a task's own ``result_expires``."""
    return {EXPIRES_HEADER: int((time.time() + expires_s) * 1000)}


def remaining_s(headers: dict[str, Any]) -> float | None:
    """How long a report with these headers still counts (None: as long as the store keeps anything)."""
    expires = headers.get(EXPIRES_HEADER)
    return (expires / 1000 - time.time()) if isinstance(expires, int | float) else None


def reply_queue_arguments(settings: Settings) -> dict[str, Any]:
    """The arguments a reply queue is declared with (durable, not exclusive: it outlives a connection)."""
    arguments: dict[str, Any] = {"x-expires": settings.result_expires_s * 1000}
    if len(settings.broker_url) > 1:
        # Several URLs mean a cluster: a classic queue lives on one node, and when that node is down
        # the client can neither declare its reply queue (so cannot send) nor receive a reply (the
        # broker drops or nacks them). A quorum queue (which keeps x-expires) outlives any one node.
        arguments["x-queue-type"] = "quorum"
    return arguments


def new_reply_queue_name() -> str:
    """A fresh, process-unique reply queue name."""
    return f"amqtask.reply.{uuid.uuid4()}"


__all__ = [
    "ResultConsumer",
    "ResultStore",
    "new_reply_queue_name",
    "reply_queue_arguments",
]
