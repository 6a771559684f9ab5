"""The amqtask side of benchmarks/vs_celery.py: the same no-op task, as a plain (threaded) task."""

from __future__ import annotations

import os

from amqtask import App

app = App("bench", broker=os.environ["BENCH_BROKER_URL"], task_default_queue=os.environ["BENCH_QUEUE"],
          task_serializer="json", worker_prefetch_multiplier=4)  # fmt: skip


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    return None
