"""Tasks for the fault tests' worker subprocesses (``amqtask worker -A fault_tasks``).

Everything comes from the environment, so each test points its workers at its own vhost, queue and
sink: ``AMQTASK_*`` settings as usual, ``FAULT_TASK_QUEUES`` (JSON, the ``task_queues`` setting, e.g.
a quorum queue with a delivery limit) and ``FAULT_SINK_QUEUE``.

Each task that "runs" first records its task id (and a nonce for this run) in the sink: a durable
queue, written with a confirmed, persistent publish on the worker's own connection before the task
returns. A record
therefore survives the worker being killed right after it, and the broker being restarted; the
test reads the sink at the end to see which tasks ran, and how many times.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from amqtask import App
from amqtask.protocol import PERSISTENT, WireMessage
from amqtask.task import current_request

app = App("fault_tasks")
if os.environ.get("FAULT_TASK_QUEUES"):
    app.conf.task_queues = json.loads(os.environ["FAULT_TASK_QUEUES"])


async def record_run(app: App, sink: str | None = None) -> None:
    """Publish the running task's id to the sink queue and wait for the broker's confirm."""
    request = current_request.get()
    assert request is not None, "record_run() is called from a running task"
    sink = sink or os.environ["FAULT_SINK_QUEUE"]
    # A nonce per run: a record published twice (its confirm lost to a cut connection, so sent again)
    # is one run, while two runs of the task leave two nonces. The broker's redelivered flag tells a
    # rerun of a requeued delivery from a run of a second copy of the message (a send retried after
    # its confirm was lost).
    redelivered = "r" if request.delivery_info.get("redelivered") else "f"
    body = f"{request.id} {uuid.uuid4().hex} {redelivered}".encode()
    wire = WireMessage(body=body, delivery_mode=PERSISTENT, correlation_id=request.id)
    await app.runtime().publisher.publish(wire, "", sink)


@app.task(name="fault.record")
async def record(n: int) -> int:
    """Record the run in the sink, then return ``n``."""
    await record_run(app)
    return n


@app.task(name="fault.crash")
async def crash() -> None:
    """Record the attempt, then kill the worker process: a poison task."""
    await record_run(app)
    os._exit(1)


@app.task(name="fault.echo")
def echo(value: Any) -> Any:
    """Return the argument (a plain task in the thread pool, for memory runs)."""
    return value


@app.task(name="fault.retry_in", bind=True, max_retries=3)
def retry_in(self: Any, countdown: float) -> None:
    """Ask to run again ``countdown`` seconds later (each time, up to 3 retries): retries under test."""
    raise self.retry(countdown=countdown)
