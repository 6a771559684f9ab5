"""Delays held by the broker: countdown, eta and retry backoff without a worker holding the message.

Celery keeps a countdown task unacked in the worker until it is due, which defeats prefetch and trips
RabbitMQ's consumer timeout; a single TTL queue would block a short delay behind a long one, because
RabbitMQ expires messages only at the head of a queue. amqtask instead uses binary delay levels (the
NServiceBus design): level k is a queue whose messages all live 2^k seconds, then dead-letter into
the exchange of level k-1. A delayed message is published to the top level's topic exchange with a
routing key made of the delay's N bits followed by the destination queue. Each level's exchange sends
the message into its queue when its bit is 1, or straight on to the next lower exchange when it is 0,
so the message waits only in the levels whose bits are set, and as every queue has a single TTL,
nothing waits behind anything longer. A fixed set of 2·N + 3 objects serves every delay from 1 s to
2^N - 1 s (N = 28: ~8.5 years), rounded up to whole seconds so nothing arrives early.

The bits go least significant first (5 s is ``1.0.1.0...0.myqueue``), unlike NServiceBus: word k is
then bit k whatever N is, so level k's bindings do not depend on N. Bindings only accumulate on the
broker; with most-significant-first keys, declaring another level count on a vhost would leave the
old bindings matching the wrong words and copy messages into wrong levels. This way topologies of
different sizes share their levels safely, and changing the level count is harmless.

After level 0 the message reaches ``<prefix>.deliver``, a *headers* exchange, and goes to the queue
named in its ``amqtask-delay-queue`` header. The header, not the routing key, picks the queue: the
comparison is exact for any name (a topic binding would misroute a name with ``*`` or ``#`` words,
which other clients may create), and a destination's binding does not depend on N either. The header
has no ``x-`` prefix on purpose: headers exchanges ignore ``x-`` binding arguments under ``x-match:
all``, so such a binding would match every message (seen on 3.10 and 4.3). Messages for a queue
nobody bound fall through the exchange's alternate exchange into ``<prefix>.unroutable`` instead of
vanishing.

Levels are quorum queues with at-least-once dead-lettering where the broker supports message TTL on
quorum queues (RabbitMQ >= 3.10); otherwise durable classic queues, whose dead-lettering is
at-most-once. ``x-death`` headers must be stripped before a message re-enters the levels: RabbitMQ
before 4.0.1 drops a message whose ``x-death`` shows it already expired from the queue it is now
leaving (celery#9867).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

from .connection import CONNECTION_REFUSALS
from .errors import ConfigurationError, DelayRangeError
from .topology import SHORTSTR_BYTES, translate

log = logging.getLogger("amqtask.delays")

DEFAULT_LEVELS = 28
MAX_LEVELS = 32  # 136 years; more only lengthens every routing key
DELAY_QUEUE_HEADER = "amqtask-delay-queue"
#: Routing keys are AMQP short strings.
MAX_ROUTING_KEY_BYTES = SHORTSTR_BYTES
#: Message TTL on quorum queues arrived in RabbitMQ 3.10, with at-least-once dead-lettering.
QUORUM_MIN_VERSION = (3, 10)

_REFUSALS: tuple[type[Exception], ...] = (aiormq.exceptions.AMQPChannelError, *CONNECTION_REFUSALS)
_DEATH_HEADERS = ("x-death",)
_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")


@dataclass(frozen=True)
class ExchangeDecl:
    """One exchange of the delay topology."""

    name: str
    type: ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueDecl:
    """One queue of the delay topology; ``arguments`` without the queue type (see ``queue_arguments``)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class BindingDecl:
    """A binding from exchange ``source`` to a queue or, with ``to_exchange``, to another exchange."""

    source: str
    destination: str
    routing_key: str
    to_exchange: bool


