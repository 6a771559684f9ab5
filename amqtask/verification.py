"""Checking the broker against the app without changing it (``amqtask topology verify``).

A passive declare says whether an object exists, and re-declaring an existing object with the wanted
arguments is a read-only comparison (the broker either finds them equivalent and does nothing, or
refuses and keeps its own). AMQP 0-9-1 has no way to list bindings, so bindings are not verified;
:func:`amqtask.topology.declare_queue` re-adds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, ExchangeType

from .connection import Broker
from .delays import DelayTopology, supports_quorum_levels
from .errors import TopologyMismatchError, TopologyNotFoundError
from .topology import QueueSpec, run_declaration, server_version


@dataclass(frozen=True)
class Check:
    """What :func:`verify` found for one exchange or queue: ``problem`` is None, "missing" or "mismatch",
    or "adopted": a task queue held with other arguments, which workers use as it is (see amqtask.adoption)."""

    kind: str
    name: str
    problem: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the app can use the object: it exists as wanted, or is adopted as it is."""
        return self.problem in (None, "adopted")


async def _check(broker: Broker, kind: str, name: str, wanted: Any, passive: Any, active: Any) -> Check:
    try:
        await run_declaration(broker, kind, name, wanted, passive)
    except TopologyNotFoundError:
        return Check(kind, name, "missing")
    try:
        await run_declaration(broker, kind, name, wanted, active)
    except TopologyMismatchError as exc:
        return Check(kind, name, "mismatch", f"existing {exc.existing}, wanted {exc.wanted}")
    return Check(kind, name)


async def verify_exchange(
    broker: Broker, name: str, exchange_type: str, arguments: Mapping[str, Any] | None = None
) -> Check:
    """Check that a durable exchange of this type (and arguments) exists, without declaring it."""

    async def passive(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, passive=True)

    async def active(channel: AbstractChannel) -> None:
        await channel.declare_exchange(
            name, ExchangeType(exchange_type), durable=True, arguments=dict(arguments or {}) or None
        )

    wanted = {"type": ExchangeType(exchange_type).value, "durable": True, **(arguments or {})}
    return await _check(broker, "exchange", name, wanted, passive, active)


async def verify_queue_arguments(broker: Broker, name: str, arguments: Mapping[str, Any]) -> Check:
    """Check that a durable queue with exactly these ``x-`` arguments exists, without declaring it."""

    async def passive(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, passive=True)

    async def active(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True, arguments=dict(arguments))

    return await _check(broker, "queue", name, {"durable": True, **arguments}, passive, active)


async def verify(
    broker: Broker, specs: Iterable[QueueSpec], delay_topology: DelayTopology | None = None
) -> list[Check]:
    """Check every exchange and queue of ``specs`` (and of the delay levels) against the broker.

    Nothing is created or changed. Each object appears once, in declaration order, whether it is
    as wanted, missing, or exists with other arguments.
    """
    checks: dict[tuple[str, str], Check] = {}
    for spec in specs:
        if spec.exchange and ("exchange", spec.exchange) not in checks:
            checks["exchange", spec.exchange] = await verify_exchange(broker, spec.exchange, spec.exchange_type)
        checks["queue", spec.dlq_name] = await verify_queue_arguments(broker, spec.dlq_name, spec.dlq_arguments())
        checks["queue", spec.name] = await verify_queue_arguments(broker, spec.name, spec.queue_arguments())
    if delay_topology is not None:
        quorum = delay_topology.quorum and supports_quorum_levels(await server_version(broker))
        for exchange in delay_topology.exchanges():
            checks["exchange", exchange.name] = await verify_exchange(
                broker, exchange.name, exchange.type.value, exchange.arguments
            )
        for queue in delay_topology.queues():
            checks["queue", queue.name] = await verify_queue_arguments(
                broker, queue.name, delay_topology.queue_arguments(queue, quorum)
            )
    return list(checks.values())


__all__ = ["Check", "verify", "verify_exchange", "verify_queue_arguments"]
