"""Errors while handling a delivery: never an immediate redelivery loop.

Every error that escapes the handling of a delivery is one of two kinds:

- *transient* (:data:`TRANSIENT_ERRORS`): the connection or channel went, or the broker would not
  take a send for now (unreachable until the publish deadline, or nacking), or a wait timed out (an
  :class:`~amqtask.errors.TimeoutError`, a builtin ``TimeoutError``, e.g. a chord lock another worker
  kept too long). Nothing is wrong with the message. Its delivery goes back to the queue
  (``basic.reject``, which counts against a quorum queue's delivery limit, a bound if the broker keeps
  refusing) after a pause that holds the delivery's slot, so the worker slows down instead of meeting
  the same delivery again at once. The pause doubles while such errors go on and starts small again
  once a delivery is settled. A delivery whose channel is gone needs nothing: the broker has requeued
  it already.
- *about this message*: anything else (an eta the delay levels cannot hold, headers too large to send
  on, a follow-up the broker refuses, a bug met only by this message...). The message is copied into
  ``<queue>.dlq`` with a reason (``deadletter.py``) and the exception, its follow-ups fail, its caller
  gets a FAILURE when it asked for a result, and the delivery is acked, once everything sent was
  confirmed.

A task that raises ``Reject(requeue=True)`` asks for its message to be tried again later. That goes
through the same growing pause, then back to the end of the queue, at most ``task_requeue_limit``
times per message (see :meth:`Triage.requeue_rejected`); after that it is about the message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from .. import deadletter, delays, protocol, signing
from ..connection import CONNECTION_ERRORS
from ..errors import BrokerConnectionError, DelayRangeError, RequeueLimitError
from ..failures import format_traceback
from ..producer import HeadersTooLargeError, NotConfirmedError, wire_of
from ..protocol import WireMessage
from ..topology import QueueSpec

if TYPE_CHECKING:
    from .delivery import DeliveryHandler

log = logging.getLogger("amqtask.worker")

#: Errors that say the broker link failed or would not take a send for now, not that the message is bad.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    BrokerConnectionError,
    asyncio.TimeoutError,
    NotConfirmedError,
)
#: The pause before a delivery is given back: it doubles with each requeue in a row, up to the maximum.
REQUEUE_PAUSE_S = 0.1
REQUEUE_PAUSE_MAX_S = 5.0
#: How often ``Reject(requeue=True)`` has sent a message back to its queue, carried by the message itself.
REQUEUES_HEADER = deadletter.PREFIX + "requeues"


def requeue_pause_s(requeues: int) -> float:
    """The pause before the next requeue, after ``requeues`` requeues in a row."""
    return min(REQUEUE_PAUSE_MAX_S, REQUEUE_PAUSE_S * 2.0 ** min(requeues, 16))


def requeues_of(headers: Mapping[str, Any] | None) -> int:
    """The requeue count a message carries: 0 when it has none, or one that is not a count."""
    value = (headers or {}).get(REQUEUES_HEADER)
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, value)  # a forged negative count must not buy more requeues than the limit
    return 0


def reason_for(exc: Exception) -> str:
    """The dead-letter reason for an error about a message."""
    if isinstance(exc, DelayRangeError):
        return deadletter.ETA_OUT_OF_RANGE
    if isinstance(exc, HeadersTooLargeError):
        return deadletter.HEADERS_TOO_LARGE
    if isinstance(exc, RequeueLimitError):
        return deadletter.REQUEUE_LIMIT
    return deadletter.WORKER_ERROR


def channel_gone(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a delivery arrived on is closed (its delivery tag means nothing any more)."""
    try:
        return bool(message.channel.is_closed)
    except aiormq.exceptions.ChannelInvalidStateError:  # aio-pika's way of saying "closed"
        return True


