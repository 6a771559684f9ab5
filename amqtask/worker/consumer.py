"""The worker's consumers: its queues on one channel, with per-consumer prefetch, kept consuming.

Prefetch is the flow control: each consumer may hold ``concurrency x prefetch_multiplier`` unacked
deliveries, never unbounded, and per-consumer QoS only (global QoS is ignored by RabbitMQ 4.3 and
refused by quorum queues). The consumer watches for three ways of silently stopping — the channel
closing, the connection dropping, and a broker-sent ``basic.cancel`` (queue deleted, or a quorum
queue's consumer timeout on 4.3) — and consumes again in each case, re-declaring its queues first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from ..connection import RECOVERABLE_ERRORS, raise_if_cancelled
from ..errors import AmqtaskError, TopologyError
from ..topology import QueueSpec
from .acks import ChannelAcks

log = logging.getLogger("amqtask.worker")

OnMessage = Callable[[AbstractIncomingMessage, QueueSpec], Awaitable[None]]
#: How often the consumer looks for consumers the broker cancelled, on aiormq 6 (the newest for Python
#: 3.10), which drops a broker's ``basic.cancel`` without telling anyone; aiormq 7 calls us back at once.
CANCEL_POLL_S = 1.0
#: With the CancelledError aiormq fails a stuck connection's calls with (see ``raise_if_cancelled``).
_RECOVERABLE_OR_STUCK: tuple[type[BaseException], ...] = (*RECOVERABLE_ERRORS, asyncio.CancelledError)


class Consumer:
    """Consumes ``queues`` and hands every delivery to ``on_message``; survives reconnects and cancels."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[AbstractChannel]],
        declare: Callable[[], Awaitable[None]],
        queues: list[QueueSpec],
        prefetch: int,
        on_message: OnMessage,
    ) -> None:
        self._connect = connect
        self._declare = declare
        self.queues = queues
        self.prefetch = prefetch
        self._on_message = on_message
        self._channel: AbstractChannel | None = None
        self._interrupted = asyncio.Event()
        self._stopping = False
        #: Set while consumers are registered on a live channel (tests and health checks wait on it).
        self.consuming = asyncio.Event()
        self.resumptions = 0
        self._tags: dict[str, str] = {}
        #: Settles the deliveries of the channel consumed now (a new one with each channel: tags count per channel).
        self.acks: ChannelAcks | None = None

    async def run(self) -> None:
        """Consume until :meth:`stop`; after any interruption consume again, backing off on repeated failures."""
        failures = 0
        while not self._stopping:
            try:
                await self._consume_until_interrupted()
                failures = 0
            except TopologyError:
                raise
            except _RECOVERABLE_OR_STUCK as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise_if_cancelled(exc)  # only a connection aiormq found stuck: consume again
                failures += 1
                log.warning("consumer interrupted (%s: %s); consuming again", type(exc).__name__, exc)
                # Back off on repeated failures, but wake up at once when asked to stop.
                self._interrupted.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._interrupted.wait(), min(5.0, 0.05 * 2**failures))

    async def _consume_until_interrupted(self) -> None:
        self._interrupted.clear()
        await self._declare()
        channel = await self._connect()
        channel.close_callbacks.add(lambda *_: self._interrupt())
        underlay = await channel.get_underlay_channel()
        # Half the prefetch at most held back behind a slow delivery, a quarter waiting for a batch: the
        # rest of the window keeps moving.
        self.acks = ChannelAcks(underlay, hold_max=self.prefetch // 2, batch=self.prefetch // 4)
        cancel_callbacks = getattr(underlay, "on_consumer_cancel_callbacks", None)
        if cancel_callbacks is not None:
            cancel_callbacks.add(self._on_cancel)
        await channel.set_qos(prefetch_count=self.prefetch)
        self._tags.clear()
        for spec in self.queues:
            await self._consume_on(channel, spec)
        self._channel = channel
        if self.resumptions or self.consuming.is_set():
            log.info("consuming again from %s", ", ".join(q.name for q in self.queues))
        self.resumptions += 1
        self.consuming.set()
        if cancel_callbacks is not None:
            await self._interrupted.wait()
        else:
            await self._interrupted_or_cancelled(underlay.consumers)  # type: ignore[attr-defined]
        self.consuming.clear()
        if not channel.is_closed and not self._stopping:
            # Closing the channel hands its unacked deliveries back; in-flight tasks will then skip their ack.
            await self._close(channel)

    async def _consume_on(self, channel: AbstractChannel, spec: QueueSpec) -> None:
        queue = await channel.declare_queue(spec.name, passive=True)
        tag = await queue.consume(self._callback(spec))
        self._tags[tag] = spec.name

    async def consume(self, spec: QueueSpec) -> None:
        """Consume ``spec`` on the live channel too (it must be in :attr:`queues` for later reconnects)."""
        live = self._channel is not None and not self._channel.is_closed and self.consuming.is_set()
        if live and spec.name not in self._tags.values():  # a reconnect may have consumed it already
            assert self._channel is not None
            await self._consume_on(self._channel, spec)

    async def cancel_queue(self, name: str) -> None:
        """Stop consuming queue ``name``, keeping the channel: its deliveries already here can still ack."""
        tags = [tag for tag, queue in self._tags.items() if queue == name]
        for tag in tags:
            del self._tags[tag]  # first, so the missing tag is not taken for a cancel by the broker
        if self._channel is None or self._channel.is_closed:
            return
        underlay = await self._channel.get_underlay_channel()
        for tag in tags:
            with contextlib.suppress(*RECOVERABLE_ERRORS, AmqtaskError):
                await underlay.basic_cancel(tag)

    def _callback(self, spec: QueueSpec) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def deliver(message: AbstractIncomingMessage) -> None:
            if self.acks is not None:
                self.acks.received(message)
            await self._on_message(message, spec)

        return deliver

    def _interrupt(self) -> None:
        self._interrupted.set()

    def _on_cancel(self, frame: Any) -> None:
        self._cancelled(getattr(frame, "consumer_tag", ""))

    def _cancelled(self, tag: str) -> None:
        log.warning("the broker cancelled the consumer of queue %r; consuming again", self._tags.get(tag, "?"))
        self._interrupt()

    async def _interrupted_or_cancelled(self, registered: dict[str, Any]) -> None:
        """Wait for an interruption, treating a consumer tag gone from aiormq 6's ``registered`` as a cancel."""
        while not self._interrupted.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._interrupted.wait(), CANCEL_POLL_S)
            gone = next((tag for tag in self._tags if tag not in registered), None)
            if gone is not None and not self._interrupted.is_set():
                self._cancelled(gone)

    async def cancel(self) -> None:
        """Stop receiving new deliveries, keeping the channel open so running tasks can still ack."""
        self._stopping = True
        self._interrupt()
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        underlay = await channel.get_underlay_channel()
        for tag in list(self._tags):
            with contextlib.suppress(*RECOVERABLE_ERRORS, AmqtaskError):
                await underlay.basic_cancel(tag)

    async def close(self) -> None:
        """Send the acks recorded, then close the channel; the broker requeues whatever is still unacked."""
        self._stopping = True
        self._interrupt()
        if self._channel is not None and not self._channel.is_closed:
            await self._close(self._channel)

    async def _close(self, channel: AbstractChannel) -> None:
        with contextlib.suppress(*RECOVERABLE_ERRORS):
            if self.acks is not None:
                await self.acks.close()  # settled deliveries must not come back as redeliveries
            await channel.close()
