"""Real Flower 2.x watching amqtask workers started with events on: what its HTTP API reports.

Flower runs as users run it (``celery --broker=<url> flower``) in a subprocess; the test asks its API
with a real HTTP client, as a dashboard or a script would.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from support.workers import wait_for, worker_thread
from test_events import event_app

from amqtask import App

pytestmark = [pytest.mark.ecosystem, pytest.mark.broker]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Flower:
    def __init__(self, broker_url: str) -> None:
        self.port = free_port()
        # Flower 2 serves its API only to authenticated users unless told otherwise.
        env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", f"--broker={broker_url}", "flower", "--address=127.0.0.1",
             f"--port={self.port}", "--inspect_timeout=5000"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def answers(self) -> bool:
        try:
            self.get("/api/workers?status=1")
        except OSError:
            assert self.process.poll() is None, self.output()
            return False
        return True

    def output(self) -> str:
        self.process.kill()
        return self.process.communicate()[0].decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def flower(broker_url: str) -> Iterator[Flower]:
    running = Flower(broker_url)
    try:
        wait_for(running.answers, 60, "Flower's API")
        yield running
    finally:
        running.stop()


def test_flower_reports_amqtask_workers_and_tasks(flower: Flower, broker_url: str, unique: str) -> None:
    app = event_app(broker_url, unique)
    hostname = f"{unique}@flower"
    client = App("client", broker=broker_url, task_default_queue=unique)
    with worker_thread(app, hostname=hostname, concurrency=2):
        wait_for(lambda: flower.get("/api/workers?status=1").get(hostname) is True, 30, "worker online in Flower")
        ids = {name: client.send_task(f"tasks.{name}", args).id for name, args in
               (("add", (2, 3)), ("fail", ()), ("flaky", ()))}  # fmt: skip

        def states() -> dict[str, str]:
            tasks = flower.get("/api/tasks")
            return {name: tasks.get(task_id, {}).get("state") for name, task_id in ids.items()}

        try:
            wait_for(lambda: states() == {"add": "SUCCESS", "fail": "FAILURE", "flaky": "SUCCESS"}, 30, "states")
        except AssertionError:
            raise AssertionError(f"{states()} {flower.get('/api/tasks')}") from None
        tasks = flower.get("/api/tasks")
        # Flower asks workers over remote control for the rest of what /api/workers shows; a refresh that
        # comes while its start-up inspection still runs returns that one's (empty) answer, so ask again.
        workers = wait_for(lambda: (found := flower.get("/api/workers?refresh=1")).get(hostname) and found, 60,
                           "the worker in /api/workers")  # fmt: skip
    client.close()

    added = tasks[ids["add"]]
    assert (added["name"], added["worker"], added["args"], added["result"]) == ("tasks.add", hostname, "(2, 3)", "5")
    assert 0 < added["runtime"] < 5 and added["received"] <= added["started"] <= added["succeeded"]
    failed = tasks[ids["fail"]]
    assert (failed["name"], failed["worker"], failed["exception"]) == ("tasks.fail", hostname, "ValueError('x')")
    assert "raise ValueError" in failed["traceback"]
    flaky = tasks[ids["flaky"]]
    assert (flaky["name"], flaky["retries"], flaky["result"]) == ("tasks.flaky", 1, "'ok'")
    info = flower.get(f"/api/task/info/{ids['flaky']}")
    assert info["state"] == "SUCCESS" and info["worker"] == hostname

    assert set(workers[hostname]["registered"]) >= {"tasks.add", "tasks.fail", "tasks.flaky"}
    assert workers[hostname]["stats"]["pool"]["max-concurrency"] == 2
    assert [queue["name"] for queue in workers[hostname]["active_queues"]] == [unique]
    assert workers[hostname]["conf"]["task_default_queue"] == unique
    wait_for(lambda: flower.get("/api/workers?status=1").get(hostname) is False, 30, "worker offline in Flower")


def test_flower_counts_match_what_ran(flower: Flower, broker_url: str, unique: str) -> None:
    # Sent before the worker starts: it drains them in a burst, so their events reach Flower as task.multi
    # lists holding many tasks' events, which Flower must unpack without losing or mixing any.
    app = event_app(broker_url, unique)
    hostname = f"{unique}@count"

    async def send() -> list[str]:
        ids = [(await app.asend_task("tasks.add", (value, 1))).id for value in range(40)]
        await app.aclose()
        return ids

    ids = asyncio.run(send())
    with worker_thread(app, hostname=hostname, concurrency=4):

        def succeeded() -> dict[str, Any]:
            return flower.get(f"/api/tasks?workername={hostname}&state=SUCCESS")

        found = wait_for(lambda: len(tasks := succeeded()) == 40 and tasks, 30, "40 successes in Flower")
    assert {task_id: found[task_id]["result"] for task_id in ids} == {
        task_id: str(value + 1) for value, task_id in enumerate(ids)
    }
