"""Time limits on a real worker: the soft limit raises SoftTimeLimitExceeded in the task (which may catch
it and clean up), the hard limit fails the task with TimeLimitExceeded; both for plain and async tasks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support.workers import running_worker

from amqtask import App, RemoteTaskError, SoftTimeLimitExceeded, TimeLimitExceeded, TimeoutError

pytestmark = pytest.mark.broker

SOFT = 0.2


released = threading.Event()  # set at teardown: a thread that ignores both limits runs on until it returns


def cleans_up() -> str:
    try:
        while True:  # busy Python code, interruptible at any instruction
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "cleaned up"


def overruns() -> None:
    while True:
        time.sleep(0.01)


def ignores_soft() -> str:
    while True:
        try:
            if released.wait(0.01):
                return "released"
        except SoftTimeLimitExceeded:
            pass


def ignores_both() -> str:
    while True:
        try:
            if released.wait(0.01):
                return "released"
        except (SoftTimeLimitExceeded, TimeLimitExceeded):
            pass


def quick() -> str:
    return "quick"


def thread_name() -> str:
    return threading.current_thread().name


async def async_cleans_up() -> str:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return "cleaned up"
    return "never"


async def async_overruns() -> None:
    await asyncio.Event().wait()


def own_timeout() -> None:
    raise TimeoutError("the result it waited for did not arrive")


async def async_own_timeout() -> None:
    await asyncio.wait_for(asyncio.Event().wait(), 0.01)


TASKS: dict[str, tuple[Callable[[], object], dict[str, float]]] = {
    "limits.cleans_up": (cleans_up, {"soft_time_limit": SOFT}),
    "limits.overruns": (overruns, {"soft_time_limit": SOFT}),
    "limits.ignores_soft": (ignores_soft, {"soft_time_limit": SOFT, "time_limit": 2 * SOFT}),
    "limits.ignores_both": (ignores_both, {"soft_time_limit": SOFT, "time_limit": 2 * SOFT}),
    "limits.quick": (quick, {"soft_time_limit": SOFT, "time_limit": 2 * SOFT}),
    "limits.thread_name": (thread_name, {}),
    "limits.async_cleans_up": (async_cleans_up, {"soft_time_limit": SOFT}),
    "limits.async_overruns": (async_overruns, {"soft_time_limit": SOFT}),
    "limits.async_hard": (async_overruns, {"time_limit": SOFT}),
    "limits.own_timeout": (own_timeout, {}),
    "limits.own_timeout_limited": (own_timeout, {"time_limit": 30}),
    "limits.async_own_timeout": (async_own_timeout, {}),
    "limits.async_own_timeout_limited": (async_own_timeout, {"time_limit": 30}),
}


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"limits-{unique}", broker=broker_url, task_default_queue=f"q-{unique}")
    for name, (fn, limits) in TASKS.items():
        application.task(name=name, **limits)(fn)
    released.clear()
    yield application
    released.set()
    application.close()


def _outcome(app: App, name: str, **options: object) -> object:
    async def scenario() -> object:
        async with running_worker(app, concurrency=1):
            result = await app.asend_task(name, **options)
            try:
                return await result.aget(timeout=30)
            except RemoteTaskError as exc:
                return exc

    return asyncio.run(scenario())


@pytest.mark.parametrize("name", ["limits.cleans_up", "limits.async_cleans_up"])
def test_a_task_that_catches_its_soft_limit_cleans_up_and_returns(app: App, name: str) -> None:
    assert _outcome(app, name) == "cleaned up"


@pytest.mark.parametrize("name", ["limits.overruns", "limits.async_overruns"])
def test_a_task_that_does_not_catch_its_soft_limit_fails_with_it(app: App, name: str) -> None:
    error = _outcome(app, name)
    assert isinstance(error, RemoteTaskError) and error.exc_type == "SoftTimeLimitExceeded"
    assert f"soft time limit of {SOFT}s" in str(error)


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("limits.own_timeout", "amqtask.errors"),
        ("limits.own_timeout_limited", "amqtask.errors"),
        ("limits.async_own_timeout", "builtins"),
        ("limits.async_own_timeout_limited", "builtins"),
    ],
)
def test_a_timeout_the_task_raises_itself_is_its_failure_not_a_time_limit(app: App, name: str, module: str) -> None:
    """amqtask's TimeoutError is the builtin one too: the worker must not take it for its own time limit."""
    error = _outcome(app, name)
    assert isinstance(error, RemoteTaskError)
    assert (error.exc_type, error.exc_module) == ("TimeoutError", module)
    assert "time limit" not in str(error)


@pytest.mark.parametrize(
    ("name", "error"),
    [("limits.overruns", "exceeded its soft time limit"), ("limits.ignores_soft", "exceeded its time limit")],
)
def test_a_limit_frees_the_thread_for_the_next_task(app: App, name: str, error: str) -> None:
    """A thread cannot be killed, but the exception raised in it ends a task that does not catch it."""

    async def scenario() -> None:
        async with running_worker(app, concurrency=1):
            overrun = await app.asend_task(name)
            after = await app.asend_task("limits.thread_name")
            with pytest.raises(RemoteTaskError, match=error):
                await overrun.aget(timeout=30)
            assert (await after.aget(timeout=30)).startswith("amqtask-task")

    asyncio.run(scenario())


def test_a_task_that_catches_both_limits_keeps_its_thread(app: App) -> None:
    async def scenario() -> None:
        async with running_worker(app, concurrency=1):
            stubborn = await app.asend_task("limits.ignores_both")
            after = await app.asend_task("limits.thread_name")
            with pytest.raises(RemoteTaskError, match="exceeded its time limit"):
                await stubborn.aget(timeout=30)
            assert not after.ready()  # the one thread is still taken
            released.set()
            assert (await after.aget(timeout=30)).startswith("amqtask-task")

    asyncio.run(scenario())


def test_limits_start_when_the_task_starts_not_while_it_waits_for_a_thread(app: App) -> None:
    """A task handed to the pool while its only thread is kept (by a task that ignores both limits)
    waits longer than its own limits, then runs in no time: it succeeds."""

    async def scenario() -> None:
        async with running_worker(app, concurrency=1):
            stubborn = await app.asend_task("limits.ignores_both")
            waiting = await app.asend_task("limits.quick")
            with pytest.raises(RemoteTaskError, match="exceeded its time limit"):
                await stubborn.aget(timeout=30)
            # The thread is still kept: the waiting task cannot start, and must not fail meanwhile.
            with pytest.raises(TimeoutError):
                await waiting.aget(timeout=5 * SOFT)
            released.set()
            assert await waiting.aget(timeout=30) == "quick"

    asyncio.run(scenario())


def test_the_soft_limit_sent_with_the_call_wins_over_the_tasks(app: App) -> None:
    error = _outcome(app, "limits.async_overruns", soft_time_limit=2 * SOFT)
    assert isinstance(error, RemoteTaskError) and f"soft time limit of {2 * SOFT}s" in str(error)


@pytest.mark.parametrize("name", ["limits.ignores_soft", "limits.async_hard"])
def test_the_hard_limit_fails_a_task_that_runs_past_it(app: App, name: str) -> None:
    error = _outcome(app, name)
    assert isinstance(error, RemoteTaskError) and error.exc_type == "TimeLimitExceeded"
    assert "exceeded its time limit" in str(error)
