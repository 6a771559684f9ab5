"""Beat's leader lock: an exclusive queue of a fixed name, and a connection fenced by it.

**The lock.** RabbitMQ lets exactly one connection declare an exclusive queue of a given name; any other
connection gets ``405 RESOURCE_LOCKED`` (a channel error: its connection lives on), and the queue is
deleted when its owner's connection closes, for whatever reason. So the lock needs no server but
RabbitMQ, no lease time to tune and no agreement between clocks. Its name is ``beat_lock_name``
(default ``amqtask.beat.<app main>.lock``); a standby declares it again every ``beat_lock_retry_s``.

**Takeover time** after the leader dies = the broker noticing that its connection is gone + the
standby's next attempt (at most ``beat_lock_retry_s``):

* a killed or crashed process (even SIGKILL): the OS closes its socket, the broker sees it at once, so
  the takeover takes at most ``beat_lock_retry_s`` (plus a round trip and reading the state);
* a vanished host or a network partition: nothing closes, so the broker notices only through missed
  heartbeats, after about 1-2 x ``broker_heartbeat_s``; lower the heartbeat to shorten this.

**Fencing.** A lock is only as good as the holder's stopping when it loses it. A leader cut off from
the broker still believes it leads until its own heartbeat check fails, and a leader that reconnects
may find its old lock queue still in place, because the broker has not yet noticed the old connection
is dead. So beat sends its task messages and its state *on the very connection that owns the lock
queue*, through :class:`FencedBroker`: it hands out channels only while the lock is held on the current
connection, and after a reconnect every request raises :class:`NotLeaderError` until the lock has been
taken again on the new connection. RabbitMQ handles a connection's frames in order and drops the
exclusive queue only when it closes that connection, so everything an old leader published reached
the broker before the lock was free, and nothing it sends can arrive after a standby took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from ..connection import CONNECTION_ERRORS, Broker
from ..errors import AmqtaskError, BrokerConnectionError, TopologyError
from ..settings import Settings

if TYPE_CHECKING:
    from ..app import App

__all__ = ["FencedBroker", "LeaderLock", "NotLeaderError", "lock_is_held", "lock_name"]

T = TypeVar("T")

log = logging.getLogger("amqtask.beat")

# A declare that failed because the connection went away (rather than because the broker refused it).
_GONE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, RuntimeError)
# Anything that means this connection cannot show it still owns the lock queue.
_NOT_OWNED: tuple[type[BaseException], ...] = (aiormq.exceptions.AMQPChannelError, *_GONE)


def lock_name(app: App) -> str:
    """The lock queue of ``app``'s beats: ``beat_lock_name``, default ``amqtask.beat.<app main>.lock``."""
    return str(app.conf.beat_lock_name or f"amqtask.beat.{app.main}.lock")


class NotLeaderError(AmqtaskError):
    """This beat does not hold the leader lock (any more) on its current connection: it must not send.

    Deliberately not a :class:`~amqtask.errors.BrokerConnectionError`: the publisher rides those out by
    reconnecting and sending again, which is exactly what a leader that lost its lock must not do.
    """


