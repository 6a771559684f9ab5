"""Chords completed in the broker, with no result store: header results wait in one queue per chord.

Celery needs a result backend for chords; amqtask keeps the bookkeeping in RabbitMQ. For a chord of
``n`` header tasks with group id ``G``, the durable queue ``Q = amqtask.chord.<G>`` collects *parts*
(group index, task id, status, result), and an exclusive consumer on Q is the completion lock: the
broker lets one consumer at a time hold it (another gets 403 ACCESS_REFUSED), hands that consumer the
parts unacked, and on the holder's death removes the consumer and requeues the parts in one step.

Protocol, run by the worker that finished a header task inside ``after_success`` / ``after_failure``,
that is before it replies and acks its own delivery:

1. **Record.** Declare Q (``x-expires``) and publish the part into it; wait for the broker's confirm.
   A part is never lost: a worker killed before its ack runs the task again and records it again.
2. **Check.** A passive declare of Q returns its ready parts ``m`` and its consumers ``c`` at one
   instant. ``c == 0`` means nobody holds parts, so ``m`` is every part recorded; ``m < n`` means the
   chord is not complete, and the worker is done. Every worker checks after its own record, so the
   check that follows the last record sees all parts. ``c > 0`` means another worker is inspecting
   and may have looked before our part arrived: wait until it lets go, then check again.
3. **Complete.** With ``m >= n`` and ``c == 0``, consume Q exclusively until the ``m`` parts have
   arrived. Duplicates (a task that ran twice) count once per group index; a failed part wins over a
   successful one for the same index. If indexes ``0..n-1`` are all there, finish the chord: publish the
   body with the results in group order (or fail it when a part failed), confirmed; then delete Q,
   which drops the parts held. If an index is missing (possible only with duplicates), close the
   channel: the parts go back and the lock is free again, atomically.

Crashes: the completer is always a worker whose own header delivery is still unacked. Dying before the
body is published, its parts return to Q and its header task is redelivered; the rerun records a
duplicate and completes. Dying after publishing the body but before deleting Q, the rerun completes
again: the body runs twice (with the same task id). Dying after deleting Q, the rerun's part lands in
a new Q that never completes and expires. So the body runs exactly once in normal operation and at
least once when a worker dies at the worst moment. Q is deleted on completion; the queue of an
abandoned chord, or of a late duplicate, expires ``result_expires_s`` after its last declaration.

On the common path (record, check) the broker never closes a channel on us, and declarations share
one long-lived channel. A channel the broker closes after an error is what exposes an aiormq race: a
channel number reused while the broker still closes it (504 CHANNEL_ERROR), for which the broker drops
the whole connection. A first design, with a lock queue probed by passive declares that mostly failed
with 404, hit it under load. Now only a contended completion (403) or a queue already gone (404) do.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from . import protocol, serializers, signing
from .connection import Broker, close_quietly
from .errors import AmqtaskError, MessageError, TimeoutError, TopologyNotFoundError
from .producer import wire_of
from .protocol import WireMessage
from .settings import Settings

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("amqtask.chord")
_T = TypeVar("_T")
#: The channel an action ran on was closed (by the broker, after an error there, or with the connection).
_CHANNEL_GONE = (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.ChannelClosed)
QUEUE_PREFIX = "amqtask.chord."
#: Longest pause between two looks at a chord another worker is inspecting (a few round trips long).
LOCK_RETRY_MAX_S = 0.25


def queue_name(group_id: str) -> str:
    """The queue that collects the header results of chord ``group_id``."""
    return f"{QUEUE_PREFIX}{group_id}"


class Outcome(enum.Enum):
    """What a completion check found."""

    COMPLETED = "completed"  #: this check finished the chord
    WAITING = "waiting"  #: parts are still missing
    GONE = "gone"  #: the chord's queue is gone: finished by another check, or expired


@dataclass(frozen=True)
class Part:
    """One header task's outcome as kept in the chord's queue (``result`` is the exception dict on failure)."""

    group_index: int
    task_id: str
    status: str
    result: Any = None
    traceback: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The body of the part's message."""
        return {"group_index": self.group_index, "task_id": self.task_id, "status": self.status,
                "result": self.result, "traceback": self.traceback}  # fmt: skip

    @classmethod
    def from_wire(cls, data: Any) -> Part:
        """Parse a part's body; :class:`MessageError` when it is not one."""
        index = data.get("group_index") if isinstance(data, Mapping) else None
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(data.get("task_id"), str):
            raise MessageError("not a chord part")
        if data.get("status") not in (protocol.SUCCESS, protocol.FAILURE):
            raise MessageError(f"chord part with status {data.get('status')!r}")
        return cls(index, data["task_id"], data["status"], data.get("result"), data.get("traceback"))


