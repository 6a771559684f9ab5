"""The :class:`App`: settings, the task registry, and the per-event-loop broker runtime that sends tasks.

Sync and async callers share one implementation, the async one. Each event loop that sends tasks
gets its own :class:`Runtime` (connection, publisher, result consumer), because aio-pika objects are
bound to the loop that created them; synchronous callers use the app's :class:`~amqtask.portal.Portal`
loop. All runtimes of a process share one reply queue and one result store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar, overload

from . import loops, protocol, serializers
from .connection import Broker
from .discovery import TaskDiscovery
from .errors import ConfigurationError, MisuseError, TaskNotRegisteredError
from .middleware import Middleware
from .middleware.defaults import default_middleware
from .middleware.hooks import Hooks
from .portal import Portal, register_exit
from .producer import Publisher
from .remote import Control
from .results import AsyncResult, ResultConsumer, ResultStore, new_reply_queue_name
from .results.stream import StreamReader
from .routing import Route, Router
from .sending import BrokerSender, Outgoing, Sender
from .settings import Settings
from .task import CALL_OPTIONS, Task, check_task_options

if TYPE_CHECKING:
    from .beat.entries import Entry, ScheduleLike

P = ParamSpec("P")
R = TypeVar("R")


class _TaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class _BoundTaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], R], /) -> Task[P, R]: ...


_default_app: App | None = None
CLOSE_TIMEOUT_S = 5.0


def current_app() -> App:
    """The most recently created app (what ``AsyncResult(id)`` uses when no app is given)."""
    if _default_app is None:
        raise MisuseError("no amqtask App has been created yet; pass app= explicitly")
    return _default_app


@dataclass
class Runtime:
    """The broker objects of one event loop."""

    broker: Broker
    publisher: Publisher
    results: ResultConsumer
    stream: StreamReader


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _absolute(value: Any, now: dt.datetime, option: str) -> dt.datetime | None:
    """A countdown/expires given as seconds, timedelta or datetime, as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return _utc(value)
    if isinstance(value, dt.timedelta):
        return now + value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return now + dt.timedelta(seconds=value)
    raise ConfigurationError(f"{option} must be seconds, a timedelta or a datetime, got {value!r}")


