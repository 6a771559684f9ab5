"""Running one task: ``async def`` tasks on the worker's event loop, plain ones in a thread pool.

The request context (``self.request``) is a context variable, set around the call; for threads the
context is copied into the thread explicitly, since ``run_in_executor`` does not. A hard time limit
(``time_limit``) stops waiting for the task and fails it; an async task is cancelled, a thread cannot
be killed in Python, so a sync task that overruns keeps its thread until it returns (documented).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import AmqtaskError
from ..task import Request, Task, current_request


class TimeLimitExceeded(AmqtaskError):
    """A task ran longer than its hard time limit."""


class Executor:
    """Runs task functions: coroutines on the loop, sync functions in ``concurrency`` threads."""

    def __init__(self, concurrency: int) -> None:
        self.threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="amqtask-task")

    async def run(self, task: Task[Any, Any], request: Request, time_limit: float | None) -> Any:
        """Call the task with the request's arguments and return its result (or raise its exception)."""
        token = current_request.set(request)
        try:
            if task.is_async:
                call = task(*request.args, **request.kwargs)
            else:
                context = contextvars.copy_context()
                fn = functools.partial(context.run, task, *request.args, **request.kwargs)
                call = asyncio.get_running_loop().run_in_executor(self.threads, fn)
            if time_limit:
                try:
                    return await asyncio.wait_for(call, time_limit)
                except asyncio.TimeoutError:
                    raise TimeLimitExceeded(
                        f"task {task.name}[{request.id}] exceeded its time limit of {time_limit}s"
                    ) from None
            return await call
        finally:
            current_request.reset(token)

    def shutdown(self) -> None:
        """Release the thread pool without waiting for threads still running."""
        self.threads.shutdown(wait=False, cancel_futures=True)
