"""An app for tests that run amqtask's CLI as a subprocess: ``worker``, ``topology``, ``dlq``.

The broker URL comes from ``AMQTASK_BROKER_URL`` and every queue name starts with
``BROKER_TASKS_PREFIX``, so each test points the subprocess at its own vhost and queues.
"""

from __future__ import annotations

import os
from typing import Any

from amqtask import App

PREFIX = os.environ.get("BROKER_TASKS_PREFIX", "broker-tasks")


def queue_names(prefix: str) -> dict[str, str]:
    """The names of the app's queues for a prefix, by role."""
    return {role: f"{prefix}-{role}" for role in ("default", "a", "b", "c", "prio", "poison")}


def task_queues(prefix: str) -> dict[str, dict[str, Any]]:
    """The app's ``task_queues`` for a prefix."""
    names = queue_names(prefix)
    return {
        names["a"]: {},
        names["b"]: {},
        names["c"]: {},
        names["prio"]: {"max_priority": 10},
        # A worker that dies mid-task is a failed delivery; after 2 more the broker dead-letters it.
        names["poison"]: {"queue_type": "quorum", "delivery_limit": 2},
    }


app = App("broker_tasks", task_default_queue=queue_names(PREFIX)["default"], task_queues=task_queues(PREFIX))


@app.task(name="bt.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="bt.where", bind=True)
def where(self: Any) -> str:
    """The queue this ran from."""
    return str(self.request.delivery_info["queue"])


@app.task(name="bt.crash")
def crash() -> None:
    """Kill the worker process mid-task, as a segfaulting extension or the OOM killer would."""
    os._exit(3)
