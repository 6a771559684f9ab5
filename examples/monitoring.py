"""Watching workers: Celery's events (Flower), Prometheus metrics and JSON logs with task fields.

Run a worker with all three on (needs ``pip install 'amqtask[metrics]'``; ``amqtask top`` needs
``amqtask[top]``):

    amqtask worker -A monitoring -E --metrics-port 9808 --log-format json

and, beside it:

    python monitoring.py                          # sends a few tasks that succeed, fail and retry
    amqtask events -A monitoring                  # the event stream, one line per event
    amqtask top -A monitoring                     # live view: workers, queues, slowest and failing tasks
    amqtask queues -A monitoring --json           # the queue counts, once
    curl -s localhost:9808/metrics | grep amqtask_tasks_total
    celery --broker=amqp://guest:guest@localhost:5672// flower   # Flower shows the worker and its tasks

Every line the worker logs while ``report`` runs, its own ``log.info`` included, carries ``task_id``,
``task_name``, ``queue``, ``retries`` and ``worker``.

``notify`` starts at most twice a second per worker process; change that while the worker runs with
``amqtask control rate_limit monitoring.notify 10/s``. With ``EXAMPLE_TRACES=1`` (and
``pip install 'amqtask[otel]'``) sends and runs are traced with OpenTelemetry and printed on the
console. See docs/monitoring.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from amqtask import App

app = App("monitoring", task_send_sent_event=True)
log = logging.getLogger("monitoring")

if os.environ.get("EXAMPLE_TRACES"):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    from amqtask.monitoring.tracing import instrument

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    instrument(app, provider)


@app.task(name="monitoring.report")
def report(rows: int) -> int:
    log.info("building a report of %d rows", rows)
    return rows * 2


@app.task(name="monitoring.notify", rate_limit="2/s")
def notify(user: str) -> str:
    return f"notified {user}"


@app.task(name="monitoring.broken")
def broken() -> None:
    raise ValueError("the input file is empty")


@app.task(name="monitoring.flaky", bind=True, max_retries=2)
def flaky(self: Any) -> str:
    if self.request.retries < 1:
        raise self.retry(countdown=1, exc=ConnectionError("upstream timed out"))
    return "fetched"


if __name__ == "__main__":
    for rows in (10, 20, 30):
        report.delay(rows)
    for user in ("ann", "bob", "cyd", "dee"):
        notify.delay(user)
    broken.delay()
    flaky.delay()
    print("sent 5 tasks; watch them with `amqtask events -A monitoring` or Flower")
