"""The Celery side of benchmarks/vs_celery.py: one no-op task on the queue named in BENCH_QUEUE."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_BROKER_URL"], backend="rpc://")
app.conf.update(
    task_default_queue=os.environ["BENCH_QUEUE"],
    task_serializer="json",
    task_acks_late=True,  # the same guarantee amqtask gives: ack after the task ran
    worker_prefetch_multiplier=4,
    broker_transport_options={"confirm_publish": True},  # the same guarantee amqtask gives on send
)


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    return None
