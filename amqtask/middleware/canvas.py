"""The worker's side of canvas: when a task finishes, publish what its message's ``embed`` asks for next.

On success: the ``link`` callbacks and the next chain step, each with the result prepended (the step
with ``parent_id`` = this task and ``embed.chain`` = the rest), and, for a chord header task, its part
of the chord (:mod:`amqtask.chords`), which may complete the chord and publish the body.

On final failure: the ``link_error`` errbacks, called with the failed task's id first. That is Celery's
task-id convention; Celery calls errbacks that accept ``(request, exc, traceback)`` in the failing
worker's process instead, which does not work across processes, so amqtask always sends the task id.
Every chain step that will now never run gets a FAILURE reply with the task's error, sent to the step's
own ``reply_to``, so ``get()`` on a chain (its last step) raises it. A chord the task (or one of those
steps) belonged to fails: its body gets the FAILURE at once, and the body's errbacks run once, when the
last header task has finished.

Everything is published and confirmed before the hook returns, so before the delivery is acked: a
worker killed in between runs the task again rather than losing a follow-up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import canvas, protocol, serializers
from ..chords import ChordKeeper, Part
from ..errors import AmqtaskError, ConfigurationError, MessageError, SerializationError, TopologyError, UnroutableError
from ..failures import encode_exception
from ..protocol import ResultMessage, TaskMessage
from ..results import reporting
from . import Middleware

if TYPE_CHECKING:
    from ..app import App
    from ..worker.worker import Worker

log = logging.getLogger("amqtask.canvas")
#: Errors of publishing a follow-up that no retry fixes: a value the codec cannot carry, a step routed
#: nowhere, bad options in a step.
_UNSENDABLE = (SerializationError, UnroutableError, ConfigurationError, TopologyError)


class CanvasMiddleware(Middleware):
    """Publishes callbacks, errbacks, chain steps and chord bodies; fails what a failure makes unreachable."""

    def __init__(self) -> None:
        self.chords = ChordKeeper()

    async def after_success(self, worker: Worker, message: TaskMessage, value: Any, report: ResultMessage) -> None:
        """Send the callbacks and the next chain step; record a chord part."""
        if not (message.callbacks or message.chain or message.chord is not None):
            return  # a plain task, most of them: nothing to do on this hot path
        callbacks = follow_ups(worker.app, message, message.callbacks, [value])
        if await _send(worker, message, callbacks, "link callbacks") is not None:
            callbacks = []
        steps: list[canvas.Send] = []
        if message.chain:
            rest = list(message.chain)
            steps = follow_ups(worker.app, message, [rest.pop()], [value], rest)
            error = await _send(worker, message, steps, "next chain step")
            if error is not None:
                steps = []  # the chain ends here, failed: its later steps will never run
                await self._unreachable(worker, message, message.chain, _failure(error))
        report.children.extend([[send.id, None], None] for send in [*callbacks, *steps])
        if message.chord is not None:
            await self._chord_part(worker, message, message.chord, protocol.SUCCESS, value)

    async def after_failure(
        self, worker: Worker, message: TaskMessage, exc: BaseException, report: ResultMessage
    ) -> None:
        """Send the errbacks; fail the rest of the chain and the chord the task belonged to."""
        await _send(worker, message, follow_ups(worker.app, message, message.errbacks, [message.id]), "errbacks")
        await self._unreachable(worker, message, message.chain or [], report)
        if message.chord is not None:
            await self._chord_part(worker, message, message.chord, protocol.FAILURE, report.result, report.traceback)

    async def on_worker_stop(self, worker: Worker) -> None:
        """Close the chord bookkeeping's channel."""
        await self.chords.close()

    # ------------------------------------------------------------------------------------------ failures
    async def _unreachable(
        self, worker: Worker, message: TaskMessage, signatures: Iterable[Mapping[str, Any]], report: ResultMessage
    ) -> None:
        """FAILURE replies for every task in ``signatures``; chords they belong to fail too."""
        for sig in (task for value in signatures for task in canvas.task_signatures(value)):
            options = sig.options
            if options.get("task_id"):
                await _report_failure(worker, message, sig.task, options["task_id"], options.get("reply_to"), report)
            if isinstance(options.get("chord"), Mapping):
                member = TaskMessage(task=sig.task, id=str(options.get("task_id")), group=options.get("group_id"),
                                     group_index=options.get("group_index"), root_id=message.root_id,
                                     reply_to=options.get("reply_to"), serializer=message.serializer)  # fmt: skip
                await self._chord_part(
                    worker, member, options["chord"], protocol.FAILURE, report.result, report.traceback
                )

    # ------------------------------------------------------------------------------------------ chords
    async def _chord_part(
        self, worker: Worker, member: TaskMessage, body: Mapping[str, Any], status: str, result: Any,
        traceback: str | None = None,
    ) -> None:  # fmt: skip
        """Record ``member``'s outcome as its part of the chord whose body is ``body``; complete the chord if it can."""
        try:
            size = canvas.chord_size(body)
            if member.group is None or member.group_index is None:
                raise MessageError(f"chord member {member.id} has no group id or group index")
        except MessageError as exc:
            log.error("task %s[%s]: %s", member.task, member.id, exc)
            await self._unreachable(worker, member, [body], _failure(exc))
            return
        group_id, part = member.group, Part(member.group_index, member.id, status, result, traceback)
        if part.status != protocol.SUCCESS:
            # Tell the caller at once; the body's errbacks wait for the chord's completion (they run once).
            await self._unreachable(worker, member, [body], _report(part))
        try:
            await self.chords.record(worker.runtime, group_id, part)
        except SerializationError as exc:
            part = Part(part.group_index, part.task_id, protocol.FAILURE, encode_exception(exc))
            await self._unreachable(worker, member, [body], _report(part))
            await self.chords.record(worker.runtime, group_id, part)

        async def finish(parts: list[Part]) -> None:
            await self._finish(worker, member, body, parts)

        outcome = await self.chords.complete(worker.runtime, group_id, size, finish)
        log.debug("chord %s after part %d of %d: %s", group_id, part.group_index, size, outcome.value)

    async def _finish(self, worker: Worker, member: TaskMessage, body: Mapping[str, Any], parts: list[Part]) -> None:
        """Publish the body with the results in group order; or, when a part failed, run its errbacks."""
        app = worker.app
        failed = next((part for part in parts if part.status != protocol.SUCCESS), None)
        if failed is None:
            values = [part.result for part in parts]
            sends = follow_ups(app, member, [body], [values])
            error = await _send(worker, member, sends, "chord body")
            if error is not None:
                await self._unreachable(worker, member, [body], _failure(error))
            return
        await self._unreachable(worker, member, [body], _report(failed))
        first = next(canvas.task_signatures(body), None)
        if first is not None and first.id is not None:
            failed_body = TaskMessage(task=first.task, id=first.id, root_id=member.root_id, reply_to=member.reply_to,
                                      serializer=member.serializer)  # fmt: skip
            errbacks = follow_ups(app, failed_body, first.options.get("link_error"), [first.id])
            await _send(worker, failed_body, errbacks, "errbacks")


