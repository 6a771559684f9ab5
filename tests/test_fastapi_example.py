"""The FastAPI example (examples/fastapi) through its ASGI test client, against a real broker and worker.

Starlette's TestClient runs the app's lifespan (``async with tasks.lifespan()``: connect at startup,
close at shutdown) on its own event loop, as a server would. An in-process worker serves the tasks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from support.interop import consumers, delete_objects
from support.workers import REPO_DIR, wait_for, worker_thread

pytest.importorskip("fastapi", reason="the FastAPI example needs the fastapi extra")
from fastapi.testclient import TestClient

pytestmark = [pytest.mark.broker, pytest.mark.ecosystem]


@pytest.fixture
def example(broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AMQTASK_BROKER_URL", broker_url)
    monkeypatch.setenv("EXAMPLE_QUEUE", f"fastapi-{unique}")
    monkeypatch.syspath_prepend(str(REPO_DIR / "examples" / "fastapi"))
    sys.modules.pop("main", None)
    import main

    yield main
    sys.modules.pop("main", None)
    main.tasks.close()
    delete_objects(broker_url, (f"fastapi-{unique}",))


def test_endpoints_await_sends_and_results_and_the_lifespan_closes_the_connection(
    example: Any, broker_url: str
) -> None:
    queue = example.tasks.conf.task_default_queue
    with TestClient(example.api) as client:
        # No worker yet: the result cannot come in time.
        slow = client.get("/sum", params={"x": 1, "y": 1, "timeout": 0.2})
        assert slow.status_code == 504 and "may still run" in slow.json()["detail"]
        with worker_thread(example.tasks, queues=[queue], hostname=f"{queue}@localhost"):
            assert client.get("/sum", params={"x": 2, "y": 3}).json() == {"sum": 5}
            accepted = client.post("/reports", params={"pages": 1})
            assert accepted.status_code == 202 and accepted.json()["task_id"]
        replies = consumers(broker_url, example.tasks.reply_queue)
        assert replies == 1  # the lifespan opened the reply consumer at startup
    # Shutdown closed the service's connection: its reply consumer is gone.
    wait_for(lambda: consumers(broker_url, example.tasks.reply_queue) == 0, 10, "the reply consumer to close")
