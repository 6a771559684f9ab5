"""Interoperability with celery-node, the Node.js client and worker of Celery's protocol (issue 16).

celery-node declares its queue with no arguments whenever it connects and again on every publish.
Before issue 16, an amqtask worker already on the queue locked it out (PRECONDITION_FAILED -
inequivalent arg 'x-dead-letter-exchange'). Proven here in every start order, against the real npm
package run by Node.js: a celery-node client first, an amqtask worker first, and a celery-node worker
serving an amqtask client. celery-node speaks JSON only, and keeps results in its own AMQP result
backend (a queue per task id, without reply_to), which is read here as it left them.

The fixture installs ``celery-node`` with npm into ``.cache/node`` (ignored by git) once.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue as queue_module
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.interop import delete_objects
from support.node import celery_node_modules
from support.workers import TESTS_DIR, get_raw, wait_for, worker_thread

from amqtask import App
from amqtask.topology import DLQ_SUFFIX

pytestmark = [pytest.mark.broker, pytest.mark.ecosystem, pytest.mark.interop]

SCRIPT = TESTS_DIR / "interop_node" / "celery_node.js"
TIMEOUT = 30.0


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return celery_node_modules()


def _node_env(modules: Path) -> dict[str, str]:
    return {**os.environ, "NODE_PATH": str(modules)}


def node_client(modules: Path, url: str, queue: str, tasks: list[tuple[str, str, list[Any]]]) -> None:
    """Connect a celery-node client to ``queue`` and send ``tasks`` ([(id, name, args)])."""
    done = subprocess.run(
        ["node", str(SCRIPT), "client", url, queue, json.dumps(tasks)],
        env=_node_env(modules), capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "sent", done.stdout + done.stderr


def _app(url: str, queue: str, unique: str, ran: queue_module.Queue[int]) -> App:
    """An amqtask app naming only its default queue (no queue configuration), in JSON as celery-node speaks."""
    app = App(f"node-{unique}", broker=url, task_default_queue=queue, task_serializer="json", publish_timeout_s=10)

    @app.task(name="interop.add")
    def add(x: int, y: int) -> int:
        ran.put(x + y)
        return x + y

    @app.task(name="interop.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    return app


@pytest.fixture
def queue_name(broker_url: str, unique: str) -> Iterator[str]:
    name = f"node-{unique}"
    yield name
    delete_objects(broker_url, (name,))


def _ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def _assert_dead_lettered(url: str, queue: str, task_id: str) -> None:
    dead = asyncio.run(get_raw(url, queue + DLQ_SUFFIX, timeout=TIMEOUT))
    assert (dead.headers["id"], dead.headers["x-amqtask-reason"]) == (task_id, "failed")
    assert dead.headers["lang"] == "js"  # celery-node's message, kept as it was sent


def test_celery_node_client_first_then_an_amqtask_worker(
    node_modules: Path, broker_url: str, queue_name: str, unique: str
) -> None:
    ran: queue_module.Queue[int] = queue_module.Queue()
    app = _app(broker_url, queue_name, unique, ran)
    add_id, fail_id = _ids()
    node_client(
        node_modules, broker_url, queue_name, [(add_id, "interop.add", [2, 3]), (fail_id, "interop.fail", ["js"])]
    )
    try:
        with worker_thread(app, queues=[queue_name], hostname=f"amqtask-{unique}@localhost"):
            assert ran.get(timeout=TIMEOUT) == 5
            _assert_dead_lettered(broker_url, queue_name, fail_id)
    finally:
        app.close()


def test_amqtask_worker_first_then_a_celery_node_client(
    node_modules: Path, broker_url: str, queue_name: str, unique: str
) -> None:
    """The order that failed before: celery-node connects to a queue an amqtask worker declared."""
    ran: queue_module.Queue[int] = queue_module.Queue()
    app = _app(broker_url, queue_name, unique, ran)
    add_id, fail_id = _ids()
    try:
        with worker_thread(app, queues=[queue_name], hostname=f"amqtask-{unique}@localhost"):
            node_client(
                node_modules,
                broker_url,
                queue_name,
                [(add_id, "interop.add", [20, 22]), (fail_id, "interop.fail", ["x"])],
            )
            assert ran.get(timeout=TIMEOUT) == 42
            _assert_dead_lettered(broker_url, queue_name, fail_id)
    finally:
        app.close()


def test_a_celery_node_worker_serves_an_amqtask_client_on_a_queue_amqtask_declared(
    node_modules: Path, broker_url: str, queue_name: str, unique: str, tmp_path: Path
) -> None:
    """amqtask declares the queue and sends first; celery-node's worker declares it its way, runs the
    task, and stores the result in its own backend (a queue named after the task id, without dashes)."""
    ran: queue_module.Queue[int] = queue_module.Queue()
    app = _app(broker_url, queue_name, unique, ran)
    log = tmp_path / "celery-node-worker.log"
    try:
        sent = app.send_task("interop.add", args=(4, 5), ignore_result=True)
        with log.open("wb") as out:
            worker = subprocess.Popen(
                ["node", str(SCRIPT), "worker", broker_url, queue_name],
                env=_node_env(node_modules), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            wait_for(
                lambda: "ran interop.add 9" in log.read_text() or worker.poll() is not None, TIMEOUT, "celery-node"
            )
            assert worker.poll() is None, log.read_text()
            stored = asyncio.run(get_raw(broker_url, sent.id.replace("-", ""), timeout=TIMEOUT))
            body = json.loads(stored.body)
            assert (body["status"], body["result"], body["task_id"]) == ("SUCCESS", 9, sent.id)
        finally:
            worker.terminate()
            worker.wait(10)
    finally:
        app.close()
        delete_objects(broker_url, (sent.id.replace("-", ""),))