@dataclass(frozen=True)
class DelayTopology:
    """Names and arguments of every broker object of the delay levels. Pure: no broker needed."""

    levels: int = DEFAULT_LEVELS
    prefix: str = "amqtask.delay"
    quorum: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int):
            raise ConfigurationError(f"delay levels must be an integer, got {self.levels!r}")
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ConfigurationError(f"delay levels must be between 1 and {MAX_LEVELS}, got {self.levels}")
        if not self.prefix or self.prefix.startswith("amq."):
            raise ConfigurationError(f"delay prefix must be non-empty and not start with 'amq.', got {self.prefix!r}")

    def level_name(self, level: int) -> str:
        """Name of level ``level``'s queue and of its exchange (they share it)."""
        return f"{self.prefix}.L{level:02d}"

    @property
    def entry_exchange(self) -> str:
        """The exchange every delayed message is published to: the top level's."""
        return self.level_name(self.levels - 1)

    @property
    def deliver_exchange(self) -> str:
        """The headers exchange that hands a due message to its destination queue."""
        return f"{self.prefix}.deliver"

    @property
    def unroutable_name(self) -> str:
        """Fanout exchange and queue that keep due messages whose destination queue is not bound."""
        return f"{self.prefix}.unroutable"

    def max_delay_s(self) -> int:
        """The longest delay the levels can hold, in seconds."""
        return (1 << self.levels) - 1

    def whole_seconds(self, delay_s: float) -> int:
        """``delay_s`` rounded up to whole seconds (so nothing arrives early), if the levels can hold it.

        Raises :class:`~amqtask.errors.DelayRangeError` for a delay beyond :meth:`max_delay_s` or not finite.
        """
        if not math.isfinite(delay_s):
            raise DelayRangeError(f"delay must be a finite number of seconds, got {delay_s!r}")
        seconds = max(0, math.ceil(delay_s))
        if seconds > self.max_delay_s():
            raise DelayRangeError(
                f"delay of {delay_s:.12g} s is longer than the {self.max_delay_s()} s "
                f"({self.max_delay_s() / 86400 / 365.25:.1f} years) that {self.levels} delay levels can hold"
            )
        return seconds

    def route(self, delay_s: float, queue: str) -> tuple[str, str, dict[str, Any]]:
        """``(exchange, routing_key, extra_headers)`` that bring a message to ``queue`` after ``delay_s``.

        The delay is rounded up to whole seconds, so the message never arrives early. A delay of zero
        or less (an eta in the past) goes straight to the queue through the default exchange, which
        needs no delay topology at all.
        """
        if not queue:
            raise ConfigurationError("a delayed message needs a destination queue name")
        seconds = self.whole_seconds(delay_s)
        if not seconds:
            return "", queue, {}
        bits = format(seconds, f"0{self.levels}b")[::-1]
        routing_key = ".".join(bits) + "." + queue
        if len(routing_key.encode()) > MAX_ROUTING_KEY_BYTES:
            limit = MAX_ROUTING_KEY_BYTES - 2 * self.levels
            raise ConfigurationError(
                f"queue name {queue!r} is too long to be delayed: with {self.levels} delay levels a "
                f"destination may have at most {limit} bytes"
            )
        return self.entry_exchange, routing_key, {DELAY_QUEUE_HEADER: queue}

    def exchanges(self) -> list[ExchangeDecl]:
        """Every exchange, in an order where each one exists before anything refers to it."""
        return [
            ExchangeDecl(self.unroutable_name, ExchangeType.FANOUT),
            ExchangeDecl(self.deliver_exchange, ExchangeType.HEADERS, {"alternate-exchange": self.unroutable_name}),
            *(ExchangeDecl(self.level_name(k), ExchangeType.TOPIC) for k in range(self.levels)),
        ]

    def _next_exchange(self, level: int) -> str:
        return self.level_name(level - 1) if level else self.deliver_exchange

    def queues(self) -> list[QueueDecl]:
        """The level queues, then the unroutable queue."""
        levels = [
            QueueDecl(
                self.level_name(k),
                {"x-message-ttl": (1 << k) * 1000, "x-dead-letter-exchange": self._next_exchange(k)},
            )
            for k in range(self.levels)
        ]
        return [*levels, QueueDecl(self.unroutable_name, {})]

    def bindings(self) -> list[BindingDecl]:
        """Per level: bit 1 into the level's queue, bit 0 on to the next exchange; the unroutable pair."""
        result = [BindingDecl(self.unroutable_name, self.unroutable_name, "", to_exchange=False)]
        for k in range(self.levels):
            skip = ["*"] * k  # word k of the key is bit k
            name = self.level_name(k)
            result.append(BindingDecl(name, name, ".".join([*skip, "1", "#"]), to_exchange=False))
            result.append(BindingDecl(name, self._next_exchange(k), ".".join([*skip, "0", "#"]), to_exchange=True))
        return result

    def queue_arguments(self, queue: QueueDecl, quorum: bool) -> dict[str, Any]:
        """The full ``x-`` arguments of ``queue`` as a quorum or a classic queue."""
        if not quorum:
            # Explicit, because a vhost's default queue type may be quorum on RabbitMQ 4.
            return {"x-queue-type": "classic", **queue.arguments}
        args: dict[str, Any] = {"x-queue-type": "quorum", **queue.arguments}
        if "x-dead-letter-exchange" in args:
            # Without reject-publish, RabbitMQ silently falls back to at-most-once dead-lettering.
            args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        return args

    def destination_binding(self, queue: str) -> dict[str, Any]:
        """Binding arguments that make the deliver exchange route a due message to ``queue``."""
        return {"x-match": "all", DELAY_QUEUE_HEADER: queue}


