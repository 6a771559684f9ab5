"""amqp results on a 3-node cluster: the node leading the result stream stops, and every result stays readable.

The stream is replicated on all three nodes. A worker and a client use the list of node URLs; after the
stream leader's node is stopped, a reader in another process (connected to the survivors) reads every
result written before, and a task run after the stop is readable too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support.broker import TestBroker
from support.broker import cluster as broker_cluster
from support.workers import TESTS_DIR, wait_for, worker_thread

from amqtask import App, AsyncResult

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.cluster, pytest.mark.timeout(240)]
NODES = 3


@pytest.fixture(scope="module")
def cluster(pytestconfig: pytest.Config) -> Iterator[tuple[TestBroker, str]]:
    """A 3-node cluster of this module's own, with a vhost; deleted at the end."""
    with broker_cluster(pytestconfig.getoption("--rabbitmq"), "amqtask-results", NODES, "results") as broker:
        yield broker, "results"


def leader(cluster: TestBroker, vhost: str, stream: str) -> int | None:
    """1 + the index of the node leading ``stream`` (so that node 0 reads as true), None while it has none."""
    rows = json.loads(cluster.ctl("-q", "list_queues", "-p", vhost, "name", "leader", "--formatter", "json"))
    found = [re.search(r"-(\d+)@", row.get("leader") or "") for row in rows if row["name"] == stream]
    return int(found[0].group(1)) + 1 if found and found[0] else None


def read_in_another_process(urls: list[str], stream: str, task_ids: list[str]) -> list[str]:
    script = (
        "import sys, json; from amqtask import App, AsyncResult;"
        f"app = App('reader', broker={urls!r}, result_backend='amqp', result_stream={stream!r});"
        "print(json.dumps([AsyncResult(i, app=app).get(timeout=60) for i in sys.argv[1:]])); app.close()"
    )
    done = subprocess.run([sys.executable, "-c", script, *task_ids], capture_output=True, text=True, timeout=120,
                          cwd=TESTS_DIR)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_results_stay_readable_when_the_stream_leaders_node_stops(cluster: tuple[TestBroker, str], unique: str) -> None:
    broker, vhost = cluster
    urls = [broker.vhost_url(vhost, node) for node in range(NODES)]
    stream = f"results-{unique}"
    app = App(f"cluster-{unique}", broker=urls, task_default_queue=f"q-{unique}", result_backend="amqp",
              result_stream=stream, task_queues={f"q-{unique}": {"queue_type": "quorum"}},
              publish_timeout_s=60, broker_reconnect_max_s=2)  # fmt: skip

    @app.task(name="t.square")
    def square(x: int) -> int:
        return x * x

    try:
        with worker_thread(app, concurrency=4):
            before = [square.delay(i) for i in range(20)]
            assert [r.get(timeout=60) for r in before] == [i * i for i in range(20)]
            stopped = wait_for(lambda: leader(broker, vhost, stream), 30, "the result stream's leader") - 1
            broker.stop_node(stopped)
            survivors = [url for node, url in enumerate(urls) if node != stopped]
            assert read_in_another_process(survivors, stream, [r.id for r in before]) == [i * i for i in range(20)]
            after = square.delay(12)
            assert after.get(timeout=60) == 144
            assert read_in_another_process(survivors, stream, [after.id]) == [144]
            assert AsyncResult(before[3].id, app=app).get(timeout=30) == 9
    finally:
        app.close()