#: Called by the completing check with one part per group index, in group order.
Finish = Callable[[list[Part]], Awaitable[None]]


class ChordKeeper:
    """Records header results and completes chords (see the module doc). One per worker: it holds the
    in-process locks that keep the tasks of one process from contending for the same chord's lock."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._shared: tuple[Broker, AbstractChannel] | None = None
        self._shared_lock = asyncio.Lock()

    async def record(self, runtime: Runtime, group_id: str, part: Part) -> None:
        """Step 1: put ``part`` into the chord's queue, confirmed (raises SerializationError for a bad result)."""
        settings = runtime.broker.settings
        name = queue_name(group_id)
        codec = serializers.codec(settings.task_serializer)
        body = serializers.encode(part.to_wire(), codec)
        await self._on_shared(
            runtime.broker, functools.partial(_declare, name=name, expires_s=settings.result_expires_s)
        )
        wire = WireMessage(body, codec.content_type, codec.content_encoding, delivery_mode=protocol.PERSISTENT,
                           correlation_id=part.task_id)  # fmt: skip
        signing.seal(settings.signing_keys, wire, signing.Kind.CHORD_PART)
        await runtime.publisher.publish(wire, "", name)

    async def complete(self, runtime: Runtime, group_id: str, size: int, finish: Finish) -> Outcome:
        """Steps 2 and 3: finish the chord with ``finish`` if all ``size`` parts are in."""
        try:
            ready, consumers = await self._stat(runtime.broker, queue_name(group_id))
        except TopologyNotFoundError:
            return Outcome.GONE
        if consumers == 0 and ready < size:
            return Outcome.WAITING
        lock = self._locks.get(group_id)
        if lock is None:
            lock = self._locks[group_id] = asyncio.Lock()
        async with lock:
            return await self._complete_locked(runtime, group_id, size, finish)

    async def close(self) -> None:
        """Close the keeper's channel (when its worker stops; a later worker may run on another loop)."""
        if self._shared is not None:
            await close_quietly(self._shared[1])
        self._shared, self._shared_lock = None, asyncio.Lock()

    async def _on_shared(self, broker: Broker, action: Callable[[AbstractChannel], Awaitable[_T]]) -> _T:
        """Run a declaration on the keeper's long-lived channel.

        Opening a channel per declaration costs a channel process in the broker each time (tens of ms
        under load). If the channel was closed under us (a queue gone, a reconnect), the action runs
        once more on a channel of its own, which then reports the real error.
        """
        async with self._shared_lock:
            if self._shared is None or self._shared[0] is not broker or self._shared[1].is_closed:
                self._shared = (broker, await broker.channel(confirms=False))
            channel = self._shared[1]
        try:
            return await action(channel)
        except _CHANNEL_GONE:
            pass
        fresh = await broker.channel(confirms=False)
        try:
            return await action(fresh)
        finally:
            if not fresh.is_closed:
                await fresh.close()

    async def _stat(self, broker: Broker, name: str) -> tuple[int, int]:
        """Q's ready messages and consumers, read at one instant; TopologyNotFoundError when Q is gone."""
        try:
            return await self._on_shared(broker, functools.partial(_passive, name=name))
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise TopologyNotFoundError(f"chord queue {name} is gone") from None

    async def _take(self, broker: Broker, name: str, size: int) -> _Held | None:
        """Take the lock and the parts; None when the chord turns out incomplete. Waits while another holds it."""
        settings = broker.settings
        # A holder that died uncleanly keeps the lock until the broker misses two heartbeats.
        deadline = time.monotonic() + settings.publish_timeout_s + 2 * settings.broker_heartbeat_s
        pause = 0.005
        while True:
            ready, consumers = await self._stat(broker, name)
            if consumers == 0:
                if ready < size:
                    return None
                held = await _consume(broker, name, ready, deadline)
                if held is not None:
                    return held
            if time.monotonic() > deadline:
                raise TimeoutError(f"chord queue {name} stayed locked by another worker")
            await asyncio.sleep(pause)
            pause = min(pause * 2, LOCK_RETRY_MAX_S)

    async def _complete_locked(self, runtime: Runtime, group_id: str, size: int, finish: Finish) -> Outcome:
        broker, name = runtime.broker, queue_name(group_id)
        generation = broker.generation
        try:
            held = await self._take(broker, name, size)
        except TopologyNotFoundError:
            return Outcome.GONE
        if held is None:
            return Outcome.WAITING
        try:
            parts = _complete_set(held.parts, size, broker.settings)
            if parts is None:
                return Outcome.WAITING  # closing the channel gives the parts back
            await finish(parts)
            if broker.generation == generation:
                # Cancel first: a consumer whose queue is deleted is told so by the broker (and aiormq warns).
                await held.queue.cancel(held.tag)
                await held.channel.queue_delete(name)
            else:
                # The connection was lost meanwhile, and the lock with it: leave Q to its next holder.
                log.warning("chord %s finished after a reconnect; its queue is left to expire", group_id)
            return Outcome.COMPLETED
        finally:
            await close_quietly(held.channel)


