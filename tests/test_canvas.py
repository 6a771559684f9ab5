"""Canvas against a real broker: chains, callbacks, groups and chords, on one worker and across several.

Workers run in this process (``running_worker``), each with an app of its own where a test needs
"different workers": the apps share nothing but the broker, as separate processes would. Tasks that
must finish out of order sleep inside the task; the tests themselves only await results, with timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from support.queues import delete
from support.workers import running_worker, worker_thread

from amqtask import App, GroupResult, RemoteTaskError, Signature, chain, chord, group, topology
from amqtask.chords import queue_name

pytestmark = pytest.mark.broker
TIMEOUT = 15


def make_app(name: str, broker_url: str, queue: str, trace: list[Any]) -> App:
    """An app with the canvas test tasks; ``trace`` records what ``c.record`` ran with."""
    app = App(name, broker=broker_url, task_default_queue=queue, publish_timeout_s=10)

    @app.task(name="c.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="c.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="c.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="c.boom")
    def boom(*args: Any) -> None:
        raise ValueError("boom")

    @app.task(name="c.record")
    def record(*args: Any) -> list[Any]:
        trace.append(args)
        return list(args)

    @app.task(name="c.nap")
    async def nap(value: Any, seconds: float) -> Any:
        await asyncio.sleep(seconds)  # the task's own work: makes members finish out of order
        return value

    @app.task(name="c.hop", bind=True)
    def hop(self: Any, trail: list[str]) -> list[str]:
        return [*trail, self.request.hostname]

    return app


def s(app: App, name: str, *args: Any) -> Signature:
    return app.tasks[f"c.{name}"].s(*args)


@pytest.fixture
def trace() -> list[Any]:
    return []


@pytest.fixture
def app(broker_url: str, unique: str, trace: list[Any]) -> Iterator[App]:
    application = make_app(f"canvas-{unique}", broker_url, f"q-{unique}", trace)
    yield application
    application.close()


def run(app: App, scenario: Callable[[], Awaitable[None]], concurrency: int = 4) -> None:
    """Run ``scenario`` with a worker for ``app`` on this loop; delete the app's queue afterwards."""

    async def main() -> None:
        async with running_worker(app, concurrency=concurrency):
            await scenario()
        await cleanup(app, [app.conf.task_default_queue])

    asyncio.run(main())


async def cleanup(app: App, queues: list[str]) -> None:
    """Delete the test's queues and close the connection of this loop."""
    await delete(app, queues)
    await app.aclose()


async def chord_queue_left(app: App, group_id: str) -> bool:
    return await topology.queue_exists(app.runtime().broker, queue_name(group_id))


# ---------------------------------------------------------------------------------------------- chains


def test_chain_returns_the_last_result_and_links_back_to_its_parents(app: App) -> None:
    async def scenario() -> None:
        result = await (s(app, "add", 4, 4) | s(app, "mul", 2)).aapply_async()

        assert await result.aget(timeout=TIMEOUT) == 16
        assert result.parent is not None and await result.parent.aget(timeout=TIMEOUT) == 8
        first = app.result_store.get(result.parent.id)
        assert first is not None and first.children == [[[result.id, None], None]]
        three = await chain(s(app, "add", 1, 1), s(app, "add", 2), s(app, "mul", 10)).aapply_async()
        assert await three.aget(timeout=TIMEOUT) == 40

    run(app, scenario)


def test_sync_api_from_the_issue(app: App) -> None:
    with worker_thread(app, concurrency=4):
        assert (s(app, "add", 4, 4) | s(app, "mul", 2))().get(timeout=TIMEOUT) == 16
        assert group(s(app, "add", i, i) for i in range(10))().get(timeout=TIMEOUT) == list(range(0, 20, 2))
        assert chord((s(app, "add", i, i) for i in range(10)), s(app, "tsum"))().get(timeout=TIMEOUT) == 90
        assert s(app, "add", 1, 2).delay().get(timeout=TIMEOUT) == 3
    asyncio.run(cleanup(app, [app.conf.task_default_queue]))


