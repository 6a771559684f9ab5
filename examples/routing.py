"""Routing: queues on exchanges, task_routes, per-task and per-call options, workers per queue.

``python routing.py`` sends a few tasks and runs two workers in this process: one for the media
queues, one for the rest. In production the same split is two commands:

    amqtask worker -A routing -Q images,video      # the media workers (more CPU)
    amqtask worker -A routing -X images,video      # everything else

``amqtask topology verify -A routing`` checks the broker against this configuration, changing nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from amqtask import App, Worker

# The broker URL comes from AMQTASK_BROKER_URL when set (amqp://guest:guest@localhost:5672// otherwise).
app = App(
    "routing",
    task_queues={
        # A topic exchange: each queue gets the routing keys its bindings match.
        "images": {"exchange": "media", "exchange_type": "topic", "binding_keys": ["image.*"]},
        "video": {"exchange": "media", "exchange_type": "topic", "binding_keys": ["video.#"]},
        # A quorum queue (replicated); a message that kills its worker 5 times goes to emails.dlq.
        "emails": {"queue_type": "quorum", "delivery_limit": 5},
        # Any x- argument RabbitMQ knows: at most 10,000 waiting reports, then publishers are refused.
        "reports": {"arguments": {"x-max-length": 10_000, "x-overflow": "reject-publish"}},
    },
    task_routes=[
        {"routing.send_*": "emails", "routing.report": {"queue": "reports"}},
        # A function sees the call's arguments (Celery's (name, args, kwargs, options, task) works too).
        lambda name, args, kwargs: "video" if kwargs.get("video") else None,
    ],
)


@app.task(name="routing.resize", queue="images", bind=True)  # the task's own route
def resize(self: Any, path: str) -> str:
    return f"resized {path} from {self.request.delivery_info['queue']}"


@app.task(name="routing.transcode", bind=True)
def transcode(self: Any, path: str, video: bool = True) -> str:
    return f"transcoded {path} from {self.request.delivery_info['queue']}"


@app.task(name="routing.send_welcome", bind=True)
def send_welcome(self: Any, address: str) -> str:
    return f"mailed {address} from {self.request.delivery_info['queue']}"


@app.task(name="routing.report", bind=True)
def report(self: Any, day: str) -> str:
    return f"report for {day} from {self.request.delivery_info['queue']}"


async def main() -> None:
    media = Worker(app, queues=["images", "video"], hostname="media@example")
    rest = Worker(app, exclude_queues=["images", "video"], hostname="rest@example")
    await media.start()
    await rest.start()
    try:
        results = [
            await resize.adelay("cat.png"),  # the task says images
            await transcode.aapply_async(("talk.mp4",), {"video": True}),  # the function says video
            await send_welcome.adelay("ada@example.com"),  # task_routes (glob) says emails
            await report.adelay("2026-01-01"),  # task_routes (exact) says reports
            await resize.aapply_async(("huge.png",), queue="default"),  # the call overrides the task
            # Straight to an exchange: the topic binding "image.*" picks the queue.
            await app.asend_task("routing.resize", ("dog.png",), exchange="media", routing_key="image.png"),
        ]
        for result in results:
            print(await result.aget(timeout=10))
    finally:
        await media.stop()
        await rest.stop()


if __name__ == "__main__":
    asyncio.run(main())
