"""Workflows: chains, groups and chords, with RabbitMQ as the only server.

Run a worker with ``amqtask worker -A canvas`` (from this directory, with ``AMQTASK_BROKER_URL``
pointing at your broker), then ``python canvas.py``. Start a second worker, or a few, to watch the
steps spread over them: any worker can run any step, and a chord completes whichever worker finishes
its last header task.
"""

from __future__ import annotations

from amqtask import App, chain, chord, group

# The broker URL comes from AMQTASK_BROKER_URL when set (amqp://guest:guest@localhost:5672// otherwise).
# Tasks get explicit names because this file also runs as __main__, where the default names would differ.
app = App("canvas")


@app.task(name="canvas.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="canvas.tsum")
def tsum(numbers: list[int]) -> int:
    return sum(numbers)


@app.task(name="canvas.fail")
def fail(*args: object) -> None:
    raise ValueError("this step fails")


@app.task(name="canvas.report_failure")
def report_failure(task_id: str) -> str:
    """An errback: called with the id of the task that failed."""
    return f"task {task_id} failed"


if __name__ == "__main__":
    # A chain passes each result on as the next step's first argument: (4 + 4) * 2.
    print("chain:", (add.s(4, 4) | mul.s(2))().get(timeout=10))
    result = chain(add.s(1, 1), add.s(2), mul.s(10)).apply_async()
    print("chain of three:", result.get(timeout=10), "- its first step gave", result.parent.parent.get(timeout=10))

    # A group runs in parallel; its results come back in the order of the group.
    print("group:", group(add.s(i, i) for i in range(10))().get(timeout=10))

    # A chord hands the group's results, in order, to its body; a group followed by a task is one too.
    print("chord:", chord((add.s(i, i) for i in range(10)), tsum.s())().get(timeout=10))
    print("group in a chain:", (add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s())().get(timeout=10))

    # A failing step stops the chain: get() raises its error, and link_error runs with its task id.
    errback = report_failure.s()
    errback_result = errback.freeze()  # pre-assigns the errback's id, so we can wait for its result
    failing = (add.s(1, 1) | fail.s() | mul.s(2)).apply_async(link_error=errback)
    try:
        failing.get(timeout=10)
    except ValueError as exc:
        print("chain failed:", exc, "/", errback_result.get(timeout=10))
