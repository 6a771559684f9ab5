"""Worker logs as operators read them: Celery's per-task INFO lines, JSON lines carrying the task's fields
(also for the task's own logging calls, in its thread or on the loop), one warning per failed connect.

The worker is the real command line (``amqtask worker --burst``), reading tasks published beforehand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest
from support.workers import TESTS_DIR

from amqtask import App
from amqtask.monitoring.logs import JsonFormatter, TaskContext, TaskFields, task_context


def burst_worker(broker_url: str, queue: str, *args: str) -> str:
    """Run ``amqtask worker --burst`` over the queue and return what it logged."""
    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": queue,
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "amqtask", "worker", "-A", "monitoring_tasks", "--burst", "-n", f"{queue}@logs", *args],
        env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


def send(broker_url: str, queue: str, calls: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    async def publish() -> list[str]:
        app = App("client", broker=broker_url, task_default_queue=queue)
        try:
            return [(await app.asend_task(name, args)).id for name, args in calls]
        finally:
            await app.aclose()

    return asyncio.run(publish())


@pytest.mark.broker
def test_json_lines_carry_the_task_fields(broker_url: str, unique: str) -> None:
    ids = send(broker_url, unique, [("mon.chatty", ("hi",)), ("mon.achatty", ("yo",)), ("mon.fail", ()),
                                    ("mon.flaky", ())])  # fmt: skip
    lines = [json.loads(line) for line in burst_worker(broker_url, unique, "--log-format", "json").splitlines()]
    worker = f"{unique}@logs"

    def one(message: str) -> dict[str, Any]:
        found = [line for line in lines if line["message"] == message]
        assert len(found) == 1, (message, lines)
        return found[0]

    thread = one("thread says hi")
    assert (thread["task_id"], thread["task_name"], thread["queue"], thread["retries"], thread["worker"]) == (
        ids[0], "mon.chatty", unique, 0, worker)  # fmt: skip
    loop = one("loop says yo")
    assert (loop["task_id"], loop["task_name"], loop["queue"]) == (ids[1], "mon.achatty", unique)
    assert loop["worker"] == worker
    failed = one(f"Task mon.fail[{ids[2]}] failed: ValueError('x')")
    assert failed["level"] == "ERROR" and failed["task_id"] == ids[2]
    assert 'raise ValueError("x")' in failed["exception"]
    retried = one(f"Task mon.flaky[{ids[3]}] retry in 0s: KeyError('again')")
    assert retried["retries"] == 0
    succeeded = [line for line in lines if line["message"].startswith(f"Task mon.flaky[{ids[3]}] succeeded in ")]
    assert len(succeeded) == 1 and succeeded[0]["retries"] == 1 and succeeded[0]["message"].endswith(": 'ok'")
    # Lines outside any task carry no task fields.
    consuming = next(line for line in lines if line["message"].startswith("worker "))
    assert "task_id" not in consuming and {"time", "level", "logger", "pid"} <= set(consuming)


@pytest.mark.broker
def test_text_lines_say_what_celery_says(broker_url: str, unique: str) -> None:
    ids = send(broker_url, unique, [("mon.add", (4, 4)), ("mon.fail", ())])
    out = burst_worker(broker_url, unique)
    assert f"INFO amqtask.worker] Task mon.add[{ids[0]}] received" in out
    assert f"Task mon.add[{ids[0]}] succeeded in 0." in out and "s: 8\n" in out
    failed = out.index(f"ERROR amqtask.worker] Task mon.fail[{ids[1]}] failed: ValueError('x')")
    assert out.index("Traceback (most recent call last):", failed) > failed


def test_one_warning_with_a_hint_per_failed_connect() -> None:
    env = {**os.environ, "AMQTASK_BROKER_URL": "amqp://guest:secret@127.0.0.1:1/",
           "AMQTASK_BROKER_CONNECT_TIMEOUT_S": "0.5", "AMQTASK_PUBLISH_TIMEOUT_S": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "amqtask", "worker", "-A", "monitoring_tasks"], env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []
    # The worker goes on trying; two attempts show the pattern.
    while sum("cannot connect to" in line for line in lines) < 2:
        lines.append(process.stderr.readline())
        assert lines[-1], "the worker exited"
    process.terminate()
    lines += process.communicate(timeout=30)[1].splitlines()
    stderr = "".join(lines)
    attempts = [line for line in lines if "cannot connect to" in line]
    assert attempts and all("WARNING" in line for line in attempts)
    assert "is RabbitMQ running at amqp://guest:***@127.0.0.1:1/? set AMQTASK_BROKER_URL" in attempts[0]
    assert "error when creating transport" not in stderr and "ERROR aiormq" not in stderr
    assert "secret" not in stderr


def test_records_outside_a_task_pass_with_empty_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("line",), None)
    assert TaskFields().filter(record) is True
    assert json.loads(JsonFormatter().format(record))["message"] == "plain line"
    token = task_context.set(TaskContext("id-1", "t.name", 2, "w@h", 0.0))
    try:
        inside = logging.LogRecord("x", logging.INFO, __file__, 1, "in task", (), None)
        TaskFields().filter(inside)
    finally:
        task_context.reset(token)
    entry = json.loads(JsonFormatter().format(inside))
    assert (entry["task_id"], entry["task_name"], entry["retries"], entry["worker"]) == ("id-1", "t.name", 2, "w@h")