@dataclass
class _Held:
    """The completion lock, held: an exclusive consumer on Q and the parts it received, unacked."""

    channel: AbstractChannel
    queue: AbstractQueue
    tag: str
    parts: list[AbstractIncomingMessage]


def _complete_set(messages: list[AbstractIncomingMessage], size: int, settings: Settings) -> list[Part] | None:
    """One part per index 0..size-1 (a failure wins over a success), or None when an index is missing."""
    accept = serializers.normalize_accept(settings.accept_content)
    limits = serializers.limits_of(settings)
    found: dict[int, Part] = {}
    for message in messages:
        unverified = signing.problem(settings.signing_keys, wire_of(message), signing.Kind.CHORD_PART)
        if unverified is not None:
            log.error("ignoring a message in a chord queue: %s", unverified)
            continue
        try:
            part = Part.from_wire(serializers.decode(message.body, message.content_type, accept, limits))
        except AmqtaskError as exc:
            log.error("ignoring an unreadable message in a chord queue: %s", exc)
            continue
        if not 0 <= part.group_index < size:
            log.error("ignoring chord part %d of a chord of %d", part.group_index, size)
            continue
        if part.group_index not in found or part.status != protocol.SUCCESS:
            found[part.group_index] = part
    if len(found) < size:
        return None
    return [found[index] for index in range(size)]


async def _declare(channel: AbstractChannel, *, name: str, expires_s: int) -> None:
    try:
        await channel.declare_queue(name, durable=True, arguments={"x-expires": expires_s * 1000})
    except aiormq.exceptions.ChannelPreconditionFailed:
        # Declared by a worker with another result_expires_s: that queue serves as well.
        log.debug("chord queue %s exists with another x-expires", name)


async def _passive(channel: AbstractChannel, *, name: str) -> tuple[int, int]:
    declared = (await channel.declare_queue(name, passive=True)).declaration_result
    return int(declared.message_count or 0), int(declared.consumer_count or 0)


async def _consume(broker: Broker, name: str, expected: int, deadline: float) -> _Held | None:
    """Consume Q exclusively until ``expected`` parts arrived; None when another consumer won the race."""
    channel = await broker.channel(confirms=False)
    try:
        await channel.set_qos(prefetch_count=0)
        queue = await channel.declare_queue(name, passive=True)
        received: list[AbstractIncomingMessage] = []
        arrived, gone = asyncio.Event(), asyncio.Event()

        async def on_part(message: AbstractIncomingMessage) -> None:
            received.append(message)
            if len(received) >= expected:
                arrived.set()

        (await channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(lambda _frame: gone.set())
        try:
            tag = await queue.consume(on_part, exclusive=True)
        except aiormq.exceptions.ChannelAccessRefused:
            return None  # another worker took the lock first; the broker closed our channel
        # Nobody else takes parts out of Q, so the ``expected`` parts counted before all arrive, unless
        # Q is deleted meanwhile (the broker then cancels our consumer).
        waiting = [asyncio.ensure_future(arrived.wait()), asyncio.ensure_future(gone.wait())]
        await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
        for future in waiting:
            future.cancel()
        if gone.is_set() and not arrived.is_set():
            raise TopologyNotFoundError(f"chord queue {name} is gone")
        if not arrived.is_set():
            raise TimeoutError(f"the parts in chord queue {name} did not arrive")
        return _Held(channel, queue, tag, list(received))
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyNotFoundError(f"chord queue {name} is gone") from None
    except BaseException:
        await close_quietly(channel)
        raise


__all__ = ["ChordKeeper", "Finish", "Outcome", "Part", "queue_name"]