def follow_ups(
    app: App, message: TaskMessage, signatures: Iterable[Mapping[str, Any]] | None, args: list[Any],
    rest: list[dict[str, Any]] | None = None,
) -> list[canvas.Send]:  # fmt: skip
    """The messages applying ``signatures`` as follow-ups of ``message`` (a malformed one is logged, skipped).

    Used by the worker's canvas middleware and by eager mode alike.
    """
    sends: list[canvas.Send] = []
    for value in signatures or ():
        try:
            sends += canvas.follow_up(app, value, args, reply_to=message.reply_to, parent_id=message.id,
                                      root_id=message.root_id, rest=rest, serializer=message.serializer)  # fmt: skip
        except AmqtaskError as exc:
            log.error("task %s[%s]: cannot apply follow-up %s: %s", message.task, message.id,
                      str(dict(value))[:200], exc)  # fmt: skip
    return sends


async def _send(worker: Worker, message: TaskMessage, sends: list[canvas.Send], what: str) -> Exception | None:
    """Publish follow-ups of ``message``; return (and log) an error that sending again would not fix.

    Other errors (the broker unreachable past ``publish_timeout_s``) propagate: the delivery is then not
    acked, and the task runs again once the broker is back.
    """
    try:
        await canvas.publish(worker.app, sends, from_client=False)
    except _UNSENDABLE as exc:
        log.error("task %s[%s]: cannot send its %s: %s", message.task, message.id, what, exc)
        return exc
    return None


def _failure(exc: BaseException) -> ResultMessage:
    return ResultMessage("", protocol.FAILURE, encode_exception(exc), date_done=protocol.now_iso())


def _report(part: Part) -> ResultMessage:
    return ResultMessage(part.task_id, part.status, part.result, part.traceback, date_done=protocol.now_iso())


async def _report_failure(
    worker: Worker, message: TaskMessage, task: str, task_id: str, reply_to: str | None, report: ResultMessage
) -> None:
    """A FAILURE report for a task that will never run, carrying the error that stopped it.

    Encoded like the replies to ``message``, the task that failed: in the caller's own encoding. It goes where
    the task's own reports would (its ``reply_to``, the result stream for ``amqp`` results).
    """
    failure = ResultMessage(task_id, protocol.FAILURE, report.result, report.traceback, date_done=protocol.now_iso())
    content_type = serializers.codec(message.serializer or "json").content_type
    await reporting.report(worker.app, worker.runtime, failure, task=task, reply_to=reply_to,
                           content_type=content_type)  # fmt: skip


__all__ = ["CanvasMiddleware"]
