"""Tasks for the monitoring tests' worker subprocesses (``amqtask worker -A monitoring_tasks``).

The broker URL and queue come from the environment (``AMQTASK_BROKER_URL``, ``AMQTASK_TASK_DEFAULT_QUEUE``).
"""

from __future__ import annotations

import logging
from typing import Any

from amqtask import App

app = App("monitoring_tasks")
log = logging.getLogger("monitoring_tasks")


@app.task(name="mon.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="mon.chatty")
def chatty(word: str) -> str:
    log.warning("thread says %s", word)
    return word


@app.task(name="mon.achatty")
async def achatty(word: str) -> str:
    log.warning("loop says %s", word)
    return word


@app.task(name="mon.fail")
def fail() -> None:
    raise ValueError("x")


@app.task(name="mon.flaky", bind=True, max_retries=1)
def flaky(self: Any) -> str:
    if self.request.retries == 0:
        raise self.retry(countdown=0, exc=KeyError("again"))
    return "ok"
