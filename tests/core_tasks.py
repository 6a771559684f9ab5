"""Tasks for tests that run workers as subprocesses (``amqtask worker -A core_tasks``).

The broker URL and queue come from the environment (``AMQTASK_BROKER_URL``,
``AMQTASK_TASK_DEFAULT_QUEUE``), so each test points the worker at its own vhost and queue.
``CORE_MARKER_DIR`` is where tasks leave files the test waits on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from amqtask import App

app = App("core_tasks")


def _marker(name: str) -> Path:
    return Path(os.environ.get("CORE_MARKER_DIR", "/tmp")) / name


@app.task(name="core.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="core.hang_once")
def hang_once(key: str) -> str:
    """Hangs on its first run (the test kills that worker), returns on the next."""
    marker = _marker(f"{key}.started")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    return f"done by {os.getpid()}"


@app.task(name="core.slow")
def slow(key: str, seconds: float) -> str:
    """Leaves a marker when it starts, then works for a while (graceful shutdown tests)."""
    _marker(f"{key}.started").write_text(str(os.getpid()))
    time.sleep(seconds)
    _marker(f"{key}.finished").write_text(str(os.getpid()))
    return "finished"
