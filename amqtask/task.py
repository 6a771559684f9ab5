"""Tasks: the ``@app.task`` decorator's product, its options, its request context and the ways to send it.

A :class:`Task` wraps a plain or ``async`` function. Calling it runs the function locally; ``delay`` /
``apply_async`` send it to a worker (``adelay`` / ``aapply_async`` from async code). Options are checked
when the task is declared: an unknown option or a wrong type fails at import time, not at 3 a.m.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature
    from .results import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")

#: Options ``@app.task(...)`` accepts, with the type each must have (None means any).
TASK_OPTIONS: dict[str, type | tuple[type, ...] | None] = {
    "name": str,
    "queue": str,
    "exchange": str,
    "routing_key": str,
    "priority": int,
    "ignore_result": bool,
    "serializer": str,
    "bind": bool,
    "max_retries": (int, type(None)),
    "default_retry_delay": (int, float),
    "autoretry_for": tuple,
    "dont_autoretry_for": tuple,
    "retry_kwargs": dict,
    "retry_backoff": (bool, int, float),
    "retry_backoff_max": (int, float),
    "retry_jitter": bool,
    "time_limit": (int, float),
    "soft_time_limit": (int, float),
    "expires": (int, float, dt.timedelta, dt.datetime),
    "track_started": bool,
}

#: Options ``apply_async`` accepts.
CALL_OPTIONS = frozenset(
    {
        "countdown", "eta", "expires", "priority", "queue", "exchange", "routing_key", "task_id", "headers",
        "serializer", "ignore_result", "link", "link_error", "time_limit", "soft_time_limit", "shadow",
        "retries", "parent_id", "root_id", "group_id", "group_index", "chain", "chord", "reply_to",
    }
)  # fmt: skip


def check_task_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``@app.task`` options, naming the task and the option in any error."""
    for key, value in options.items():
        if key not in TASK_OPTIONS:
            raise ConfigurationError(f"task {name!r}: unknown option {key!r}")
        kind = TASK_OPTIONS[key]
        if kind is not None and value is not None and not isinstance(value, kind):
            raise ConfigurationError(f"task {name!r}: option {key!r} has the wrong type ({value!r})")
    if "priority" in options and not 0 <= options["priority"] <= 255:
        raise ConfigurationError(f"task {name!r}: priority must be 0..255")
    return dict(options)


@dataclass
class Request:
    """What a running task knows about its message (``self.request`` in a ``bind=True`` task)."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_info: dict[str, Any] = field(default_factory=dict)
    hostname: str | None = None
    origin: str | None = None
    is_eager: bool = True
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None


current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar("amqtask_request", default=None)


class Task(Generic[P, R]):
    """A registered task. Generic over its parameters and return type, so ``add.delay(1, "x")`` type-checks."""

    def __init__(self, app: App, fn: Callable[..., Any], name: str, options: Mapping[str, Any]) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = dict(options)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.bind = bool(options.get("bind", False))
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    @property
    def request(self) -> Request:
        """The request of the run in progress (an empty, eager request outside a worker)."""
        return current_request.get() or Request(task=self.name)

    @property
    def max_retries(self) -> int | None:
        """How many retries this task gets (``None``: unlimited)."""
        return self.options.get("max_retries", self.app.conf.task_max_retries)  # type: ignore[no-any-return]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the task here and now, in this process (a coroutine for ``async def`` tasks)."""
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def route_options(self) -> dict[str, Any]:
        """The routing options declared on the task."""
        return {k: self.options[k] for k in ("queue", "exchange", "routing_key") if k in self.options}

    # ------------------------------------------------------------------------------------------ sending
    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments; returns once the broker confirmed the message."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """:meth:`delay` for async code."""
        return await self.aapply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """Send the task with options (countdown, eta, expires, priority, queue, routing_key, exchange, ...)."""
        return self.app.portal.run(self.aapply_async(args, kwargs, **options))

    async def aapply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """:meth:`apply_async` for async code."""
        return await self.app.asend_task(self.name, args, kwargs, task=self, **options)

    # ------------------------------------------------------------------------------------------ canvas
    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task with partial arguments (the parent's result is prepended in a chain)."""
        from .canvas import Signature

        return Signature(self.name, args, kwargs, app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: it ignores the parent's result in a chain."""
        from .canvas import Signature

        return Signature(self.name, args, kwargs, immutable=True, app=self.app)

    def signature(
        self, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A signature with options, like Celery's ``task.signature(args, kwargs, **options)``."""
        from .canvas import Signature

        return Signature(self.name, args or (), kwargs or {}, options=options, app=self.app)

    # ------------------------------------------------------------------------------------------ retries
    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Ask the worker to run this task again later; raises :class:`~amqtask.errors.Retry` to unwind the task.

        The worker republishes the message (retries + 1) through the broker's delay levels, waits for
        the broker's confirm, and only then acks the current delivery. After ``max_retries`` the original
        exception (or :class:`~amqtask.errors.MaxRetriesExceededError`) is raised instead.
        """
        from .retry import request_retry

        return request_retry(self, exc=exc, countdown=countdown, eta=eta, max_retries=max_retries, **options)