class FencedBroker(Broker):
    """A :class:`~amqtask.connection.Broker` whose channels exist only while it holds the leader lock.

    The lock is held on one connection *generation*; :meth:`channel` raises :class:`NotLeaderError` when
    the current generation is another (or the connection is down), checking again once the channel is
    open, since the connection may have been replaced while it opened.
    """

    def __init__(self, settings: Settings, *, name: str) -> None:
        super().__init__(settings, name=name)
        self._lease: int | None = None
        self._lost_event = asyncio.Event()
        #: Called (without arguments) when the connection holding the lock closes.
        self.on_lost: Callable[[], None] | None = None

    @property
    def leading(self) -> bool:
        """Whether the lock is held on the connection that is up right now."""
        return self._lease is not None and self._lease == self.generation and self.connected

    def grant(self, generation: int, connection: AbstractConnection) -> None:
        """Record that the lock was taken on ``connection`` (of ``generation``)."""
        self._lease = generation
        self._lost_event.clear()
        connection.close_callbacks.add(functools.partial(self._lost, generation))

    def revoke(self) -> None:
        """Forget the lock: no channel is handed out until :meth:`grant` is called again."""
        self._lease = None

    def _lost(self, generation: int, *_: Any) -> None:
        if self._lease != generation:
            return  # not (or no longer) the lock's connection: revoked or closed on purpose
        log.warning("%s: the connection holding the beat lock closed; not sending any more", self.name)
        self._lease = None
        self._lost_event.set()
        if self.on_lost is not None:
            self.on_lost()

    async def while_leading(self, work: Awaitable[T]) -> T:
        """Await ``work``, but cancel it and raise :class:`NotLeaderError` the moment the lock's connection
        closes: a send waiting for a confirm or for a reconnect is abandoned at once, not after
        ``publish_timeout_s``."""
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self._lost_event.wait())
        try:
            if self.leading:
                await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise NotLeaderError(f"{self.name}: the connection holding the beat lock closed")
        return task.result()

    def cancelled_by_connection_loss(self) -> bool:
        """Whether a ``CancelledError`` caught just now means "connection gone" rather than "stop".

        When aiormq gives up a stuck connection (missed heartbeats) it fails the operations waiting on it
        with ``CancelledError``, before aio-pika marks the connection closed. On Python 3.11+ a
        ``CancelledError`` while this task is not being cancelled (``Task.cancelling()``) can only be
        that; on 3.10 it is taken to be that when aiormq's connection is closed.
        """
        task = asyncio.current_task()
        if sys.version_info >= (3, 11) and task is not None:
            return task.cancelling() == 0
        underlay = getattr(getattr(self._connection, "transport", None), "connection", None)
        return not self.connected or bool(getattr(underlay, "is_closed", False))

    def check(self) -> None:
        """Raise :class:`NotLeaderError` unless the lock is held on the current connection."""
        if not self.leading:
            raise NotLeaderError(f"{self.name} does not hold the beat lock on its current connection")

    async def channel(self, *, confirms: bool = True, timeout: float | None = None) -> AbstractChannel:
        """A channel on the lock-holding connection; :class:`NotLeaderError` when the lock is not held."""
        self.check()
        try:
            channel = await super().channel(confirms=confirms, timeout=timeout)
        except asyncio.CancelledError:
            if not self.cancelled_by_connection_loss():
                raise
            raise NotLeaderError(f"{self.name}: the connection holding the beat lock was given up") from None
        if not self.leading:  # the connection was replaced while the channel opened
            with contextlib.suppress(Exception):
                await channel.close()
            self.check()
        return channel


class LeaderLock:
    """The exclusive lock queue ``name`` on a :class:`FencedBroker`'s connection."""

    def __init__(self, broker: FencedBroker, name: str) -> None:
        self.broker = broker
        self.name = name
        #: Whether the last :meth:`try_acquire` found the lock held by another connection.
        self.held_elsewhere = False

    async def try_acquire(self, timeout: float) -> bool:
        """Try once to take the lock on the current connection; True when it is held now.

        False when another connection holds it, or when no connection came up within ``timeout``.
        """
        self.held_elsewhere = False
        if self.broker.leading:
            return True
        try:
            connection = await self.broker.connection(timeout)
        except BrokerConnectionError:
            return False
        # Read right after connection() returns, with no await in between: the generation of `connection`.
        generation = self.broker.generation
        try:
            channel = await connection.channel(publisher_confirms=False)
            try:
                await channel.declare_queue(self.name, exclusive=True, durable=False, auto_delete=False)
            finally:
                if not channel.is_closed:
                    await channel.close()
        except aiormq.exceptions.ChannelLockedResource:
            self.held_elsewhere = True
            return False
        except _GONE as exc:
            log.debug("taking the beat lock failed: %s", exc)
            return False
        except asyncio.CancelledError:
            if not self.broker.cancelled_by_connection_loss():
                raise
            return False
        except aiormq.exceptions.AMQPChannelError as exc:
            raise TopologyError(f"broker refused the beat lock queue {self.name!r}: {exc}") from None
        if connection.is_closed or self.broker.generation != generation:
            return False  # the queue went with that connection
        self.broker.grant(generation, connection)
        return True

    async def verify(self) -> None:
        """Check with the broker that this connection still owns the lock queue; else revoke and raise.

        Called before each batch of sends: it also catches a lock queue deleted by hand (an admin's
        ``delete_queue``), after which another beat could take the lock while this one still runs.
        """
        try:
            channel = await self.broker.channel(confirms=False)
        except BrokerConnectionError as exc:
            self.broker.revoke()
            raise NotLeaderError(f"lost the beat lock {self.name!r}: {exc}") from None
        try:
            await channel.declare_queue(self.name, passive=True)
        except _NOT_OWNED as exc:
            self.broker.revoke()
            raise NotLeaderError(f"lost the beat lock {self.name!r}: {exc}") from None
        except asyncio.CancelledError:
            if not self.broker.cancelled_by_connection_loss():
                raise
            raise NotLeaderError(f"lost the beat lock {self.name!r}: its connection was given up") from None
        finally:
            if not channel.is_closed:
                await channel.close()


async def lock_is_held(broker: Broker, name: str, timeout: float) -> bool:
    """Whether some connection (a leading beat) holds the lock queue ``name`` right now.

    A passive declare from a connection that does not own it: ``405 RESOURCE_LOCKED`` means held,
    ``404 NOT_FOUND`` means free.
    """
    channel = await broker.channel(confirms=False, timeout=timeout)
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelLockedResource:
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    # The queue exists and this connection may use it: it is no exclusive queue of another connection.
    return False