class App:
    """An amqtask application: ``App("tasks", broker="amqp://...")``."""

    def __init__(
        self, main: str = "amqtask", broker: str | list[str] | None = None, *,
        task_cls: type[Task[Any, Any]] | None = None, **settings: Any,
    ) -> None:  # fmt: skip
        """``task_cls``: the class of the app's tasks (``amqtask.contrib.django.DjangoTask`` in Django projects)."""
        global _default_app
        self.main = main
        self.task_cls: type[Task[Any, Any]] = task_cls or Task
        self.discovery = TaskDiscovery(self)
        self.conf = Settings()
        self.conf.from_env()
        if broker is not None:
            settings["broker_url"] = broker
        self.conf.update(settings)
        self.tasks: dict[str, Task[Any, Any]] = {}
        # Looked up when the portal starts its loop, so that a later conf.update(event_loop=...) counts.
        self.portal = Portal(main, lambda: loops.loop_factory(self.conf.event_loop)())
        self.middleware: list[Middleware] = default_middleware()
        #: The per-message hooks of ``middleware`` worth awaiting (see ``middleware/hooks.py``).
        self.hooks = Hooks(self)
        #: Where every built task message goes (:mod:`amqtask.sending`); ``testing.eager`` swaps it.
        self.sender: Sender = BrokerSender()
        self._runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = weakref.WeakKeyDictionary()
        self._runtime_lock = threading.Lock()
        self._reply_queue: tuple[int, str] | None = None
        self._router: tuple[tuple[int, int, str, Any], Router] | None = None
        register_exit(self.portal, self._close_portal_runtime)
        _default_app = self

    def __repr__(self) -> str:
        return f"<App {self.main}>"

    def config_from_object(self, source: object | str | dict[str, Any], namespace: str | None = None) -> None:
        """Load settings from a module, dotted module path, object or dict (see :meth:`Settings.from_object`)."""
        self.conf.from_object(source, namespace=namespace)

    # ------------------------------------------------------------------------------------------ tasks
    # Typing: an ``async def`` task's result is what its coroutine returns, and a ``bind=True`` task's
    # first parameter (the task itself) is not part of what callers pass.
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, /, *, bind: Literal[True], **options: Any) -> _BoundTaskDecorator: ...

    @overload
    def task(self, /, **options: Any) -> _TaskDecorator: ...

    def task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Register a function (plain or ``async def``) as a task; usable bare or with options."""

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            name = options.get("name") or f"{func.__module__}.{func.__qualname__}"
            checked = check_task_options(name, options)
            if "serializer" in checked:
                serializers.codec(checked["serializer"])
            task: Task[Any, Any] = self.task_cls(self, func, name, checked)
            self.tasks[name] = task
            return task

        return register(fn) if fn is not None else register

    def autodiscover_tasks(self, packages: list[str] | None = None, related_name: str = "tasks") -> None:
        """Import ``<package>.<related_name>`` of each package (by default every installed Django app) once
        a worker starts, not now: Django may not be set up yet when the app module is imported."""
        self.discovery.add(packages, related_name)

    def import_task_modules(self) -> None:
        """Import the modules that define tasks: settings ``imports`` and ``include``, then autodiscovery."""
        self.discovery.run()

    def get_task(self, name: str) -> Task[Any, Any]:
        """The registered task called ``name``."""
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotRegisteredError(f"task {name!r} is not registered in app {self.main!r}") from None

    @property
    def router(self) -> Router:
        """The routing rules, rebuilt whenever the routing settings change."""
        key = (id(self.conf.task_queues), id(self.conf.task_routes), self.conf.task_default_queue,
               self.conf.task_default_exchange)  # fmt: skip
        if self._router is None or self._router[0] != key:
            self._router = (key, Router(self.conf))
        return self._router[1]

    @functools.cached_property
    def result_store(self) -> ResultStore:
        """The results this process knows (its replies, and amqp results it read), bounded as the settings say."""
        return ResultStore(max_bytes=self.conf.result_store_max_bytes, ttl_s=self.conf.result_expires_s)

    @functools.cached_property
    def control(self) -> Control:
        """Remote control of the workers: ``app.control.ping()``, ``.inspect().stats()``, ``.revoke(id)``."""
        return Control(self)

    # ------------------------------------------------------------------------------------------ beat
    @functools.cached_property
    def periodic_entries(self) -> dict[str, Entry]:
        """Entries registered in code for ``amqtask beat`` (it merges them over ``conf.beat_schedule``)."""
        return {}

    def add_periodic_task(
        self, schedule: ScheduleLike, target: Any, *, name: str | None = None,
        args: tuple[Any, ...] | list[Any] | None = None, kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None, catch_up: str = "once",
    ) -> Entry:  # fmt: skip
        """Have ``amqtask beat`` send ``target`` (a task, task name or signature) on ``schedule``.

        ``schedule``: a ``crontab``/``interval``, a timedelta, seconds, or a cron string. The entry is
        named ``name`` (default: the task name); see :func:`amqtask.beat.entries.add_periodic_task`.
        """
        from .beat.entries import add_periodic_task

        return add_periodic_task(
            self, schedule, target, name=name, args=args, kwargs=kwargs, options=options, catch_up=catch_up
        )

    def periodic_task(
        self, schedule: ScheduleLike, *, args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None, options: dict[str, Any] | None = None, catch_up: str = "once",
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:  # fmt: skip
        """Decorator: register a task (``task_options`` as for :meth:`task`) and send it on ``schedule``."""

        def register(fn: Callable[P, R]) -> Task[P, R]:
            task: Task[P, R] = self.task(**task_options)(fn)
            self.add_periodic_task(schedule, task, args=args, kwargs=kwargs, options=options, catch_up=catch_up)
            return task

        return register

    # ------------------------------------------------------------------------------------------ runtime
    @property
    def reply_queue(self) -> str:
        """This process's reply queue (a new one after fork)."""
        pid = os.getpid()
        if self._reply_queue is None or self._reply_queue[0] != pid:
            self._reply_queue = (pid, new_reply_queue_name())
        return self._reply_queue[1]

    def runtime(self) -> Runtime:
        """The broker runtime of the running event loop (created on first use)."""
        loop = asyncio.get_running_loop()
        with self._runtime_lock:
            found = self._runtimes.get(loop)
            if found is None or found.broker.settings is not self.conf:
                self._forget_ended_loops()
                broker = Broker(self.conf, name=f"{self.main}-{os.getpid()}")
                publisher = Publisher(broker, self.conf)
                found = Runtime(
                    broker,
                    publisher,
                    ResultConsumer(broker, self.conf, self.reply_queue, self.result_store),
                    StreamReader(broker, publisher, self.conf, self.result_store),
                )
                self._runtimes[loop] = found
            return found

    def _forget_ended_loops(self) -> None:
        """Drop the runtimes of event loops that closed without :meth:`aclose` (``asyncio.run`` after ``asyncio.run``).

        Such a runtime can never be used again, but its connection refers to its loop, so the weak key
        alone never lets it go: each ended loop would keep a broker, its buffers and its socket.
        """
        for ended in [loop for loop in self._runtimes if loop.is_closed()]:
            del self._runtimes[ended]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[App]:
        """Connect on entry and close on exit, on the running event loop: an ASGI app's lifespan.

        ``async with app.lifespan(): yield`` in FastAPI's/Starlette's lifespan opens the connection
        and the reply consumer at startup (the first request does not pay for them; a broker that is
        down fails the startup) and closes them at shutdown.
        """
        runtime = self.runtime()
        await runtime.broker.connection(self.conf.broker_connect_timeout_s)
        await runtime.results.ensure_started(self.conf.publish_timeout_s)
        try:
            yield self
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connections of the running event loop's runtime."""
        loop = asyncio.get_running_loop()
        with self._runtime_lock:
            runtime = self._runtimes.pop(loop, None)
        if runtime is not None:
            # Closing channels on a connection that is down can wait for an answer that never comes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runtime.results.close(), CLOSE_TIMEOUT_S)
                await asyncio.wait_for(runtime.stream.close(), CLOSE_TIMEOUT_S)
                await asyncio.wait_for(runtime.publisher.close(), CLOSE_TIMEOUT_S)
            await runtime.broker.close()

    def close(self) -> None:
        """Close the connections the synchronous API opened."""
        self.portal.stop(self._close_portal_runtime())

    async def _close_portal_runtime(self) -> None:
        await self.aclose()

    # ------------------------------------------------------------------------------------------ sending
    def send_task(
        self, name: str, args: tuple[Any, ...] | list[Any] | None = None, kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:  # fmt: skip
        """Send a task by name (it need not be registered here); returns after the broker confirmed it."""
        return self.portal.run(self.asend_task(name, args, kwargs, **options))

    async def asend_task(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task: Task[Any, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """:meth:`send_task` for async code."""
        unknown = set(options) - CALL_OPTIONS
        if unknown:
            raise ConfigurationError(f"apply_async/send_task: unknown option(s) {sorted(unknown)} for task {name!r}")
        message, route, codec_name = self.build_message(name, args, kwargs, task, options)
        codec = serializers.codec(codec_name)
        await self.sender.send(self, Outgoing(message, route, codec, awaits_reply=not message.ignore_result))
        return AsyncResult(message.id, self, task_name=name, sent_here=not message.ignore_result)

    def build_message(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] | None,
        kwargs: dict[str, Any] | None,
        task: Task[Any, Any] | None,
        options: dict[str, Any],
    ) -> tuple[protocol.TaskMessage, Route, str]:
        """The protocol message, its route and serializer for a call (options already validated)."""
        args = list(args or ())
        kwargs = dict(kwargs or {})
        task_opts = task.options if task is not None else {}
        route = self.router.route(name, options, task.route_options() if task else {}, tuple(args), kwargs)
        now = dt.datetime.now(dt.timezone.utc)
        eta = _absolute(options.get("eta"), now, "eta")
        if eta is None and options.get("countdown") is not None:
            eta = _absolute(options["countdown"], now, "countdown")
        expires = _absolute(options.get("expires", task_opts.get("expires")), now, "expires")
        ignore_result = options.get("ignore_result")
        if ignore_result is None:
            ignore_result = task_opts.get("ignore_result", self.conf.task_ignore_result)
        priority = options.get("priority", task_opts.get("priority"))
        if priority is None:
            priority = self.conf.task_default_priority
        task_id = options.get("task_id") or str(uuid.uuid4())
        message = protocol.TaskMessage(
            task=name,
            id=task_id,
            args=args,
            kwargs=kwargs,
            eta=eta,
            expires=expires,
            retries=options.get("retries", 0),
            root_id=options.get("root_id") or task_id,
            parent_id=options.get("parent_id"),
            group=options.get("group_id"),
            group_index=options.get("group_index"),
            time_limit=options.get("time_limit", task_opts.get("time_limit")),
            soft_time_limit=options.get("soft_time_limit", task_opts.get("soft_time_limit")),
            ignore_result=bool(ignore_result),
            shadow=options.get("shadow"),
            reply_to=None if ignore_result else options.get("reply_to") or self.reply_queue,
            priority=priority,
            callbacks=_signature_list(options.get("link")),
            errbacks=_signature_list(options.get("link_error")),
            chain=options.get("chain"),
            chord=options.get("chord"),
            extra_headers=dict(options.get("headers") or {}),
        )
        codec_name = options.get("serializer") or task_opts.get("serializer") or self.conf.task_serializer
        return message, route, codec_name


def _signature_list(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    return [dict(item) for item in items]