def strip_death_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``headers`` without the dead-lettering history RabbitMQ adds (``x-death`` and friends)."""
    return {
        key: value
        for key, value in headers.items()
        if key not in _DEATH_HEADERS and not key.startswith(_DEATH_PREFIXES)
    }


def supports_quorum_levels(version: str) -> bool:
    """Whether a RabbitMQ of this version (``"3.10.8"``) can run the levels as quorum queues."""
    numbers = re.findall(r"\d+", version)
    if len(numbers) < 2:
        return False
    return (int(numbers[0]), int(numbers[1])) >= QUORUM_MIN_VERSION


async def _server_version(channel: AbstractChannel) -> str:
    underlay = await channel.get_underlay_channel()
    version = underlay.connection.server_properties.get("version", "")
    return version.decode() if isinstance(version, bytes) else str(version)


Step = Callable[[AbstractChannel], Awaitable[None]]
#: How many channels :func:`declare_delay_topology_spread` declares on at once: every declaration is a round
#: trip, and a channel carries one at a time (~116 of them for 28 levels, most of a worker's start-up).
SPREAD_CHANNELS = 8


def _exchange_step(exchange: ExchangeDecl) -> Step:
    async def step(channel: AbstractChannel) -> None:
        wanted = {"type": exchange.type.value, "durable": True, **exchange.arguments}
        with _refusals("exchange", exchange.name, wanted):
            await channel.declare_exchange(exchange.name, exchange.type, durable=True,
                                           arguments=exchange.arguments or None)  # fmt: skip

    return step


def _queue_step(queue: QueueDecl, args: dict[str, Any]) -> Step:
    async def step(channel: AbstractChannel) -> None:
        with _refusals("queue", queue.name, {"durable": True, **args}):
            await channel.declare_queue(queue.name, durable=True, arguments=args)

    return step


def _binding_step(binding: BindingDecl) -> Step:
    async def step(channel: AbstractChannel) -> None:
        kind = "exchange" if binding.to_exchange else "queue"
        with _refusals(f"binding of {kind}", binding.destination, {binding.source: binding.routing_key}):
            target: AbstractExchange | AbstractQueue
            if binding.to_exchange:
                target = await channel.get_exchange(binding.destination, ensure=False)
            else:
                target = await channel.get_queue(binding.destination, ensure=False)
            await target.bind(binding.source, binding.routing_key)

    return step


def _phases(topology: DelayTopology, quorum: bool) -> list[list[Step]]:
    """The declarations in three phases, each needing the ones before: exchanges, queues, bindings."""
    return [
        [_exchange_step(exchange) for exchange in topology.exchanges()],
        [_queue_step(queue, topology.queue_arguments(queue, quorum)) for queue in topology.queues()],
        [_binding_step(binding) for binding in topology.bindings()],
    ]


async def _levels_quorum(channel: AbstractChannel, topology: DelayTopology) -> bool:
    """Whether the levels are quorum queues: when asked for and the broker can run them."""
    if not topology.quorum:
        return False
    version = await _server_version(channel)
    if not supports_quorum_levels(version):
        log.warning("RabbitMQ %s has no message TTL on quorum queues; delay levels are classic queues", version)
        return False
    return True


async def _run_steps(steps: list[Step], channel: AbstractChannel) -> None:
    for step in steps:
        await step(channel)


async def declare_delay_topology(channel: AbstractChannel, topology: DelayTopology) -> None:
    """Declare every exchange, queue and binding of ``topology`` (idempotent).

    A broker that cannot run quorum levels gets classic ones, even when ``topology.quorum`` asks for
    quorum: routing does not depend on the queue type, only delivery guarantees do. A refusal closes
    ``channel`` and raises :class:`~amqtask.errors.TopologyError` (a mismatch, e.g. levels declared
    earlier with another type, raises :class:`~amqtask.errors.TopologyMismatchError`).
    """
    for phase in _phases(topology, await _levels_quorum(channel, topology)):
        await _run_steps(phase, channel)


async def declare_delay_topology_spread(
    run: Callable[[Callable[[AbstractChannel], Awaitable[Any]]], Awaitable[Any]], topology: DelayTopology
) -> None:
    """:func:`declare_delay_topology` on up to :data:`SPREAD_CHANNELS` channels at once, each from ``run``
    (``Broker.run``: a fresh channel per call, the call repeated on a new connection if this one goes).

    Each phase is cut into consecutive runs of declarations, one per channel, and finishes before the
    next starts. A refusal raises the same error as declaring one by one would: the earliest run that
    failed holds the earliest failing declaration, and its error is raised once every run has ended.
    """
    quorum: bool = await run(lambda channel: _levels_quorum(channel, topology))
    for phase in _phases(topology, quorum):
        size = math.ceil(len(phase) / SPREAD_CHANNELS)
        runs = [phase[i : i + size] for i in range(0, len(phase), size)]
        outcomes = await asyncio.gather(*(run(functools.partial(_run_steps, steps)) for steps in runs),
                                        return_exceptions=True)  # fmt: skip
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


async def bind_destination(channel: AbstractChannel, topology: DelayTopology, queue: str) -> None:
    """Bind ``queue`` to the deliver exchange so delayed messages reach it (idempotent).

    Whoever declares a task queue calls this; until then, due messages for the queue wait in the
    unroutable queue. The queue and the delay topology must exist.
    """
    args = topology.destination_binding(queue)
    with _refusals("binding of queue", queue, {topology.deliver_exchange: args}):
        target = await channel.get_queue(queue, ensure=False)
        await target.bind(topology.deliver_exchange, "", arguments=args)


async def delete_delay_topology(channel: AbstractChannel, topology: DelayTopology) -> None:
    """Delete every queue and exchange of ``topology``, with any messages still waiting in it."""
    for queue in topology.queues():
        with _refusals("queue", queue.name, None):
            # Not Queue.delete(), whose if_unused=True default quorum queues refuse by closing the connection.
            await channel.queue_delete(queue.name, if_unused=False, if_empty=False)
    for exchange in reversed(topology.exchanges()):
        with _refusals("exchange", exchange.name, None):
            await channel.exchange_delete(exchange.name, if_unused=False)


@contextlib.contextmanager
def _refusals(kind: str, name: str, wanted: Any) -> Iterator[None]:
    """Turn a broker refusal inside the block into amqtask's topology errors, keeping the broker's text."""
    try:
        yield
    except _REFUSALS as exc:
        raise translate(exc, kind, name, wanted) from exc


__all__ = [
    "DEFAULT_LEVELS",
    "DELAY_QUEUE_HEADER",
    "DelayTopology",
    "bind_destination",
    "declare_delay_topology",
    "declare_delay_topology_spread",
    "delete_delay_topology",
    "strip_death_headers",
    "supports_quorum_levels",
]
