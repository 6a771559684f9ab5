"""Routing against a real broker: messages land in the queues that exchanges, bindings, ``task_routes``
and per-task and per-call options say, and workers consume exactly the queues they are given.

The pure rules (precedence, globs, functions) are tested without a broker in ``test_routing_rules.py``;
here the broker itself decides where each message goes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import broker_tasks
import pytest
from support.broker import TestBroker
from support.queues import QueueStats, delete, run_cli
from support.workers import running_worker

from amqtask import App, Task, UnroutableError, topology

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"routing-{unique}", broker=broker_url, task_default_queue=f"{unique}-default")
    yield application
    application.close()


def define_echo(app: App) -> Task[[], dict[str, Any]]:
    @app.task(name="r.echo", bind=True)
    def echo(self: Any) -> dict[str, Any]:
        """Where and how the message arrived."""
        info = self.request.delivery_info
        return {"queue": info["queue"], "priority": info["priority"], "tenant": self.request.headers.get("x-tenant")}

    return echo


async def declare_all(app: App) -> None:
    for spec in app.router.all_queues():
        await topology.declare_queue(app.runtime().broker, spec)


async def depths(app: App, names: list[str]) -> list[int]:
    return [await topology.queue_depth(app.runtime().broker, name) for name in names]


def test_each_exchange_type_delivers_to_the_queues_its_bindings_match(app: App, unique: str) -> None:
    x = f"{unique}-"
    app.conf.task_queues = {
        f"{x}direct-1": {"exchange": f"{x}direct", "routing_key": "jobs"},
        f"{x}direct-2": {"exchange": f"{x}direct", "routing_key": "jobs"},
        f"{x}images": {"exchange": f"{x}topic", "exchange_type": "topic", "binding_keys": ["image.*"]},
        f"{x}media": {"exchange": f"{x}topic", "exchange_type": "topic", "binding_keys": ["image.*", "video.#"]},
        f"{x}fan-1": {"exchange": f"{x}fanout", "exchange_type": "fanout"},
        f"{x}fan-2": {"exchange": f"{x}fanout", "exchange_type": "fanout"},
        f"{x}reports": {
            "exchange": f"{x}headers",
            "exchange_type": "headers",
            "binding_arguments": {"x-match": "all", "kind": "report"},
        },
    }
    queues = list(app.conf.task_queues)

    async def scenario() -> None:
        send = app.asend_task
        try:
            await declare_all(app)
            await send("r.t", queue=f"{x}direct-1", ignore_result=True)  # both queues bound with "jobs"
            await send("r.t", exchange=f"{x}topic", routing_key="image.png", ignore_result=True)
            await send("r.t", exchange=f"{x}topic", routing_key="video.hd.mp4", ignore_result=True)
            await send("r.t", queue=f"{x}fan-2", ignore_result=True)  # a fanout reaches every queue
            await send("r.t", exchange=f"{x}headers", headers={"kind": "report"}, ignore_result=True)
            with pytest.raises(UnroutableError):
                await send("r.t", exchange=f"{x}topic", routing_key="audio.ogg", ignore_result=True)
            with pytest.raises(UnroutableError):
                await send("r.t", exchange=f"{x}headers", headers={"kind": "invoice"}, ignore_result=True)
            assert dict(zip(queues, await depths(app, queues), strict=True)) == {
                f"{x}direct-1": 1,
                f"{x}direct-2": 1,
                f"{x}images": 1,
                f"{x}media": 2,
                f"{x}fan-1": 1,
                f"{x}fan-2": 1,
                f"{x}reports": 1,
            }
        finally:
            await delete(app, queues, [f"{x}{kind}" for kind in ("direct", "topic", "fanout", "headers")])
            await app.aclose()

    asyncio.run(scenario())


def test_task_routes_exact_glob_and_function(app: App, unique: str) -> None:
    x = f"{unique}-"

    def by_customer(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return f"{x}vip" if kwargs.get("vip") else None

    app.conf.task_routes = [by_customer, {"billing.charge": f"{x}exact", "reports.*": {"queue": f"{x}glob"}}]
    queues = [f"{x}vip", f"{x}exact", f"{x}glob", f"{x}default"]

    async def scenario() -> None:
        try:
            for name, kwargs in [
                ("billing.charge", {}),
                ("reports.daily", {}),
                ("reports.weekly", {}),
                ("billing.charge", {"vip": True}),
                ("other.task", {}),
            ]:
                await app.asend_task(name, kwargs=kwargs, ignore_result=True)
            assert await depths(app, queues) == [1, 1, 2, 1]
        finally:
            await delete(app, queues)
            await app.aclose()

    asyncio.run(scenario())


def test_precedence_is_call_then_task_then_routes_then_default(app: App, unique: str) -> None:
    x = f"{unique}-"
    app.conf.task_routes = {"p.*": f"{x}routes"}

    @app.task(name="p.with_queue", queue=f"{x}task")
    def with_queue() -> None:
        """Declared with its own queue."""

    queues = [f"{x}call", f"{x}task", f"{x}routes", f"{x}default"]

    async def scenario() -> None:
        try:
            await with_queue.aapply_async(queue=f"{x}call", ignore_result=True)
            await with_queue.aapply_async(ignore_result=True)
            await app.asend_task("p.routed", ignore_result=True)
            await app.asend_task("unrouted", ignore_result=True)
            assert await depths(app, queues) == [1, 1, 1, 1]
        finally:
            await delete(app, queues)
            await app.aclose()

    asyncio.run(scenario())


def test_queue_options_become_broker_arguments(app: App, unique: str, rabbitmq: TestBroker, broker_vhost: str) -> None:
    x = f"{unique}-"
    app.conf.task_queues = {
        f"{x}prio": {"max_priority": 10},
        f"{x}quorum": {"queue_type": "quorum", "delivery_limit": 4},
        f"{x}bounded": {"arguments": {"x-max-length": 1000, "x-overflow": "reject-publish"}},
    }
    stats = QueueStats(rabbitmq, broker_vhost)

    async def scenario() -> None:
        await declare_all(app)
        await app.aclose()

    asyncio.run(scenario())
    try:
        prio, quorum, bounded = (stats.row(name) for name in app.conf.task_queues)
        assert prio["arguments"]["x-max-priority"] == 10
        assert quorum["type"] == "quorum" and quorum["arguments"]["x-delivery-limit"] == 4
        assert bounded["arguments"]["x-max-length"] == 1000
        assert bounded["arguments"]["x-overflow"] == "reject-publish"
        # Broker-side dead-lettering where the broker would otherwise drop (the delivery limit) only:
        # the others are declared as a Celery client would declare them.
        assert quorum["arguments"]["x-dead-letter-exchange"] == ""
        assert quorum["arguments"]["x-dead-letter-routing-key"] == quorum["name"] + ".dlq"
        assert (
            "x-dead-letter-exchange" not in prio["arguments"] and "x-dead-letter-exchange" not in bounded["arguments"]
        )
        assert stats.row(f"{x}quorum.dlq")["type"] == "quorum"  # as safe as the queue it serves
    finally:
        asyncio.run(_delete_and_close(app, list(app.conf.task_queues)))


async def _delete_and_close(app: App, queues: list[str], exchanges: list[str] | None = None) -> None:
    await delete(app, queues, exchanges or [])
    await app.aclose()


def test_worker_on_a_topic_queue_gets_only_what_its_bindings_match(app: App, unique: str) -> None:
    x = f"{unique}-"
    app.conf.task_queues = {
        f"{x}images": {"exchange": f"{x}media", "exchange_type": "topic", "binding_keys": ["image.*"]},
        f"{x}all": {"exchange": f"{x}media", "exchange_type": "topic", "binding_keys": ["#"]},
    }
    echo = define_echo(app)

    async def scenario() -> None:
        try:
            await declare_all(app)
            async with running_worker(app, queues=[f"{x}images"], concurrency=2):
                image = await echo.aapply_async(exchange=f"{x}media", routing_key="image.png")
                video = await echo.aapply_async(exchange=f"{x}media", routing_key="video.mp4")
                assert (await image.aget(timeout=10))["queue"] == f"{x}images"
                assert await depths(app, [f"{x}all"]) == [2]  # the other queue got both, nobody took them
                assert video.state == "PENDING"
        finally:
            await _delete_and_close(app, list(app.conf.task_queues), [f"{x}media"])

    asyncio.run(scenario())


def test_worker_consumes_exactly_the_queues_given_minus_the_excluded(app: App, unique: str) -> None:
    names = [f"{unique}-{n}" for n in ("a", "b", "c")]
    echo = define_echo(app)

    async def scenario() -> None:
        try:
            async with running_worker(app, queues=names, exclude_queues=[names[1]]) as worker:
                assert [q.name for q in worker.queues] == [names[0], names[2]]
                results = [await echo.aapply_async(queue=name) for name in names]
                assert (await results[0].aget(timeout=10))["queue"] == names[0]
                assert (await results[2].aget(timeout=10))["queue"] == names[2]
                assert await depths(app, names) == [0, 1, 0]
        finally:
            await _delete_and_close(app, names)

    asyncio.run(scenario())


def test_worker_cli_queue_and_exclude_options(broker_url: str, unique: str) -> None:
    names = broker_tasks.queue_names(unique)
    app = App(f"routing-cli-{unique}", broker=broker_url, task_queues=broker_tasks.task_queues(unique))

    async def scenario() -> None:
        try:
            results = [await app.asend_task("bt.where", queue=names[role]) for role in ("a", "b", "c")]
            consume = f"{names['a']},{names['b']}"
            worker = await asyncio.to_thread(
                run_cli, broker_url, unique, "worker", "-A", "broker_tasks", "-Q", consume, "-X", names["b"],
                "--burst", "-c", "1",
            )  # fmt: skip
            assert worker.returncode == 0, worker.stderr
            assert f"consuming {names['a']} (" in worker.stderr
            assert await results[0].aget(timeout=10) == names["a"]
            assert await depths(app, [names["a"], names["b"], names["c"]]) == [0, 1, 1]
        finally:
            await _delete_and_close(app, list(names.values()))

    asyncio.run(scenario())
    app.close()


def test_delayed_messages_keep_queue_priority_and_headers(app: App, unique: str) -> None:
    x = f"{unique}-"
    app.conf.task_queues = {
        f"{x}images": {
            "exchange": f"{x}media",
            "exchange_type": "topic",
            "binding_keys": ["image.*"],
            "max_priority": 5,
        }
    }
    echo = define_echo(app)

    async def scenario() -> None:
        try:
            async with running_worker(app, queues=[f"{x}images"]):
                sent = time.monotonic()
                result = await echo.aapply_async(
                    queue=f"{x}images", countdown=1, priority=4, headers={"x-tenant": "acme"}
                )
                arrived = await result.aget(timeout=10)
                assert time.monotonic() - sent >= 1.0
                assert arrived == {"queue": f"{x}images", "priority": 4, "tenant": "acme"}
        finally:
            await _delete_and_close(app, list(app.conf.task_queues), [f"{x}media"])

    asyncio.run(scenario())