class Triage:
    """What a :class:`~amqtask.worker.delivery.DeliveryHandler` does with a delivery whose handling failed."""

    def __init__(self, handler: DeliveryHandler) -> None:
        self.handler = handler
        self._streak = 0  # transient errors in a row

    def settled(self) -> None:
        """A delivery was handled without error: the next transient error pauses briefly again."""
        self._streak = 0

    async def requeue_later(self, message: AbstractIncomingMessage, exc: BaseException) -> None:
        """After a transient error, give the delivery back once a pause has passed."""
        what = f"handling delivery {message.delivery_tag} met a broker problem ({type(exc).__name__}: {exc})"
        if channel_gone(message):
            log.warning("%s; its channel is gone, so the broker has requeued it", what)
            return
        pause = requeue_pause_s(self._streak)
        self._streak = min(self._streak + 1, 16)
        log.warning("%s; requeueing it in %.1fs", what, pause)
        await asyncio.sleep(pause)
        await self.handler.requeue_failed(message)

    async def requeue_rejected(
        self, message: AbstractIncomingMessage, queue: QueueSpec, wire: WireMessage, reason: str
    ) -> None:
        """The task raised ``Reject(requeue=True)``: after a pause, send its message to the end of its
        queue with its requeue count one higher, then ack; past ``task_requeue_limit`` requeues, raise
        :class:`~amqtask.errors.RequeueLimitError` (the message is then dead-lettered, ``requeue-limit``).

        Not ``basic.reject(requeue=True)``: that puts the same message back at the head of a classic
        queue, at once and unchanged, so nothing bounds it. Where the count lives decides the bound: a
        worker's memory forgets it on restart and each worker would allow the limit again;
        ``x-delivery-count`` exists only on quorum queues, and ``redelivered`` is a flag. So the count
        travels in the message (:data:`REQUEUES_HEADER`), whichever worker receives it next: the bound
        holds across workers and restarts. The copy is confirmed before the delivery is acked, so a
        crash in between leaves a duplicate with its own bounded count, never a loss. The count is
        signed: the copy is signed again, with the key that signed the message, and a count altered
        on the way fails verification; one that is negative or not a number counts as 0. The pause
        (0.1 s doubling to 5 s with the count) holds the delivery's slot, so a worker meeting such a
        message again slows down; the tasks queued behind it run meanwhile.
        """
        requeues = requeues_of(wire.headers)
        limit: int = self.handler.app.conf.task_requeue_limit
        what = f"message {message.correlation_id} from {queue.name}"
        if requeues >= limit:
            because = f": {reason}" if reason else ""
            raise RequeueLimitError(f"{what} was requeued by Reject(requeue=True) {requeues} time(s), "
                                    f"task_requeue_limit is {limit}{because}")  # fmt: skip
        pause = requeue_pause_s(requeues)
        log.info("task rejected %s with requeue=True; requeueing it in %.1fs (%d of %d)",
                 what, pause, requeues + 1, limit)  # fmt: skip
        await asyncio.sleep(pause)
        headers = delays.strip_death_headers(wire.headers)
        headers[REQUEUES_HEADER] = requeues + 1
        again = dataclasses.replace(wire, headers=headers)
        signing.seal(signing.replying_keys(self.handler.app.conf.signing_keys, wire, signing.Kind.TASK), again,
                     signing.Kind.TASK)  # fmt: skip
        await self.handler.publisher.publish(again, "", queue.name)
        self.handler.ack(message)

    async def dead_letter(self, message: AbstractIncomingMessage, queue: QueueSpec, exc: Exception) -> None:
        """Handling failed because of the message itself: dead-letter it with the reason and the exception,
        fail its follow-ups and tell its caller (when it can be read and asked for a result), then ack."""
        handler = self.handler
        detail = f"{type(exc).__name__}: {exc}"
        copied = await handler.dead_letter(message, queue, reason_for(exc), detail, exc=exc, settle=False)
        try:
            await self._report(wire_of(message), exc)
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:  # the message is safe in the DLQ; telling others is all that failed
            log.error("could not report why message %s was dead-lettered: %s", message.correlation_id, error)
        await handler.settle_dead_lettered(message, copied)

    async def _report(self, wire: WireMessage, exc: Exception) -> None:
        handler = self.handler
        try:
            msg = protocol.decode_task(wire, handler.accept, handler.limits)
        except Exception:  # unreadable after all: only its properties can say where to answer
            await handler.reply_to_unreadable(wire, exc)
            return
        report = handler.failure(msg, exc, format_traceback(exc))
        await handler.fail_follow_ups(msg, exc, report)
        await handler.reply(msg, wire, report)
