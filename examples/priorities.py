"""Priorities: under a backlog, urgent tasks start first.

``python priorities.py`` queues 12 tasks of mixed priorities *before* any worker runs, then drains
them with one worker of concurrency 1 and prefetch 1 (``Worker(..., burst=True)`` returns once the
queue is empty) and prints the order they started in: highest priority first, equal priorities in
the order they were sent. The same worker from the command line:

    amqtask worker -A priorities -Q work -c 1 --prefetch-multiplier 1

Prefetch matters: a worker holding 40 prefetched messages starts them in the order it got them, so a
priority only reorders what is still in the queue. Keep prefetch low where priorities matter.
"""

from __future__ import annotations

import asyncio
import random

from amqtask import App, Worker

# The broker URL comes from AMQTASK_BROKER_URL when set (amqp://guest:guest@localhost:5672// otherwise).
app = App(
    "priorities",
    task_default_queue="work",
    task_default_priority=0,  # messages without a priority count as 0 anyway; this makes it explicit
    # x-max-priority 10 on a classic queue; a quorum queue takes no max_priority (RabbitMQ 4.0-4.2 has
    # two priority classes, 4.3 has 32 levels, 3.x none).
    task_queues={"work": {"max_priority": 10}},
)
started: list[str] = []


@app.task(name="priorities.job", ignore_result=True)
def job(label: str) -> None:
    started.append(label)


# A task's own priority; a call can override it.
@app.task(name="priorities.page_oncall", priority=9, ignore_result=True)
def page_oncall(label: str) -> None:
    started.append(label)


async def main() -> None:
    await page_oncall.adelay("page on-call (task priority 9)")
    for n in range(10):
        priority = random.randint(0, 8)
        await job.aapply_async((f"job {n} (priority {priority})",), priority=priority)
    await page_oncall.aapply_async(("page, demoted by the call to 1",), priority=1)
    await Worker(app, queues=["work"], concurrency=1, prefetch_multiplier=1, burst=True).run()
    print("\n".join(started))


if __name__ == "__main__":
    asyncio.run(main())
