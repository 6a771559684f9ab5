"""Task retries: the policy (pure), then retries through the broker's delay levels and the dead-letter queue.

A retry is a new message in the broker (retries + 1) confirmed before the attempt is acked, so it
survives the worker; after the last attempt the message lands in ``<queue>.dlq`` with the exception
in its headers and the caller gets the failure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from support.queues import delete, eventually
from support.workers import get_raw, running_worker

from amqtask import App, Task, topology
from amqtask.retry import autoretry_delay, backoff_delay, retry_countdown

# ------------------------------------------------------------------------------------------- pure


def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    delays = [backoff_delay(n, factor=1, maximum=10, jitter=False) for n in range(6)]
    assert delays == [1, 2, 4, 8, 10, 10]
    assert backoff_delay(2, factor=3, maximum=600, jitter=False) == 12


def test_jitter_stays_between_zero_and_the_capped_backoff() -> None:
    for retries in range(8):
        cap = min(5.0, 2.0**retries)
        assert all(0 <= backoff_delay(retries, factor=1, maximum=5, jitter=True) <= cap for _ in range(50))


def _task(**options: Any) -> Task[..., Any]:
    app = App("retry-policy", task_default_retry_delay=7)
    return app.task(name="policy.t", **options)(lambda: None)


def test_countdown_comes_from_the_call_then_backoff_then_the_default_delay() -> None:
    assert retry_countdown(_task(), 0, None) == 7  # the app's task_default_retry_delay
    assert retry_countdown(_task(default_retry_delay=3), 0, None) == 3
    assert retry_countdown(_task(default_retry_delay=3), 0, 0.5) == 0.5
    assert retry_countdown(_task(retry_backoff=2, retry_jitter=False), 3, None) == 16
    assert retry_countdown(_task(retry_backoff=True, retry_backoff_max=5, retry_jitter=False), 9, None) == 5


def test_autoretry_picks_exceptions_and_respects_max_retries() -> None:
    task = _task(autoretry_for=(OSError,), dont_autoretry_for=(FileNotFoundError,), max_retries=2,
                 default_retry_delay=1)  # fmt: skip
    assert autoretry_delay(task, ConnectionError(), 0) == 1
    assert autoretry_delay(task, ConnectionError(), 2) is None  # used up
    assert autoretry_delay(task, FileNotFoundError(), 0) is None  # excluded
    assert autoretry_delay(task, ValueError(), 0) is None  # not listed
    tuned = _task(autoretry_for=(OSError,), retry_kwargs={"max_retries": 5, "countdown": 0.25})
    assert autoretry_delay(tuned, OSError(), 4) == 0.25
    assert autoretry_delay(tuned, OSError(), 5) is None


# ------------------------------------------------------------------------------------------- broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"retry-{unique}", broker=broker_url, task_default_queue=f"{unique}-q")
    yield application
    application.close()


def run_with_worker(app: App, scenario: Any, **worker_options: Any) -> None:
    """Run ``scenario()`` with a worker on the app's default queue; delete the queue afterwards."""

    async def main() -> None:
        try:
            async with running_worker(app, **worker_options):
                await scenario()
        finally:
            await delete(app, [app.conf.task_default_queue])
            await app.aclose()

    asyncio.run(main())


@pytest.mark.broker
def test_self_retry_runs_again_with_the_request_context_and_returns_the_value(app: App) -> None:
    seen: list[dict[str, Any]] = []

    @app.task(name="retry.flaky", bind=True, max_retries=3)
    def flaky(self: Task[[], Any], fail_times: int) -> str:
        request = self.request
        seen.append({"id": request.id, "retries": request.retries, "tenant": request.headers.get("x-tenant"),
                     "queue": request.delivery_info["queue"]})  # fmt: skip
        if request.retries < fail_times:
            # The first retry waits in the broker's delay levels, the second goes straight back.
            raise self.retry(exc=ConnectionError("try later"), countdown=1 - request.retries)
        return f"done after {request.retries} retries"

    async def scenario() -> None:
        result = await flaky.aapply_async((2,), headers={"x-tenant": "acme"})
        assert await result.aget(timeout=15) == "done after 2 retries"

    run_with_worker(app, scenario)
    assert [s["retries"] for s in seen] == [0, 1, 2]
    assert {s["id"] for s in seen} == {seen[0]["id"]}
    assert all(s["tenant"] == "acme" and s["queue"] == app.conf.task_default_queue for s in seen)


