"""The handle on one task's outcome: :class:`AsyncResult` (``get()`` / ``await aget()`` / ``await result``).

It reads the process's result store, which the reply-queue consumer (:mod:`amqtask.results.rpc`) feeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .. import protocol
from ..errors import AmqtaskError, TaskRevokedError
from ..failures import decode_exception
from ..protocol import READY_STATES, ResultMessage
from . import reporting, stream

if TYPE_CHECKING:
    from ..app import App

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """A handle on one task's outcome: ``get()`` / ``await aget()`` / ``await result``.

    The process that sent a task learns its states from its reply queue. Any other process reads the
    states of an ``amqp`` task (``result_backend="amqp"``, on the app or the task) from the result stream:
    the first read in a process follows the stream, later reads are memory lookups.
    """

    def __init__(
        self, id: str, app: App | None = None, *, task_name: str | None = None, sent_here: bool = False
    ) -> None:
        from ..app import current_app

        self.id = id
        self.app = app if app is not None else current_app()
        self.task_name = task_name
        self.parent: AsyncResult[Any] | None = None
        # The sender's replies come on its reply queue, as fast as over rpc: no need to follow the stream.
        self._by_stream = not sent_here and reporting.backend_of(self.app, task_name) == "amqp"
        self._sent_here = sent_here

    def __repr__(self) -> str:
        known = self.app.result_store.get(self.id)
        return f"<AsyncResult {self.id} {known.status if known is not None else protocol.PENDING}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _latest(self) -> ResultMessage | None:
        if self._by_stream:
            self.app.portal.run(self.arefresh())
        return self.app.result_store.get(self.id)

    async def arefresh(self, timeout: float | None = None) -> None:
        """Make what this process knows current; then ``state``, ``result`` and ``info`` read memory only.

        Needed only in async code reading an ``amqp`` result it did not send (sync reads do it by themselves).
        """
        if self._by_stream:
            await self.app.runtime().stream.lookup(self.id, self._timeout(timeout))

    def _timeout(self, timeout: float | None) -> float:
        return timeout if timeout is not None else self.app.conf.publish_timeout_s

    @property
    def known(self) -> bool:
        """Whether this id was sent or reported: False for an id no amqtask client sent (as an ``amqp`` task,
        with ``result_track_sent``), or whose results expired or were forgotten; ``state`` is PENDING for both.
        """
        return self._sent_here or self._latest() is not None

    def forget(self) -> None:
        """Delete the result: this process forgets it and, for ``amqp`` results, so does every reader."""
        self.app.portal.run(self.aforget())

    async def aforget(self) -> None:
        """:meth:`forget` for async code."""
        self.app.result_store.forget(self.id)
        if reporting.backend_of(self.app, self.task_name) == "amqp":
            tombstone = ResultMessage(self.id, protocol.PENDING)
            await stream.append_record(self.app.runtime().publisher, self.app.conf, tombstone, stream.FORGET)

    @property
    def state(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED: the latest state that arrived."""
        latest = self._latest()
        return latest.status if latest is not None else protocol.PENDING

    status = state

    def ready(self) -> bool:
        """Whether the task finished (successfully or not)."""
        return self.state in READY_STATES

    def successful(self) -> bool:
        """Whether the task finished successfully."""
        return self.state == protocol.SUCCESS

    def failed(self) -> bool:
        """Whether the task failed (or was revoked)."""
        return self.state in (protocol.FAILURE, protocol.REVOKED)

    @property
    def result(self) -> Any:
        """The return value, the exception of a failure, the ``meta`` of a custom state (PROGRESS), else None."""
        latest = self._latest()
        if latest is None:
            return None
        if latest.status == protocol.FAILURE:
            return decode_exception(latest.result, latest.traceback)
        return latest.result

    info = result

    @property
    def traceback(self) -> str | None:
        """The remote traceback of a failure."""
        latest = self._latest()
        return latest.traceback if latest is not None else None

    def _outcome(self, report: ResultMessage, propagate: bool) -> Any:
        if report.status == protocol.SUCCESS:
            return report.result
        error: AmqtaskError
        if report.status == protocol.REVOKED:
            error = TaskRevokedError(f"task {self.id} was revoked: {report.result}")
        else:
            error = decode_exception(report.result, report.traceback)
        if propagate:
            raise error
        return error

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the outcome: the return value, or raise the task's failure (see :class:`RemoteTaskError`)."""
        if self._by_stream:
            # Only the stream's recent window: an older record, if any, resolves the wait when the history
            # (read in the background) reaches it.
            await self.app.runtime().stream.follow(self._timeout(timeout))
        latest = self.app.result_store.get(self.id)
        if not self._by_stream and (latest is None or latest.status not in READY_STATES):
            # The reply may still be on its way into this process's reply queue: make sure this loop consumes it
            # (a runtime closed since the task was sent, e.g. by a stopped worker, would otherwise never see it).
            await self.app.runtime().results.ensure_started(timeout)
        report = await self.app.result_store.wait(self.id, timeout)
        return self._outcome(report, propagate)  # type: ignore[no-any-return]

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Block until the outcome is known; like :meth:`aget` for synchronous code."""
        if not self._by_stream and not _on_event_loop():
            # The reply often arrives before ``delay()`` returns (its confirm can wait for the worker's
            # ack): an outcome already here is read from the thread-safe store, without a trip
            # through the portal's loop and back. (On an event loop the portal refuses the call, always.)
            latest = self.app.result_store.get(self.id)
            if latest is not None and latest.status in READY_STATES:
                return self._outcome(latest, propagate)  # type: ignore[no-any-return]
        return self.app.portal.run(self.aget(timeout, propagate))

    def wait(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Alias of :meth:`get` (Celery has both)."""
        return self.get(timeout, propagate)

    def __await__(self) -> Generator[Any, None, R]:
        return self.aget().__await__()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


__all__ = ["AsyncResult"]
