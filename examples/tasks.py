"""The classic first example: an ``add`` task and an async one.

Run a worker with ``amqtask worker -A tasks -Q default,high_priority`` (from this directory, with
``AMQTASK_BROKER_URL`` pointing at your broker), then ``python producer.py``.
"""

from __future__ import annotations

import asyncio

from amqtask import App

# The broker URL comes from AMQTASK_BROKER_URL when set (amqp://guest:guest@localhost:5672// otherwise).
app = App("tasks")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="high_priority")
async def notify(user_id: int) -> str:
    await asyncio.sleep(0.01)  # stands for an HTTP call or a database write
    return f"notified user {user_id}"