def test_chain_steps_run_on_the_workers_of_their_queues(broker_url: str, unique: str, trace: list[Any]) -> None:
    client = make_app(f"client-{unique}", broker_url, f"q-{unique}", trace)
    one, two = (make_app(f"w{i}-{unique}", broker_url, f"q-{unique}", trace) for i in (1, 2))
    qa, qb = f"qa-{unique}", f"qb-{unique}"

    def hop(queue: str, *args: Any) -> Signature:
        return s(client, "hop", *args).set(queue=queue)

    async def main() -> None:
        async with running_worker(one, queues=[qa], hostname="one"), running_worker(two, queues=[qb], hostname="two"):
            trail = await (hop(qa, []) | hop(qb) | hop(qa) | hop(qb)).aapply_async()
            assert await trail.aget(timeout=TIMEOUT) == ["one", "two", "one", "two"]
            # Options of the whole chain reach every step that has none of its own.
            same = await chain(s(client, "hop", []), s(client, "hop"), hop(qa)).aapply_async(queue=qb)
            assert await same.aget(timeout=TIMEOUT) == ["two", "two", "one"]
        await cleanup(client, [qa, qb])

    asyncio.run(main())
    for each in (client, one, two):
        each.close()


def test_a_failure_stops_the_chain_runs_link_error_and_fails_the_later_steps(app: App, trace: list[Any]) -> None:
    async def scenario() -> None:
        errback = s(app, "record")
        errback_result = errback.freeze()
        canvas = chain(s(app, "add", 1, 1), s(app, "boom"), s(app, "record", "never"), link_error=errback)
        result = await canvas.aapply_async()

        with pytest.raises(ValueError, match="boom"):
            await result.aget(timeout=TIMEOUT)
        failed = result.parent
        assert failed is not None and isinstance(await failed.aget(timeout=TIMEOUT, propagate=False), ValueError)
        # Celery's task-id errback convention: the errback gets the id of the task that failed.
        assert await errback_result.aget(timeout=TIMEOUT) == [failed.id]
        assert trace == [(failed.id,)]

    run(app, scenario)


def test_a_step_that_cannot_be_sent_fails_the_chain(app: App) -> None:
    async def scenario() -> None:
        nowhere = s(app, "mul", 2).set(exchange="amq.direct", routing_key="nowhere")  # bound to no queue
        result = await (s(app, "add", 1, 1) | nowhere | s(app, "add", 1)).aapply_async()

        with pytest.raises(RemoteTaskError, match="no queue is bound"):
            await result.aget(timeout=TIMEOUT)
        assert result.parent is not None and result.parent.parent is not None
        assert await result.parent.parent.aget(timeout=TIMEOUT) == 2

    run(app, scenario)


def test_a_step_no_worker_knows_fails_the_rest_of_the_chain(app: App) -> None:
    async def scenario() -> None:
        unknown = Signature("c.nobody_registered_this", (), {}, app=app)
        result = await (s(app, "add", 1, 1) | unknown | s(app, "add", 1)).aapply_async()

        with pytest.raises(RemoteTaskError, match="not registered"):
            await result.aget(timeout=TIMEOUT)

    run(app, scenario)


def test_link_gets_the_result_unless_immutable(app: App) -> None:
    async def scenario() -> None:
        partial, immutable = s(app, "mul", 10), app.tasks["c.add"].si(1, 1)
        results = partial.freeze(), immutable.freeze()
        first = await s(app, "add", 2, 2).aapply_async(link=[partial, immutable])

        assert await first.aget(timeout=TIMEOUT) == 4
        assert [await r.aget(timeout=TIMEOUT) for r in results] == [40, 2]

    run(app, scenario)


# ---------------------------------------------------------------------------------------------- groups


def test_group_result_keeps_the_order_and_reports_progress(app: App) -> None:
    async def scenario() -> None:
        members = group(s(app, "nap", i, 0.02 * (5 - i)) for i in range(5))
        result = await members.aapply_async()

        assert isinstance(result, GroupResult) and len(result.results) == 5
        assert await result == [0, 1, 2, 3, 4]
        assert result.ready() and result.successful() and not result.failed()
        assert result.completed_count() == 5 and result.state == "SUCCESS"

        mixed = await group(s(app, "add", 1, 1), s(app, "boom"), s(app, "add", 2, 2)).aapply_async()
        with pytest.raises(ValueError, match="boom"):
            await mixed.aget(timeout=TIMEOUT)
        values = await mixed.aget(timeout=TIMEOUT, propagate=False)
        assert values[0] == 2 and isinstance(values[1], ValueError) and values[2] == 4
        assert mixed.failed() and mixed.completed_count() == 2 and mixed.state == "FAILURE"

    run(app, scenario)


