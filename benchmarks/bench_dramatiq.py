"""Dramatiq's figures for run.py; also the actors its worker runs (``dramatiq bench_dramatiq``).

Dramatiq's documented defaults for its RabbitMQ broker: no publisher confirms (``confirm_delivery``
off), acks after the actor ran, prefetch of twice the worker threads, the default middleware. It
has no RabbitMQ result backend (results need Redis or Memcached), so no result or round-trip figures.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(url=os.environ.get("BENCH_URL"))
dramatiq.set_broker(broker)
QUEUE = os.environ.get("BENCH_QUEUE", "bench")


@dramatiq.actor(actor_name="bench.noop", queue_name=QUEUE)
def noop(i: int) -> None:
    return None


def main() -> None:
    from harness import Worker, emit, rate, sequential_rate, settings, worker_command

    s = settings()
    n, prefix = s["count"], s["prefix"]
    figures: dict[str, Any] = {}

    def send(i: int, queue: str) -> None:
        broker.enqueue(noop.message(i).copy(queue_name=queue))

    seq, drain = f"{prefix}-dramatiq-seq", f"{prefix}-dramatiq-def"
    broker.declare_queue(seq)
    broker.declare_queue(drain)
    figures["enqueue_sequential"] = sequential_rate(lambda i: send(i, seq), s["sequential"])
    figures["enqueue_bulk"] = rate(
        lambda: dramatiq.group(noop.message(i).copy(queue_name=drain) for i in range(n)).run(), n
    )

    command = worker_command("-m", "dramatiq", "bench_dramatiq", "--processes", "1",
                             "--threads", str(s["concurrency"]), "--queues", drain)  # fmt: skip
    worker = Worker(command, s["url"], drain)
    try:
        figures["drain_def"] = worker.drain(n)
    finally:
        worker.stop()
    emit(figures)


if __name__ == "__main__":
    main()
