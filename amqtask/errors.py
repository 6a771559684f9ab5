"""The exception tree of amqtask: everything it raises derives from :class:`AmqtaskError`.

aio-pika and aiormq errors are translated at the boundary (``connection.py``, ``topology.py``),
so users never import aio-pika to catch an error.
"""

from __future__ import annotations

import builtins
from typing import Any


class AmqtaskError(Exception):
    """Root of every error amqtask raises."""


class ConfigurationError(AmqtaskError):
    """A setting, task option or argument is invalid; the message names it."""


class DelayRangeError(ConfigurationError):
    """A delay the broker's delay levels cannot hold: longer than their range, or not a finite number."""


class MisuseError(AmqtaskError):
    """The API was called in a way it does not support (e.g. a sync call inside a running loop)."""


class BrokerConnectionError(AmqtaskError):
    """The broker could not be reached, or the connection was lost while an operation was under way."""


class PublishError(AmqtaskError):
    """A message was not confirmed by the broker: nacked, returned as unroutable, or the link dropped."""


class UnroutableError(PublishError):
    """A mandatory publish reached no queue (the broker returned it)."""


class TopologyError(AmqtaskError):
    """The broker refused a declaration."""


class TopologyMismatchError(TopologyError):
    """An exchange or queue exists with other arguments than the app wants."""

    def __init__(self, kind: str, name: str, existing: Any, wanted: Any, detail: str = "", hint: str = "") -> None:
        self.kind = kind
        self.name = name
        self.existing = existing
        self.wanted = wanted
        self.detail = detail
        self.hint = hint
        text = f"{kind} {name!r} already exists with other arguments: existing={existing!r}, wanted={wanted!r}"
        if detail:
            text += f" (broker said: {detail})"
        if hint:
            text += f"; {hint}"
        super().__init__(text)


class TopologyNotFoundError(TopologyError):
    """An exchange or queue that was expected to exist does not."""


class SerializationError(AmqtaskError):
    """A body could not be encoded or decoded; keeps the raw body and the cause."""

    def __init__(self, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.body = body


class ContentDisallowedError(SerializationError):
    """The message's content type is not in ``accept_content``."""


class MessageError(AmqtaskError):
    """A task message is malformed: missing or ill-typed headers, bad body shape, bad dates."""


class TaskNotRegisteredError(AmqtaskError):
    """A message names a task this worker does not know."""


class NotRegistered(Exception):
    """What a worker reports to the caller of a task it does not know (Celery's name, which its callers look for)."""


class TimeoutError(AmqtaskError, builtins.TimeoutError):
    """A result did not arrive within the given time.

    Also the builtin ``TimeoutError`` (which, from Python 3.11 on, ``asyncio.TimeoutError`` and
    ``concurrent.futures.TimeoutError`` are), so ``except TimeoutError`` in caller code catches it. Like
    the builtin, it is an ``OSError``: inside the worker it counts as transient (``worker/triage.py``).
    """


class TimeLimitExceeded(AmqtaskError):
    """A task ran longer than its hard time limit (``time_limit``)."""


class SoftTimeLimitExceeded(AmqtaskError):
    """Raised inside a task that ran longer than its soft time limit (``soft_time_limit``): catch it to clean up."""


class TaskRevokedError(AmqtaskError):
    """The task was revoked or expired before it ran."""


class RemoteTaskError(AmqtaskError):
    """A task failed on a worker. Keeps the original exception's type name, module, arguments and traceback.

    ``get()`` raises an instance of a dynamically built subclass named like the original exception
    (``ValueError`` for a ``ValueError``), which also derives from the builtin of that name when there is
    one, so ``except ValueError`` works on the caller's side.
    """

    exc_type: str = "RemoteTaskError"
    exc_module: str = ""

    def __init__(self, *args: Any, remote_traceback: str | None = None) -> None:
        super().__init__(*args)
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if len(self.args) == 1:
            return str(self.args[0])
        return super().__str__()


class ControlFlow(Exception):
    """Base of exceptions task code raises to steer what the worker does with a delivery."""


class Retry(ControlFlow):
    """Raised by ``Task.retry()``: the message was republished for a later attempt."""

    def __init__(self, message: str = "", exc: BaseException | None = None, when: float | None = None) -> None:
        super().__init__(message)
        self.exc = exc
        self.when = when


class Reject(ControlFlow):
    """Raise from a task to dead-letter its message without running it again."""

    def __init__(self, reason: str = "", requeue: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requeue = requeue


class Revoked(ControlFlow):
    """Raised by middleware in ``before_process``: the task was revoked; ack it and report REVOKED unrun."""

    def __init__(self, reason: str = "revoked") -> None:
        super().__init__(reason)
        self.reason = reason


class RetryFailedError(AmqtaskError):
    """A retry the task asked for cannot be sent (its delay is beyond the delay levels, its headers too
    large for a frame): the task fails with this error instead, its cause chained."""


class RequeueLimitError(AmqtaskError):
    """A task asked for its message to be requeued (``Reject(requeue=True)``) more often than
    ``task_requeue_limit`` allows: the message is dead-lettered with this error instead."""


class MaxRetriesExceededError(AmqtaskError):
    """``Task.retry()`` was called after the task used up its retries."""
