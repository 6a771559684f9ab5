"""A real celery-node client sends a task to an amqtask worker and reads its result (issue 15).

celery-node (npm ``celery-node``) reads results in Celery's legacy amqp layout: the worker writes them there
with ``result_legacy_queues=True``, beside the result stream amqtask's own readers use. The package is
installed on first use into ``.cache/node`` (git-ignored), pinned to the version this test was written for.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.node import celery_node_modules
from support.workers import TESTS_DIR, worker_thread

from amqtask import App, AsyncResult

pytestmark = [pytest.mark.broker, pytest.mark.ecosystem]


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return celery_node_modules()


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    queue = f"node-{unique}"
    # celery-node declares its queue without arguments: a queue both agree on has no dead-letter arguments.
    application = App(f"node-{unique}", broker=broker_url, task_default_queue=queue,
                      task_queues={queue: {"dead_letter": False}}, result_backend="amqp",
                      result_stream=f"results-{unique}", result_legacy_queues=True)  # fmt: skip
    yield application
    application.close()


def test_celery_node_sends_a_task_and_reads_its_result(app: App, broker_url: str, node_modules: Path) -> None:
    @app.task(name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    # celery-node 0.5.9 bundles amqplib 0.8, which asks for 4 KiB frames; RabbitMQ 4.x refuses below 8 KiB.
    node_url = f"{broker_url}?frameMax=131072"
    with worker_thread(app):
        done = subprocess.run(
            ["node", str(TESTS_DIR / "node" / "celery_node_client.js"), node_url, app.conf.task_default_queue,
             "tasks.add", "20", "22"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "NODE_PATH": str(node_modules)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["value"] == 42
        assert AsyncResult(answer["id"], app=app).get(timeout=10) == 42  # and amqtask's readers, from the stream
