"""A FastAPI service that sends tasks to amqtask workers and awaits their results (no thread, no blocking).

Run a worker for the tasks and the API (AMQTASK_BROKER_URL points at the broker)::

    amqtask worker -A main
    uvicorn main:api

``POST /reports?pages=3`` enqueues and answers with the task id at once; ``GET /sum?x=2&y=3`` waits for
the result, at most ``timeout`` seconds (504 after that; the task still runs).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException

import amqtask
from amqtask import App

tasks = App("fastapi-example", task_default_queue=os.environ.get("EXAMPLE_QUEUE", "default"))


@tasks.task(name="example.add")
async def add(x: int, y: int) -> int:
    return x + y


@tasks.task(name="example.report")
async def report(pages: int) -> str:
    await asyncio.sleep(0.1 * pages)  # stands for slow work
    return f"report of {pages} page(s)"


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    # Connect at startup (a broker that is down fails the startup), close at shutdown.
    async with tasks.lifespan():
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/reports", status_code=202)
async def enqueue_report(pages: int) -> dict[str, str]:
    result = await report.adelay(pages)  # returns once the broker confirmed the message
    return {"task_id": result.id}


@api.get("/sum")
async def sum_now(x: int, y: int, timeout: float = 5.0) -> dict[str, int]:
    result = await add.adelay(x, y)
    try:
        return {"sum": await result.aget(timeout=timeout)}
    except amqtask.TimeoutError:
        raise HTTPException(504, f"no result within {timeout}s; task {result.id} may still run") from None