@pytest.mark.broker
def test_autoretry_with_backoff_until_it_succeeds(app: App) -> None:
    attempts: list[int] = []

    @app.task(name="retry.auto", bind=True, autoretry_for=(ConnectionError,), retry_backoff=True,
              retry_backoff_max=1, max_retries=5)  # fmt: skip
    def auto(self: Task[[], Any]) -> int:
        attempts.append(self.request.retries)
        if len(attempts) < 3:
            raise ConnectionError("flaky network")
        return len(attempts)

    async def scenario() -> None:
        assert await (await auto.adelay()).aget(timeout=15) == 3

    run_with_worker(app, scenario)
    assert attempts == [0, 1, 2]


@pytest.mark.broker
def test_after_the_last_attempt_the_message_is_dead_lettered_with_the_exception(app: App, broker_url: str) -> None:
    @app.task(name="retry.doomed", autoretry_for=(ValueError,), max_retries=2, default_retry_delay=0)
    def doomed(order: int) -> None:
        raise ValueError(f"order {order} is invalid")

    dlq = app.conf.task_default_queue + ".dlq"

    async def scenario() -> None:
        result = await doomed.adelay(42)
        with pytest.raises(ValueError, match="order 42 is invalid"):
            await result.aget(timeout=15)
        dead = await get_raw(broker_url, dlq)
        headers = dead.headers
        assert headers["id"] == result.id and headers["task"] == "retry.doomed"
        assert headers["retries"] == 2
        assert headers["x-amqtask-reason"] == "failed"
        assert headers["x-amqtask-exception-type"] == "ValueError"
        assert headers["x-amqtask-exception-message"] == "order 42 is invalid"
        assert 'raise ValueError(f"order {order} is invalid")' in str(headers["x-amqtask-traceback"])
        assert headers["x-amqtask-worker"] == "retry-worker@test"
        failed_at = dt.datetime.fromisoformat(str(headers["x-amqtask-failed-at"]))
        assert abs((dt.datetime.now(dt.timezone.utc) - failed_at).total_seconds()) < 30
        assert headers["x-amqtask-queue"] == app.conf.task_default_queue
        assert not any(key.startswith(("x-death", "x-first-death")) for key in headers)

    run_with_worker(app, scenario, hostname="retry-worker@test")


@pytest.mark.broker
def test_a_pending_retry_lives_in_the_broker_and_survives_a_worker_restart(app: App) -> None:
    @app.task(name="retry.once", bind=True)
    def once(self: Task[[], Any]) -> str:
        if not self.request.retries:
            raise self.retry(countdown=2)
        return f"{self.request.hostname} ran retry {self.request.retries}"

    queue = app.conf.task_default_queue

    async def scenario() -> None:
        try:
            async with running_worker(app, hostname="first@test"):
                result = await once.adelay()

                async def retrying() -> bool:
                    return result.state == "RETRY"

                await eventually(retrying, what="the RETRY report")
            # The first worker is gone mid-backoff; the retry waits in the delay levels, not in a queue.
            assert await topology.queue_depth(app.runtime().broker, queue) == 0
            async with running_worker(app, hostname="second@test"):
                # Stopping the first worker closed this loop's connections, result consumer included.
                await app.runtime().results.ensure_started()
                assert await result.aget(timeout=15) == "second@test ran retry 1"
        finally:
            await delete(app, [queue])
            await app.aclose()

    asyncio.run(scenario())
