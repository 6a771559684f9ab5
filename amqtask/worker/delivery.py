"""What happens to one delivery: the single place where ack, retry, dead-letter and replies are decided.

Order matters for "lose nothing": anything the worker publishes because of a delivery (the reply,
a retry copy, a dead-letter copy, the next step of a chain) is confirmed by the broker *before* the
delivery is acked. A worker killed at any instant therefore loses nothing; at worst the broker
redelivers and a step repeats (at-least-once). A delivery is acked only on the channel it arrived on;
if that channel is gone, the broker redelivers it and the ack is skipped.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage

from .. import deadletter, delays, protocol, serializers, signing
from ..errors import (
    AmqtaskError,
    MessageError,
    NotRegistered,
    Reject,
    Retry,
    RetryFailedError,
    Revoked,
    SerializationError,
    TaskRevokedError,
)
from ..failures import encode_exception, format_traceback
from ..middleware import current_queue
from ..producer import HeadersTooLargeError, Publisher, wire_of
from ..protocol import ResultMessage, TaskMessage, WireMessage
from ..results import reporting
from ..retry import autoretry_delay
from ..task import Request, Task
from ..topology import QueueSpec
from .acks import ChannelAcks
from .triage import TRANSIENT_ERRORS, Triage, channel_gone

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("amqtask.worker")
#: A message this close to its eta runs now rather than making another trip through the delay levels.
ETA_TOLERANCE = dt.timedelta(milliseconds=50)


class DeliveryHandler:
    """Processes deliveries for a :class:`~amqtask.worker.worker.Worker`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = worker.app
        conf = worker.app.conf
        self.accept = serializers.normalize_accept(conf.accept_content)
        self.limits = serializers.limits_of(conf)
        self.triage = Triage(self)

    @property
    def publisher(self) -> Publisher:
        return self.worker.runtime.publisher

    # ------------------------------------------------------------------------------------------ entry
    async def process(self, message: AbstractIncomingMessage, queue: QueueSpec) -> None:
        """Handle one delivery and settle it, whatever goes wrong: never an immediate redelivery loop.

        An error while handling it is either *transient* (the connection or channel went, the broker
        would not take a send for now), and the delivery is requeued after a pause that grows while
        such errors go on; or it is about *this message* (any other error), and the message is
        dead-lettered with a reason and the exception, its caller told, and acked (see ``triage.py``).
        """
        try:
            try:
                await self.handle(message, queue)
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:
                await self.triage.dead_letter(message, queue, exc)
        except TRANSIENT_ERRORS as exc:
            await self.triage.requeue_later(message, exc)
        else:
            self.triage.settled()
        finally:
            for hook in self.app.hooks("after_delivery"):
                await hook(self.worker)

    def unverified(self, wire: WireMessage) -> str | None:
        """Why ``wire`` must cause nothing here, or None when it verifies (always, when signing is off)."""
        return signing.problem(self.app.conf.signing_keys, wire, signing.Kind.TASK)

    async def handle(self, message: AbstractIncomingMessage, queue: QueueSpec) -> None:
        """Verify, decode, check and run one delivery, then settle it."""
        current_queue.set(queue.name)
        wire = wire_of(message)
        # Before anything else: an unverified message is dead-lettered and causes nothing, not even a reply.
        unverified = self.unverified(wire)
        if unverified is not None:
            await self.dead_letter(message, queue, deadletter.REJECTED, unverified)
            return
        try:
            msg = protocol.decode_task(wire, self.accept, self.limits)
        except (MessageError, SerializationError) as exc:
            await self.reply_to_unreadable(wire, exc)
            await self.dead_letter(message, queue, deadletter.MALFORMED, str(exc))
            return
        task = self.app.tasks.get(msg.task)
        if task is None:
            error = f"task {msg.task!r} is not registered on this worker"
            unregistered = NotRegistered(error)
            report = self.failure(msg, unregistered, None)
            await self.fail_follow_ups(msg, unregistered, report)
            await self.reply(msg, wire, report)
            await self.dead_letter(message, queue, deadletter.UNKNOWN_TASK, error)
            return
        try:
            for hook in self.app.hooks("before_process"):
                await hook(self.worker, msg, wire)
        except Reject as exc:
            await self.dead_letter(message, queue, deadletter.REJECTED, exc.reason)
            return
        except Revoked as exc:
            await self.revoked(message, msg, wire, exc.reason)
            return
        if await self._expired_or_early(message, queue, msg, wire):
            return
        await self.run(message, queue, task, msg, wire)

    async def _expired_or_early(
        self, message: AbstractIncomingMessage, queue: QueueSpec, msg: TaskMessage, wire: WireMessage
    ) -> bool:
        now = dt.datetime.now(dt.timezone.utc)
        if msg.expires is not None and now >= msg.expires:
            log.warning("task %s[%s] expired at %s; not running it", msg.task, msg.id, msg.expires.isoformat())
            await self.revoked(message, msg, wire, "expired")
            return True
        if msg.eta is not None and msg.eta - now > ETA_TOLERANCE:
            # Never hold a delivery waiting for its time: hand it back to the broker's delay levels.
            await self.publisher.publish_delayed(_stripped(wire), queue, (msg.eta - now).total_seconds())
            self.ack(message)
            return True
        return False

    async def revoked(self, message: AbstractIncomingMessage, msg: TaskMessage, wire: WireMessage, reason: str) -> None:
        """Report REVOKED without running the task, then ack; the result is Celery's TaskRevokedError.

        An expired task is reported the same way (reason ``expired``), as a Celery worker does: a Celery
        client turns a REVOKED result into an exception and fails on anything but an exception dict.
        """
        if reason != "expired":
            log.info("task %s[%s] was revoked; not running it", msg.task, msg.id)
        self.worker.stats["revoked"] += 1
        error = {"exc_type": "TaskRevokedError", "exc_message": [reason], "exc_module": "celery.exceptions"}
        report = ResultMessage(msg.id, protocol.REVOKED, error, date_done=protocol.now_iso(), parent_id=msg.parent_id)
        await self.fail_follow_ups(msg, TaskRevokedError(f"task {msg.id} was {reason}"), report)
        await self.reply(msg, wire, report)
        self.ack(message)

    # ------------------------------------------------------------------------------------------ running
    async def run(
        self, message: AbstractIncomingMessage, queue: QueueSpec, task: Task[Any, Any], msg: TaskMessage,
        wire: WireMessage,
    ) -> None:  # fmt: skip
        """Run the task and settle the delivery according to the outcome."""
        request = self.request(message, queue, msg)
        if task.options.get("track_started", self.app.conf.task_track_started):
            started = ResultMessage(
                msg.id, protocol.STARTED, {"pid": self.worker.pid, "hostname": self.worker.hostname}
            )
            await self.reply(msg, wire, started)
        time_limit = msg.time_limit or task.options.get("time_limit") or self.app.conf.task_time_limit
        soft_time_limit = (
            msg.soft_time_limit or task.options.get("soft_time_limit") or self.app.conf.task_soft_time_limit
        )
        try:
            with self.worker.tracking(msg):
                value = await self.worker.executor.run(task, request, time_limit, soft_time_limit)
        except Retry as exc:
            await self.retry(message, queue, msg, wire, exc)
        except Reject as exc:
            for hook in self.app.hooks("after_reject"):
                await hook(self.worker, msg, exc)
            if exc.requeue:
                await self.triage.requeue_rejected(message, queue, wire, exc.reason)
            else:
                await self.dead_letter(message, queue, deadletter.REJECTED, exc.reason)
        except Exception as exc:
            await self.failed(message, queue, task, msg, wire, exc)
        else:
            await self.succeeded(message, msg, wire, value)

    def request(self, message: AbstractIncomingMessage, queue: QueueSpec, msg: TaskMessage) -> Request:
        """The ``self.request`` a task sees."""
        return Request(
            id=msg.id, task=msg.task, args=msg.args, kwargs=msg.kwargs, retries=msg.retries, eta=msg.eta,
            expires=msg.expires, root_id=msg.root_id, parent_id=msg.parent_id, group=msg.group,
            group_index=msg.group_index, reply_to=msg.reply_to, correlation_id=message.correlation_id,
            headers=msg.extra_headers, hostname=self.worker.hostname, origin=msg.origin, is_eager=False,
            delivery_info={"exchange": message.exchange, "routing_key": message.routing_key, "queue": queue.name,
                           "priority": message.priority, "redelivered": message.redelivered},
            callbacks=msg.callbacks, errbacks=msg.errbacks, chain=msg.chain, chord=msg.chord,
        )  # fmt: skip

    async def succeeded(
        self, message: AbstractIncomingMessage, msg: TaskMessage, wire: WireMessage, value: Any
    ) -> None:
        """Report success, start follow-ups (middleware: chains, callbacks), then ack."""
        self.worker.stats["succeeded"] += 1
        report = ResultMessage(msg.id, protocol.SUCCESS, value, date_done=protocol.now_iso(), parent_id=msg.parent_id)
        for hook in self.app.hooks("after_success"):
            await hook(self.worker, msg, value, report)
        await self.reply(msg, wire, report)
        self.ack(message)

    async def failed(
        self, message: AbstractIncomingMessage, queue: QueueSpec, task: Task[Any, Any], msg: TaskMessage,
        wire: WireMessage, exc: Exception,
    ) -> None:  # fmt: skip
        """Retry automatically when the task says so; otherwise dead-letter and report the failure."""
        when = autoretry_delay(task, exc, msg.retries)
        if when is not None:
            await self.retry(message, queue, msg, wire, Retry(f"Retry in {when:g}s: {exc!r}", exc=exc, when=when))
            return
        await self.give_up(message, queue, msg, wire, exc)

    async def give_up(
        self, message: AbstractIncomingMessage, queue: QueueSpec, msg: TaskMessage, wire: WireMessage, exc: Exception
    ) -> None:
        """The task failed for good: fail its follow-ups, dead-letter it, report FAILURE, then ack."""
        self.worker.stats["failed"] += 1
        report = self.failure(msg, exc, format_traceback(exc))
        await self.fail_follow_ups(msg, exc, report)
        detail = f"{type(exc).__name__}: {exc}"
        copied = await self.dead_letter(message, queue, deadletter.FAILED, detail, exc=exc, settle=False)
        await self.reply(msg, wire, report)
        await self.settle_dead_lettered(message, copied)

    async def fail_follow_ups(self, msg: TaskMessage, exc: BaseException, report: ResultMessage) -> None:
        """Tell the middleware a task will never succeed: a chain's later steps, its chord and errbacks fail too.

        Called for every final failure, including tasks that never ran (unknown, revoked, expired), so a
        caller waiting on the end of a chain gets the error instead of waiting forever.
        """
        for hook in self.app.hooks("after_failure"):
            await hook(self.worker, msg, exc, report)

    def failure(self, msg: TaskMessage, exc: BaseException, traceback: str | None) -> ResultMessage:
        """The FAILURE report for ``exc``."""
        return ResultMessage(msg.id, protocol.FAILURE, encode_exception(exc), traceback=traceback,
                             date_done=protocol.now_iso(), parent_id=msg.parent_id)  # fmt: skip

    async def retry(
        self,
        message: AbstractIncomingMessage,
        queue: QueueSpec,
        msg: TaskMessage,
        wire: WireMessage,
        exc: Retry,
    ) -> None:
        """Republish the message (retries + 1) through the delay levels; ack only after the broker confirmed it.

        A retry that cannot be sent (a delay beyond the delay levels, headers too large for a frame)
        fails the task with :class:`~amqtask.errors.RetryFailedError` instead.
        """
        delay = exc.when or 0.0
        for hook in self.app.hooks("on_retry"):
            await hook(self.worker, msg, exc)
        try:
            await self._republish(queue, msg, wire, delay)
        except TRANSIENT_ERRORS:
            raise
        except AmqtaskError as error:
            failure = RetryFailedError(f"task {msg.task}[{msg.id}] could not be retried in {delay:g}s: {error}")
            failure.__cause__ = error
            await self.give_up(message, queue, msg, wire, failure)
            return
        self.worker.stats["retried"] += 1
        cause = exc.exc if exc.exc is not None else exc
        report = ResultMessage(msg.id, protocol.RETRY, encode_exception(cause), traceback=str(exc),
                               parent_id=msg.parent_id)  # fmt: skip
        await self.reply(msg, wire, report)
        self.ack(message)

    async def _republish(self, queue: QueueSpec, msg: TaskMessage, wire: WireMessage, delay: float) -> None:
        self.publisher.delay_topology.whole_seconds(delay)  # a delay beyond the levels is no date either
        eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay)
        headers = dict(_stripped(wire).headers)
        headers.update(retries=msg.retries + 1, eta=eta.isoformat())
        again = WireMessage(**{**wire.__dict__, "headers": headers})
        signing.seal(self.app.conf.signing_keys, again, signing.Kind.TASK)
        if delay > 0:
            await self.publisher.publish_delayed(again, queue, delay)
        else:
            await self.publisher.publish(again, "", queue.name)

    # ------------------------------------------------------------------------------------------ settling
    async def reply(self, msg: TaskMessage, wire: WireMessage, report: ResultMessage) -> None:
        """Report a state to the caller's reply queue and, for amqp results, the result stream (see results/)."""
        if msg.ignore_result:
            return
        keys = signing.replying_keys(self.app.conf.signing_keys, wire, signing.Kind.TASK)
        await reporting.report(self.app, self.worker.runtime, report, task=msg.task, reply_to=msg.reply_to,
                               content_type=wire.content_type, keys=keys)  # fmt: skip

    async def reply_to_unreadable(self, wire: WireMessage, exc: Exception) -> None:
        """Tell a caller whose message could not be read why, when its properties say where to answer."""
        if wire.reply_to and wire.correlation_id:
            msg = TaskMessage(task="?", id=wire.correlation_id, reply_to=wire.reply_to)
            await self.reply(msg, wire, self.failure(msg, exc, None))

    async def dead_letter(
        self, message: AbstractIncomingMessage, queue: QueueSpec, reason: str, detail: str,
        exc: BaseException | None = None, *, settle: bool = True,
    ) -> bool:  # fmt: skip
        """Copy the message, as received, into ``<queue>.dlq`` with the reason in headers; then ack it.

        Returns whether the copy is in the DLQ. With ``settle=False`` the caller settles the delivery
        (:meth:`settle_dead_lettered`) once it has sent what else the message calls for.
        """
        headers = deadletter.build(
            message.headers or {}, reason=reason, detail=detail, worker=self.worker.hostname, queue=queue.name,
            exchange=message.exchange or "", routing_key=message.routing_key or "", exc=exc,
        )  # fmt: skip
        copy = WireMessage(**{**wire_of(message).__dict__, "headers": headers})
        try:
            try:
                await self.publisher.publish(copy, "", queue.dlq_name)
            except HeadersTooLargeError:
                # The received headers plus ours exceed a frame: keep ours (the reason) and the body.
                copy.headers = deadletter.slim(headers)
                await self.publisher.publish(copy, "", queue.dlq_name)
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:  # a refusal, or a received header that cannot be sent again
            log.error("cannot dead-letter into %s (%s); rejecting so the broker's dead-lettering applies",
                      queue.dlq_name, error)  # fmt: skip
            copied = False
        else:
            copied = True
            self.worker.stats["dead_lettered"] += 1
            if reason != deadletter.FAILED:
                log.error("dead-lettered a message from %s into %s: %s: %s", queue.name, queue.dlq_name, reason, detail)
        if settle:
            await self.settle_dead_lettered(message, copied)
        return copied

    async def settle_dead_lettered(self, message: AbstractIncomingMessage, copied: bool) -> None:
        """Ack a delivery whose copy is in the DLQ; else reject it, so the queue's own dead-lettering applies."""
        if copied:
            self.ack(message)
            return
        acks = self._acks(message)
        if acks is not None:
            await acks.reject(message, requeue=False)

    def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack on the delivery's own channel, coalesced with others (``acks.py``); if that channel is gone,
        the broker redelivers instead."""
        acks = self._acks(message)
        if acks is not None:
            acks.ack(message)
        else:
            log.warning("could not ack delivery %s: its channel is gone; the broker will redeliver it",
                        message.delivery_tag)  # fmt: skip

    async def requeue_failed(self, message: AbstractIncomingMessage) -> None:
        """Requeue a failed attempt (``basic.reject``: it counts against a quorum queue's delivery limit)."""
        acks = self._acks(message)
        if acks is not None:
            await acks.reject(message, requeue=True)

    async def release(self, message: AbstractIncomingMessage) -> None:
        """Give a delivery back unprocessed (nack + requeue, which does not count against a delivery limit)."""
        acks = self._acks(message)
        if acks is not None:
            await acks.nack(message, requeue=True)

    def _acks(self, message: AbstractIncomingMessage) -> ChannelAcks | None:
        """The settler of the channel ``message`` came on; None once that channel is gone."""
        acks = self.worker.consumer.acks
        if acks is None or channel_gone(message) or message.channel is not acks.channel:
            return None
        return acks


def _stripped(wire: WireMessage) -> WireMessage:
    return WireMessage(**{**wire.__dict__, "headers": delays.strip_death_headers(dict(wire.headers))})


def default_hostname() -> str:
    """``amqtask@<host>``."""
    return f"amqtask@{socket.gethostname()}"
