"""Type-checked (not run) by tests/test_typing.py: what mypy must accept and reject for users."""

from typing import assert_type

from amqtask import App, AsyncResult, Task

app = App("typing")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="q")
async def fetch(url: str) -> bytes:
    return b""


@app.task(bind=True, max_retries=3)
def bound(self: Task[[int], int], x: int) -> int:
    return x


async def callers() -> None:
    assert_type(add.delay(1, 2), AsyncResult[int])
    assert_type(await fetch.adelay("u"), AsyncResult[bytes])
    assert_type(await (await fetch.adelay("u")).aget(), bytes)
    assert_type(bound.delay(1), AsyncResult[int])
    add.delay(1, "x")  # type: ignore[arg-type]
    fetch.delay(1)  # type: ignore[arg-type]
    bound.delay("x")  # type: ignore[arg-type]
