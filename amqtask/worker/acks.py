"""Settling a worker's deliveries: acks coalesced into one ``basic.ack(multiple=True)`` per run of them.

An ack per delivery costs a frame, a socket write (a system call) and a drain on the event loop:
about a sixth of a worker's loop time on no-op tasks. Acks are therefore recorded, not sent at once,
and go out together once ``batch`` of them wait or :data:`ACK_DELAY_S` has passed, whichever comes
first, or at once when every delivery the channel has received is settled: then no other ack is
coming to share the frame, and waiting would only cost a caller time. A caller does wait for the
ack: RabbitMQ confirms a persistent message to a durable queue once it is on disk *or* acked, so the
sender of a task (its ``delay()`` returns after the confirm) often waits for this ack, even though
the task's reply left before it. ``batch`` is a quarter of the prefetch, so finished deliveries
waiting for their ack never take much of the prefetch window.

The ack is ``multiple=True`` up to the highest delivery tag below which *every* delivery of the
channel is settled. That is the only safe bound: ``multiple=True`` acks every outstanding delivery up
to the tag, so one still running (or never seen here: another consumer of the same channel) must stay
below nothing acked this way; a delivery nacked, rejected or released is settled by its own frame,
sent at once and before any multiple ack that covers its tag, so that ack does not touch it (the
broker processes a channel's frames in order). The tag acked with ``multiple=True`` is always one not
yet settled: RabbitMQ closes the channel for a multiple ack of an unknown tag.

A delivery whose task is slow holds back the acks of those that came after it. They are acked one
by one once :data:`HOLD_S` has passed with that delivery still unsettled, or as soon as
``hold_max`` of them wait, so a long task costs neither the prefetch window nor redeliveries of
finished tasks when the worker dies. Delivery tags count per channel: each channel the consumer opens
gets a :class:`ChannelAcks` of its own; a delivery of a channel that is gone is never acked (the
broker has requeued it). Before the worker closes a channel it calls :meth:`ChannelAcks.close`, which
sends everything recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from ..connection import SETTLE_ERRORS

log = logging.getLogger("amqtask.worker")

#: How long a recorded ack may wait for others to go out with it.
ACK_DELAY_S = 0.002
#: How long finished deliveries may wait behind an unsettled earlier one before they are acked one by one.
HOLD_S = 0.05


class ChannelAcks:
    """Settles the deliveries of one consumer channel, coalescing their acks (see the module doc)."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, hold_max: int, batch: int = 1) -> None:
        self.channel = channel
        self.hold_max = max(1, hold_max)
        self.batch = max(1, batch)
        self._next = 1  # every tag below this one is settled, its ack (if any) sent
        self._received = 0  # the highest tag received (see :meth:`received`)
        #: Settled tags at or above ``_next``: the delivery while its ack is still to send, else None.
        self._settled: dict[int, AbstractIncomingMessage | None] = {}
        self._held = 0  # deliveries in ``_settled`` whose ack is still to send
        self._flushing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._delay: asyncio.TimerHandle | None = None  # the flush after ACK_DELAY_S
        self._release = False  # ack held deliveries one by one at the next flush
        self._closing = False
        self._gone = False  # the channel closed: its tags mean nothing any more

    # ------------------------------------------------------------------------------------------ settling
    def received(self, message: AbstractIncomingMessage) -> None:
        """Note a delivery as it arrives, so that an ack with nothing else in hand goes out at once.

        Only the timing of acks depends on it, never which deliveries they cover.
        """
        tag = message.delivery_tag
        if tag is not None and tag > self._received:
            self._received = tag

    def ack(self, message: AbstractIncomingMessage) -> None:
        """Record that ``message`` may be acked; the ack goes out with the next batch, within ACK_DELAY_S."""
        if self._gone:
            return
        tag = message.delivery_tag
        assert tag is not None, "a consumer's deliveries have tags"
        self._settled[tag] = message
        self._held += 1
        self._next_step()

    async def reject(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """``basic.reject`` now (counts against a quorum queue's delivery limit)."""
        with self._unless_gone(message, "reject"):
            await message.reject(requeue=requeue)
        self._settled_elsewise(message)

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """``basic.nack`` now (does not count against a delivery limit)."""
        with self._unless_gone(message, "nack"):
            await message.nack(requeue=requeue)
        self._settled_elsewise(message)

    def _settled_elsewise(self, message: AbstractIncomingMessage) -> None:
        # Recorded once its frame is queued on the connection, i.e. ahead of any multiple ack covering it.
        if message.delivery_tag is not None and not self._gone:
            self._settled[message.delivery_tag] = None
            self._next_step()

    async def close(self) -> None:
        """Send every recorded ack (those held behind unsettled deliveries one by one); record no more."""
        self._closing = self._release = True
        self._next_step()
        while self._flushing is not None:
            await asyncio.wait({self._flushing})
        self._gone = True
        for timer in (self._timer, self._delay):
            if timer is not None:
                timer.cancel()

    # ------------------------------------------------------------------------------------------ sending
    def _next_step(self) -> None:
        """Flush now, or arm the timer that will: whatever the settlements recorded so far call for."""
        if self._flushing is not None or self._gone:
            return  # the flush under way takes the next step when it is done
        grows = self._next in self._settled  # the run of settled deliveries from the lowest one can grow
        # Every tag from the lowest unsettled one up to the last received is settled: nothing in hand.
        idle = len(self._settled) > self._received - self._next
        full = self._held >= self.batch or idle
        if self._held >= self.hold_max or (self._release and self._held) or (grows and full):
            self._flush_soon()
        elif grows:
            if self._delay is None:
                self._delay = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._flush_soon)
        elif self._held and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(HOLD_S, self._held_too_long, self._next)

    def _flush_soon(self) -> None:
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        if self._flushing is None and not self._gone:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
            self._flushing.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing = None
        if not task.cancelled() and task.exception() is not None:
            log.error("sending acks failed", exc_info=task.exception())
        self._next_step()

    async def _flush(self) -> None:
        last: AbstractIncomingMessage | None = None
        while self._next in self._settled:
            message = self._settled.pop(self._next)
            if message is not None:
                last = message
                self._held -= 1
            self._next += 1
        if last is not None:
            with self._unless_gone(last, "ack"):
                await last.ack(multiple=True)
        if self._held and not self._gone and (self._release or self._held >= self.hold_max):
            await self._ack_held()

    def _held_too_long(self, blocked_at: int) -> None:
        self._timer = None
        if not self._held or self._gone:
            return
        if self._next == blocked_at:  # still waiting for the same delivery: stop holding the others back
            self._release = True
            self._next_step()
        else:
            self._timer = asyncio.get_running_loop().call_later(HOLD_S, self._held_too_long, self._next)

    async def _ack_held(self) -> None:
        self._release = self._closing
        held = [message for message in self._settled.values() if message is not None]
        for message in held:  # all taken before the first await: no other flush can take one too
            assert message.delivery_tag is not None
            self._settled[message.delivery_tag] = None
        self._held -= len(held)
        for message in held:
            with self._unless_gone(message, "ack"):
                await message.ack()

    @contextlib.contextmanager
    def _unless_gone(self, message: AbstractIncomingMessage, what: str) -> Iterator[None]:
        """Settling on a channel that is gone only warns (once): the broker requeued what was not settled."""
        try:
            yield
        except SETTLE_ERRORS as exc:
            if not self._gone:
                log.warning("could not %s delivery %s (%s); the broker redelivers what was not settled",
                            what, message.delivery_tag, exc)  # fmt: skip
            self._gone = True
            self._settled.clear()
            self._held = 0
