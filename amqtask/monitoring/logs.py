"""Worker logs: Celery's per-task lines at INFO, task fields on every record a task causes, JSON lines.

:class:`TaskLogMiddleware` writes ``Task tasks.add[<id>] received``, ``... succeeded in 0.004s: 8``,
``... failed: ValueError('x')`` (with the traceback) and ``... retry in 10s: ...``, as a Celery worker does.
While a delivery is handled, a context variable holds its task's fields; the worker runs the task in
that context (the executor copies it into the task's thread), so :class:`TaskFields`, a filter on the
handlers, adds ``task_id``, ``task_name``, ``retries``, ``worker`` and ``queue`` to every record emitted
meanwhile, the task's own ``logging`` calls included. :class:`JsonFormatter` writes one object per line.

:func:`configure_logging` sets this up for the CLI (``--log-format json`` or ``worker_log_format``);
an application that embeds a worker can call it too, or add the filter to its own handlers.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import TaskRevokedError
from ..middleware import Middleware, current_queue
from ..protocol import short_repr

if TYPE_CHECKING:
    from ..app import App
    from ..errors import Retry
    from ..protocol import ResultMessage, TaskMessage, WireMessage
    from ..worker.worker import Worker

log = logging.getLogger("amqtask.worker")
FORMATS = ("text", "json")
TEXT_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"
TASK_FIELDS = ("task_id", "task_name", "queue", "retries", "worker")
#: aiormq's own line for each failed connection attempt; amqtask.connection logs the same attempt once, with a hint.
_AIORMQ_DUPLICATES = ("error when creating transport",)


class TaskContext(NamedTuple):
    """What the log records of one task carry (a tuple: built for every task, it must be cheap)."""

    task_id: str
    task_name: str
    retries: int
    worker: str
    started: float


task_context: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("amqtask_task_log", default=None)


class TaskLogMiddleware(Middleware):
    """Celery's INFO lines for each task, and the task context for :class:`TaskFields`.

    The INFO lines' hooks are not awaited at all while ``amqtask.worker`` logs above INFO (``-l warning``);
    ``before_process`` (the context, for the fields of any record a task causes) and ``after_failure``
    (an ERROR line) always are.
    """

    def wants(self, hook: str, app: App) -> bool:
        return hook in ("before_process", "after_failure") or log.isEnabledFor(logging.INFO)

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        # Set in the delivery's own asyncio task: it ends with the delivery, so nothing leaks to the next.
        task_context.set(TaskContext(message.id, message.task, message.retries, worker.hostname, time.perf_counter()))
        log.info("Task %s[%s] received", message.task, message.id)

    async def after_success(self, worker: Worker, message: TaskMessage, value: Any, report: ResultMessage) -> None:
        context = task_context.get()
        runtime = time.perf_counter() - context.started if context is not None else 0.0
        if log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] succeeded in %.3fs: %s", message.task, message.id, runtime, short_repr(value))

    async def after_failure(
        self, worker: Worker, message: TaskMessage, exc: BaseException, report: ResultMessage
    ) -> None:
        # Unknown, revoked and expired tasks are logged where they are refused, once; only a run is logged here.
        if task_context.get() is not None and not isinstance(exc, TaskRevokedError):
            log.error("Task %s[%s] failed: %r", message.task, message.id, exc, exc_info=exc)

    async def on_retry(self, worker: Worker, message: TaskMessage, retry: Retry) -> None:
        cause = retry.exc if retry.exc is not None else retry
        log.info("Task %s[%s] retry in %gs: %r", message.task, message.id, retry.when or 0, cause)


class TaskFields(logging.Filter):
    """Adds the running task's fields to each record (``None`` outside a task); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = task_context.get()
        if context is not None:
            values: tuple[Any, ...] = (
                context.task_id, context.task_name, current_queue.get(), context.retries, context.worker
            )  # fmt: skip
        else:
            values = (None,) * len(TASK_FIELDS)
        for name, value in zip(TASK_FIELDS, values, strict=True):
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the task fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in TASK_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _QuietAiormq(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_AIORMQ_DUPLICATES)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``text`` or ``json`` form, task fields added, aiormq's duplicates dropped."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(TaskFields())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiormq.connection").addFilter(_QuietAiormq())


__all__ = ["FORMATS", "JsonFormatter", "TaskContext", "TaskFields", "TaskLogMiddleware", "configure_logging"]
