"""Prometheus metrics, scraped over HTTP from a real ``amqtask worker --metrics-port`` after a known workload:
one process, and ``-P 2`` (one endpoint, the sum of both children, surviving a child's replacement).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.workers import stop_process, wait_for, worker_process
from test_flower import free_port
from test_logs import send

from amqtask import App, protocol, serializers
from amqtask.errors import ConfigurationError
from amqtask.monitoring import metrics as metrics_module

pytestmark = [pytest.mark.ecosystem]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample on the endpoint, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (pid labels summed away)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= set(found))


def scrape_or_empty(port: int) -> Samples:
    try:
        return scrape(port)
    except OSError:
        return {}


WORKLOAD = [("mon.add", (1, 1)), ("mon.add", (2, 2)), ("mon.add", (3, 3)), ("mon.fail", ()), ("mon.flaky", ())]


def settled(samples: Samples, queue: str) -> bool:
    """The workload's six outcomes are counted and everything they published is confirmed.

    A task's outcome is counted when it ends, before its reply or dead-letter copy is confirmed:
    checking exact counts on the outcomes alone would race the last confirm.
    """
    return (
        value(samples, "amqtask_tasks_total") >= 6
        and value(samples, "amqtask_publish_confirm_seconds_count") >= 8
        and value(samples, "amqtask_tasks_in_flight", queue=queue) == 0
    )


def check_counts(samples: Samples, queue: str) -> None:
    tasks = "amqtask_tasks_total"
    assert value(samples, tasks, task="mon.add", queue=queue, outcome="succeeded") == 3
    assert value(samples, tasks, task="mon.fail", queue=queue, outcome="failed") == 1
    assert value(samples, tasks, task="mon.flaky", queue=queue, outcome="retried") == 1
    assert value(samples, tasks, task="mon.flaky", queue=queue, outcome="succeeded") == 1
    assert value(samples, tasks) == 6
    assert value(samples, "amqtask_task_runtime_seconds_count", task="mon.add", queue=queue) == 3
    assert value(samples, "amqtask_tasks_in_flight", queue=queue) == 0
    # Every run started is timed from its message's sent time: the retried task twice.
    waits = "amqtask_task_queue_wait_seconds_count"
    assert value(samples, waits, task="mon.add", queue=queue) == 3
    assert value(samples, waits, task="mon.fail", queue=queue) == 1
    assert value(samples, waits, task="mon.flaky", queue=queue) == 2
    # Every publish the worker made, timed to its confirm: 6 replies (the retry's too), the retry's new
    # message, and the failed task's copy in the dead-letter queue.
    assert value(samples, "amqtask_publish_confirm_seconds_count") == 8


def send_untimed(broker_url: str, queue: str, name: str, args: tuple[Any, ...]) -> None:
    """Send a task message with no AMQP timestamp, as Celery does."""

    async def publish() -> None:
        app = App("client", broker=broker_url)
        try:
            wire = protocol.encode_task(protocol.TaskMessage(name, str(uuid.uuid4()), list(args)), serializers.JSON)
            wire.timestamp = None
            await app.runtime().publisher.publish(wire, "", queue)
        finally:
            await app.aclose()

    asyncio.run(publish())


@pytest.fixture
def metrics_port() -> Iterator[int]:
    yield free_port()


@pytest.mark.broker
def test_one_process_serves_exact_counts(broker_url: str, unique: str, metrics_port: int) -> None:
    send(broker_url, unique, WORKLOAD)
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": unique, "AMQTASK_WORKER_CONCURRENCY": "2"}
    process = worker_process("monitoring_tasks", broker_url, "--metrics-port", str(metrics_port), env=env)
    try:
        wait_for(lambda: settled(scrape_or_empty(metrics_port), unique), 60, "six outcomes settled")
        samples = scrape(metrics_port)
        check_counts(samples, unique)
        assert value(samples, "amqtask_prefetch", queue=unique) == 8
        assert value(samples, "amqtask_broker_connected") == 1
        # A message without a sent time (as Celery sends them) runs, and is not timed.
        send_untimed(broker_url, unique, "mon.add", (4, 4))
        wait_for(lambda: value(scrape(metrics_port), "amqtask_tasks_total") >= 7, 60, "seventh outcome")
        samples = scrape(metrics_port)
        assert value(samples, "amqtask_tasks_total", task="mon.add", outcome="succeeded") == 4
        assert value(samples, "amqtask_task_queue_wait_seconds_count", task="mon.add") == 3
    finally:
        stop_process(process)


@pytest.mark.broker
def test_two_processes_serve_the_sum_and_survive_a_child_restart(
    broker_url: str, unique: str, metrics_port: int
) -> None:
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": unique, "AMQTASK_WORKER_CONCURRENCY": "1"}
    process = worker_process("monitoring_tasks", broker_url, "-P", "2", "--metrics-port", str(metrics_port), env=env)
    try:
        # Both children consuming: each reports its prefetch (1 x 4), summed.
        wait_for(lambda: value(scrape_or_empty(metrics_port), "amqtask_prefetch", queue=unique) == 8, 60, "children")
        send(broker_url, unique, WORKLOAD)
        wait_for(lambda: settled(scrape(metrics_port), unique), 60, "six outcomes settled")
        check_counts(scrape(metrics_port), unique)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        # The replacement starts; the dead child's counts stay in the sum, its gauges go.
        wait_for(lambda: set(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
                             .stdout.split()) - set(children), 60, "a new child")  # fmt: skip
        wait_for(lambda: value(scrape(metrics_port), "amqtask_prefetch", queue=unique) == 8, 60, "prefetch of two")
        send(broker_url, unique, [("mon.add", (5, 5))])
        wait_for(lambda: value(scrape(metrics_port), "amqtask_tasks_total") >= 7, 60, "seventh outcome")
        samples = scrape(metrics_port)
        assert value(samples, "amqtask_tasks_total", task="mon.add", outcome="succeeded") == 4
        assert value(samples, "amqtask_tasks_total") == 7
    finally:
        stop_process(process)


def test_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'amqtask\[metrics\]'"):
        metrics_module.prometheus()
    assert App("m", worker_metrics_port=9808).conf.worker_metrics_port == 9808