def test_group_inside_a_chain_passes_the_list_on(app: App) -> None:
    async def scenario() -> None:
        fan = group(s(app, "add", 1), s(app, "add", 2))
        result = await (s(app, "add", 1, 1) | fan | s(app, "tsum") | s(app, "mul", 10)).aapply_async()

        assert await result.aget(timeout=TIMEOUT) == 70  # (2 + 1) + (2 + 2), times 10
        ended = await (s(app, "add", 1, 1) | group(s(app, "add", 1), s(app, "add", 2))).aapply_async()
        assert isinstance(ended, GroupResult) and await ended.aget(timeout=TIMEOUT) == [3, 4]

    run(app, scenario)


# ---------------------------------------------------------------------------------------------- chords


def test_chord_body_gets_the_header_results_in_group_order(app: App) -> None:
    async def scenario() -> None:
        # The last member finishes first: completion order is the reverse of group order.
        header = [s(app, "nap", i, 0.03 * (6 - i)) for i in range(6)]
        result = await chord(header, s(app, "record")).aapply_async()

        assert await result.aget(timeout=TIMEOUT) == [[0, 1, 2, 3, 4, 5]]
        # Every header reply comes after its worker's chord check, so the chord is cleaned up by now.
        assert isinstance(result.parent, GroupResult) and await result.parent == [0, 1, 2, 3, 4, 5]
        assert not await chord_queue_left(app, result.parent.id)

    run(app, scenario, concurrency=8)


def test_chord_with_chains_in_its_header_and_a_continued_body(app: App) -> None:
    async def scenario() -> None:
        header = [s(app, "add", 1, 1) | s(app, "mul", 2), s(app, "add", 3, 3)]
        result = await (chord(header, s(app, "tsum")) | s(app, "mul", 10)).aapply_async()

        assert await result.aget(timeout=TIMEOUT) == 100
        empty = await chord([], s(app, "record")).aapply_async()
        assert await empty.aget(timeout=TIMEOUT) == [[]]

    run(app, scenario)


def test_a_failed_header_task_fails_the_chord_and_the_body_never_runs(app: App, trace: list[Any]) -> None:
    async def scenario() -> None:
        errback = s(app, "record", "errback")
        errback_result = errback.freeze()
        header = [s(app, "nap", 1, 0.1), s(app, "boom"), s(app, "nap", 3, 0.1)]
        result = await chord(header, s(app, "record", "body"), link_error=errback).aapply_async()

        with pytest.raises(ValueError, match="boom"):
            await result.aget(timeout=TIMEOUT)
        assert isinstance(result.parent, GroupResult)
        first, failed, third = await result.parent.aget(timeout=TIMEOUT, propagate=False)
        assert (first, third) == (1, 3) and isinstance(failed, ValueError)
        # The body's errback ran, once, when the last header task had finished, with the body's id.
        assert await errback_result.aget(timeout=TIMEOUT) == [result.id, "errback"]
        assert trace == [(result.id, "errback")]  # and the body never ran
        assert not await chord_queue_left(app, result.parent.id)

    run(app, scenario)


def test_chord_across_two_workers_and_queues(broker_url: str, unique: str, trace: list[Any]) -> None:
    client = make_app(f"client-{unique}", broker_url, f"q-{unique}", trace)
    one, two = (make_app(f"w{i}-{unique}", broker_url, f"q-{unique}", trace) for i in (1, 2))
    qa, qb = f"qa-{unique}", f"qb-{unique}"

    async def main() -> None:
        async with running_worker(one, queues=[qa], hostname="one"), running_worker(two, queues=[qb], hostname="two"):
            header = [s(client, "hop", [str(i)]).set(queue=(qa, qb)[i % 2]) for i in range(6)]
            result = await chord(header, s(client, "record").set(queue=qb)).aapply_async()
            assert await result.aget(timeout=TIMEOUT) == [[[str(i), ("one", "two")[i % 2]] for i in range(6)]]
        await cleanup(client, [qa, qb])

    asyncio.run(main())
    for each in (client, one, two):
        each.close()
