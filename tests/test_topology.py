"""Declaring, verifying and mismatches: what amqtask declares is idempotent, and a queue that exists with
other arguments is reported by name, with the broker's and the app's arguments, wherever it is met:
declaring, starting a worker, sending a task, ``amqtask topology verify``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiormq
import broker_tasks
import pytest
from support.queues import delete, run_cli

from amqtask import App, ConfigurationError, QueueSpec, TopologyMismatchError, Worker, topology, verification

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"topology-{unique}", broker=broker_url, task_default_queue=f"{unique}-default")
    yield application
    application.close()


def test_mismatch_text_is_parsed_in_every_spelling_the_broker_uses() -> None:
    spellings = {
        "received none but current is the value '5' of type 'byte'": "5",
        "received '10' but current is '5'": "5",
        "received the value 'quorum' of type 'longstr' but current is none": None,
        "received 'quorum' but current is 'classic'": "classic",
    }
    for tail, existing in spellings.items():
        text = f"PRECONDITION_FAILED - inequivalent arg 'x-a' for queue 'q' in vhost 'v': {tail}"
        error = topology.translate(aiormq.exceptions.ChannelPreconditionFailed(text), "queue", "q", {"w": 1})
        assert isinstance(error, TopologyMismatchError)
        assert (error.name, error.existing, error.wanted) == ("q", {"x-a": existing}, {"w": 1})


def test_max_priority_on_a_quorum_queue_is_a_configuration_error(app: App) -> None:
    app.conf.task_queues = {"q": {"queue_type": "quorum", "max_priority": 5}}
    with pytest.raises(ConfigurationError, match="max_priority is not supported on quorum queues"):
        Worker(app)


def test_declaring_twice_is_idempotent_and_verifies_clean(app: App, unique: str) -> None:
    specs = [
        QueueSpec(f"{unique}-plain"),
        QueueSpec(f"{unique}-prio", max_priority=10),
        QueueSpec(f"{unique}-quorum", queue_type="quorum", delivery_limit=3),
        QueueSpec(f"{unique}-topic", exchange=f"{unique}-x", exchange_type="topic", binding_keys=("a.*", "b.#")),
        QueueSpec(f"{unique}-bounded", arguments={"x-max-length": 100}),
    ]

    async def scenario() -> None:
        broker = app.runtime().broker
        try:
            for _ in range(2):
                for spec in specs:
                    await topology.declare_queue(broker, spec)
            checks = await verification.verify(broker, specs)
            assert [(c.kind, c.name) for c in checks if not c.ok] == []
            assert len(checks) == 2 * len(specs) + 1  # each queue, its DLQ, and the one exchange
        finally:
            await delete(app, [s.name for s in specs], [f"{unique}-x"])
            await app.aclose()

    asyncio.run(scenario())


def test_a_mismatch_names_queue_existing_and_wanted_arguments(app: App, unique: str) -> None:
    name = f"{unique}-q"

    async def scenario() -> None:
        broker = app.runtime().broker
        try:
            await topology.declare_queue(broker, QueueSpec(name, max_priority=5))
            with pytest.raises(TopologyMismatchError) as info:
                await topology.declare_queue(broker, QueueSpec(name, max_priority=10))
            assert (info.value.kind, info.value.name) == ("queue", name)
            assert info.value.existing == {"x-max-priority": "5"}
            assert info.value.wanted["x-max-priority"] == 10
            assert f"queue {name!r} already exists with other arguments" in str(info.value)
            with pytest.raises(TopologyMismatchError, match="x-queue-type"):
                await topology.declare_queue(broker, QueueSpec(name, queue_type="quorum"))
        finally:
            await delete(app, [name])
            await app.aclose()

    asyncio.run(scenario())


def test_with_strict_queues_worker_start_and_producer_report_a_mismatch(app: App, unique: str) -> None:
    name = f"{unique}-q"
    app.conf.task_queues = {name: {"max_priority": 10}}
    app.conf.task_queues_strict = True

    @app.task(name="t.noop", queue=name)
    def noop() -> None:
        """Never runs: the queue is wrong."""

    async def scenario() -> None:
        broker = app.runtime().broker
        try:
            await topology.declare_queue(broker, QueueSpec(name, max_priority=5))
            with pytest.raises(TopologyMismatchError, match=f"queue '{name}'.*x-max-priority") as info:
                await noop.adelay()
            assert info.value.existing == {"x-max-priority": "5"}
            with pytest.raises(TopologyMismatchError, match=f"queue '{name}'.*x-max-priority"):
                await Worker(app, queues=[name]).start()
        finally:
            await delete(app, [name])
            await app.aclose()

    asyncio.run(scenario())


def test_producer_takes_an_unconfigured_queue_as_it_finds_it(app: App, unique: str) -> None:
    """A queue declared by someone else (a Celery worker: no amqtask arguments) still receives tasks."""
    name = f"{unique}-celery"

    async def scenario() -> None:
        broker = app.runtime().broker
        try:
            await topology.declare_queue(broker, QueueSpec(name, dead_letter=False))
            await app.asend_task("t.anything", queue=name, ignore_result=True)
            assert await topology.queue_depth(broker, name) == 1
        finally:
            await delete(app, [name])
            await app.aclose()

    asyncio.run(scenario())


def test_verify_reports_missing_and_mismatched_objects(app: App, unique: str) -> None:
    good, absent, wrong = QueueSpec(f"{unique}-good"), QueueSpec(f"{unique}-absent"), QueueSpec(f"{unique}-wrong")
    routed = QueueSpec(f"{unique}-routed", exchange=f"{unique}-x", exchange_type="topic")

    async def scenario() -> None:
        broker = app.runtime().broker
        try:
            await topology.declare_queue(broker, good)
            await topology.declare_queue(broker, QueueSpec(wrong.name, max_priority=3))
            await topology.declare_exchange(broker, f"{unique}-x", "fanout")
            checks = {(c.kind, c.name): c for c in await verification.verify(broker, [good, absent, wrong, routed])}
            assert checks["queue", good.name].ok and checks["queue", good.dlq_name].ok
            assert checks["queue", absent.name].problem == "missing"
            assert checks["queue", wrong.name].problem == "mismatch"
            assert "x-max-priority" in checks["queue", wrong.name].detail
            assert checks["exchange", f"{unique}-x"].problem == "mismatch"
            assert "'type': 'fanout'" in checks["exchange", f"{unique}-x"].detail
            # verify changed nothing: what was missing still is
            assert not await topology.queue_exists(broker, absent.name)
        finally:
            await delete(app, [good.name, wrong.name], [f"{unique}-x"])
            await app.aclose()

    asyncio.run(scenario())


def test_topology_cli_apply_then_verify(
    app: App, broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = broker_tasks.queue_names(unique)
    before = run_cli(broker_url, unique, "topology", "verify", "-A", "broker_tasks")
    assert before.returncode == 1, before.stderr
    assert f"missing  queue    {names['prio']}\n" in before.stdout
    applied = run_cli(broker_url, unique, "topology", "apply", "-A", "broker_tasks")
    assert applied.returncode == 0, applied.stderr
    after = run_cli(broker_url, unique, "topology", "verify", "-A", "broker_tasks")
    assert after.returncode == 0, after.stderr
    assert after.stdout.endswith(", 0 problem(s)\n")

    async def redeclare_prio_wrongly() -> None:
        await topology.delete_queue(app.runtime().broker, names["prio"])
        await topology.declare_queue(app.runtime().broker, QueueSpec(names["prio"], max_priority=2))
        await app.aclose()

    asyncio.run(redeclare_prio_wrongly())
    adopted = run_cli(broker_url, unique, "topology", "verify", "-A", "broker_tasks")
    assert adopted.returncode == 0, adopted.stdout
    assert (
        f"adopted  queue    {names['prio']}: x-max-priority: wanted 10, held 2; lost: priorities above 2\n"
        in adopted.stdout
    )
    assert run_cli(broker_url, unique, "topology", "apply", "-A", "broker_tasks").returncode == 0
    monkeypatch.setenv("AMQTASK_TASK_QUEUES_STRICT", "true")
    wrong = run_cli(broker_url, unique, "topology", "verify", "-A", "broker_tasks")
    assert wrong.returncode == 1
    assert f"mismatch queue    {names['prio']}: existing {{'x-max-priority': '2'}}" in wrong.stdout
    refused = run_cli(broker_url, unique, "topology", "apply", "-A", "broker_tasks")
    assert refused.returncode == 2 and "TopologyMismatchError" in refused.stderr

    async def cleanup() -> None:
        await delete(app, names.values())
        await app.aclose()

    asyncio.run(cleanup())
