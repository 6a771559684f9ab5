"""The Celery side of the interoperability tests: a Celery 5 app with the same task names as
``interop_amqtask_app``.

``celery -A interop_celery_app worker`` runs it as a real Celery worker; the tests also build Celery
*clients* in their own process with :func:`create_app`. The module-level ``app`` (what the worker
loads) is configured from the environment, so each worker points at the test's vhost and queues:

- ``INTEROP_BROKER_URL``: the broker (an ``amqp://`` URL; py-amqp takes it as is),
- ``INTEROP_QUEUE``: the default queue; ``<queue>-prio`` is a priority queue (``x-max-priority: 10``),
- ``INTEROP_SERIALIZER``: ``json`` or ``msgpack``, used for tasks and results and the only one accepted.

Only a test dependency: amqtask itself never imports Celery.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from celery import Celery
from kombu import Queue

MAX_PRIORITY = 10


class InteropError(Exception):
    """A user-defined exception with two arguments (the type name and arguments must survive the trip)."""


def priority_queue(queue: str) -> str:
    """The name of the priority queue that goes with ``queue``."""
    return f"{queue}-prio"


def create_app(broker_url: str, queue: str, serializer: str, *, extra_queues: tuple[str, ...] = ()) -> Celery:
    """A Celery app with result backend ``rpc://`` whose default queue is ``queue``."""
    app = Celery("interop_celery_app", broker=broker_url, backend="rpc://", set_as_current=False)
    app.conf.update(
        task_serializer=serializer,
        result_serializer=serializer,
        accept_content=[serializer],
        result_accept_content=[serializer],
        task_default_queue=queue,
        task_queues=[
            Queue(queue),
            Queue(priority_queue(queue), queue_arguments={"x-max-priority": MAX_PRIORITY}),
            *(Queue(name) for name in extra_queues),
        ],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=3,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        enable_utc=True,
    )
    _define_tasks(app)
    return app


def _define_tasks(app: Celery) -> None:
    @app.task(shared=False, name="interop.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="interop.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(shared=False, name="interop.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(shared=False, name="interop.custom_fail")
    def custom_fail() -> None:
        raise InteropError("bad thing", 42)

    @app.task(shared=False, name="interop.info", bind=True)
    def info(self: Any) -> dict[str, Any]:
        """What the worker saw of the message, and when it ran."""
        delivery = self.request.delivery_info or {}
        eta = self.request.eta
        return {
            "worker": "celery",
            "ran_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "eta": eta.isoformat() if isinstance(eta, dt.datetime) else eta,
            "priority": delivery.get("priority"),
            "routing_key": delivery.get("routing_key"),
            "retries": self.request.retries,
        }

    @app.task(shared=False, name="interop.flaky", bind=True, max_retries=5)
    def flaky(self: Any, times: int) -> int:
        """Fail ``times`` times through ``self.retry``, then return how many retries it took."""
        if self.request.retries < times:
            raise self.retry(exc=ValueError("not yet"), countdown=1)
        return int(self.request.retries)


def _from_environment() -> Celery:
    return create_app(
        os.environ.get("INTEROP_BROKER_URL", "amqp://guest:guest@localhost:5672//"),
        os.environ.get("INTEROP_QUEUE", "interop"),
        os.environ.get("INTEROP_SERIALIZER", "json"),
    )


app = _from_environment()
