"""Tasks for chord tests that run workers as subprocesses (``amqtask worker -A canvas_tasks``).

The broker URL and queue come from the environment (``AMQTASK_BROKER_URL``,
``AMQTASK_TASK_DEFAULT_QUEUE``). ``CANVAS_BODY_LOG`` is a file the chord body appends a line to
each time it runs, so a test can count runs across processes.
"""

from __future__ import annotations

import os
import time

from amqtask import App

app = App("canvas_tasks")


@app.task(name="canvas.work")
def work(index: int, seconds: float) -> list[int]:
    """A header task: works a while, then reports its index and the worker process that ran it."""
    time.sleep(seconds)
    return [index, os.getpid()]


@app.task(name="canvas.collect")
def collect(parts: list[list[int]]) -> list[int]:
    """A chord body: records that it ran and returns the header indexes in the order received."""
    with open(os.environ["CANVAS_BODY_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{os.getpid()}\n")
    return [index for index, _pid in parts]
