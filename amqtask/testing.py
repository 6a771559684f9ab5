"""Helpers for your own unit tests: run tasks inline, without a broker.

``with eager(app): add.delay(2, 2).get()`` runs ``add`` in the calling process and returns its
result through the usual :class:`~amqtask.AsyncResult` API, so code that sends tasks can be unit
tested without RabbitMQ. Eager mode checks what a worker would: the task must be registered, and
its arguments and result must be encodable by the task's serializer. It does not emulate the broker
(no routing, delays, retries or acks); test those against a real broker, as amqtask's own tests do.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import protocol, serializers
from .failures import encode_exception, format_traceback
from .protocol import ResultMessage
from .results import AsyncResult
from .task import Request, Task, current_request

if TYPE_CHECKING:
    from .app import App


@contextlib.contextmanager
def eager(app: App, *, propagate: bool = False) -> Iterator[App]:
    """Within the block, every send of ``app`` runs the task inline.

    With ``propagate=True`` a task's exception is raised by ``delay()`` itself; otherwise it is
    raised by ``get()``, as it would be after a worker ran the task.
    """

    async def run_inline(
        name: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task: Task[Any, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        task = task or app.get_task(name)
        name_of_codec = options.get("serializer") or task.options.get("serializer") or app.conf.task_serializer
        codec = serializers.codec(name_of_codec)
        call_args, call_kwargs = list(args or ()), dict(kwargs or {})
        serializers.encode([call_args, call_kwargs], codec)
        task_id = options.get("task_id") or str(uuid.uuid4())
        token = current_request.set(Request(id=task_id, task=name, args=call_args, kwargs=call_kwargs))
        try:
            value = task(*call_args, **call_kwargs)
            if inspect.isawaitable(value):
                value = await value
            serializers.encode(value, codec)
            report = ResultMessage(task_id, protocol.SUCCESS, value, date_done=protocol.now_iso())
        except Exception as exc:
            if propagate:
                raise
            report = ResultMessage(task_id, protocol.FAILURE, encode_exception(exc), traceback=format_traceback(exc),
                                   date_done=protocol.now_iso())  # fmt: skip
        finally:
            current_request.reset(token)
        app.result_store.put(report)
        return AsyncResult(task_id, app, task_name=name)

    app.asend_task = run_inline  # type: ignore[method-assign]
    try:
        yield app
    finally:
        del app.asend_task
