"""Errors while handling a delivery: never an immediate redelivery loop.

Every error that escapes the handling of a delivery is one of two kinds:

- *transient* (:data:`TRANSIENT_ERRORS`): the connection or channel went, or the broker would not
  take a send for now (unreachable until the publish deadline, or nacking). Nothing is wrong with the
  message. Its delivery goes back to the queue (``basic.reject``, which counts against a quorum
  queue's delivery limit, a bound if the broker keeps refusing) after a pause that holds the
  delivery's slot, so the worker slows down instead of meeting the same delivery again at once. The
  pause doubles while such errors go on and starts small again once a delivery is settled. A delivery
  whose channel is gone needs nothing: the broker has requeued it already.
- *about this message*: anything else (an eta the delay levels cannot hold, headers too large to send
  on, a follow-up the broker refuses, a bug met only by this message...). The message is copied into
  ``<queue>.dlq`` with a reason (``deadletter.py``) and the exception, its follow-ups fail, its caller
  gets a FAILURE when it asked for a result, and the delivery is acked, once everything sent was
  confirmed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from .. import deadletter, protocol
from ..connection import CONNECTION_ERRORS
from ..errors import BrokerConnectionError, DelayRangeError
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
#: The pause before a delivery is given back after a transient error; it doubles while such errors go on.
TRANSIENT_PAUSE_S = 0.1
TRANSIENT_PAUSE_MAX_S = 5.0


def reason_for(exc: Exception) -> str:
    """The dead-letter reason for an error about a message."""
    if isinstance(exc, DelayRangeError):
        return deadletter.ETA_OUT_OF_RANGE
    if isinstance(exc, HeadersTooLargeError):
        return deadletter.HEADERS_TOO_LARGE
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
        pause = min(TRANSIENT_PAUSE_MAX_S, TRANSIENT_PAUSE_S * 2**self._streak)
        self._streak = min(self._streak + 1, 16)
        log.warning("%s; requeueing it in %.1fs", what, pause)
        await asyncio.sleep(pause)
        await self.handler.requeue_failed(message)

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
