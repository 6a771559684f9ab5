"""The amqtask side of the interoperability tests: the tasks of ``interop_celery_app``, under the same
names, in an amqtask app.

``amqtask worker -A interop_amqtask_app`` runs it as a real amqtask worker; the tests also build apps
in their own process with :func:`create_app` (clients, in-process workers). The module-level ``app``
is configured from the same environment variables as the Celery module (``INTEROP_BROKER_URL``,
``INTEROP_QUEUE``, ``INTEROP_SERIALIZER``).

The queues are shared with Celery and need no configuration but the priority queue's ``max_priority``
(amqtask declares a queue as Celery does; see docs/migrating.md).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from amqtask import App

MAX_PRIORITY = 10


class InteropError(Exception):
    """A user-defined exception with two arguments (the type name and arguments must survive the trip)."""


def priority_queue(queue: str) -> str:
    """The name of the priority queue that goes with ``queue``."""
    return f"{queue}-prio"


def shared_queues(queue: str, *extra: str) -> dict[str, dict[str, Any]]:
    """``task_queues`` declaring the queues exactly as ``interop_celery_app`` does: plain queues need no entry."""
    return {priority_queue(queue): {"max_priority": MAX_PRIORITY}, **{name: {} for name in extra}}


def create_app(broker_url: str, queue: str, serializer: str, *, name: str = "interop", **settings: Any) -> App:
    """An amqtask app whose default queue is ``queue``, speaking ``serializer`` to Celery."""
    options: dict[str, Any] = {
        "task_default_queue": queue,
        "task_queues": shared_queues(queue),
        "task_serializer": serializer,
        "publish_timeout_s": 10,
        **settings,
    }
    app = App(name, broker=broker_url, **options)
    _define_tasks(app)
    return app


def _define_tasks(app: App) -> None:
    @app.task(name="interop.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="interop.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="interop.custom_fail")
    def custom_fail() -> None:
        raise InteropError("bad thing", 42)

    @app.task(name="interop.info", bind=True)
    def info(self: Any) -> dict[str, Any]:
        """What the worker saw of the message, and when it ran."""
        delivery = self.request.delivery_info
        eta = self.request.eta
        return {
            "worker": "amqtask",
            "ran_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "eta": eta.isoformat() if eta is not None else None,
            "priority": delivery.get("priority"),
            "routing_key": delivery.get("routing_key"),
            "retries": self.request.retries,
        }

    @app.task(name="interop.flaky", bind=True, max_retries=5)
    def flaky(self: Any, times: int) -> int:
        """Fail ``times`` times through ``self.retry``, then return how many retries it took."""
        if self.request.retries < times:
            raise self.retry(exc=ValueError("not yet"), countdown=1)
        return int(self.request.retries)


_app: App | None = None


def __getattr__(name: str) -> Any:
    """``app``, built from the environment on first use (importing the module for its helpers builds none)."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        url = os.environ.get("INTEROP_BROKER_URL") or os.environ.get("AMQTASK_BROKER_URL")
        _app = create_app(
            url or "amqp://guest:guest@localhost:5672//",
            os.environ.get("INTEROP_QUEUE", "interop"),
            os.environ.get("INTEROP_SERIALIZER", "msgpack"),
        )
    return _app
