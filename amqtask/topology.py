"""Everything amqtask declares on the broker: task queues, their exchanges, bindings and dead-letter queues.

Declarations are idempotent. A broker refusal is translated into an :class:`~amqtask.errors.AmqtaskError`
that says what was refused: a queue that exists with other arguments raises
:class:`~amqtask.errors.TopologyMismatchError` naming the queue, the argument the broker holds and the
arguments amqtask wanted. Every queue is durable (RabbitMQ 4.3 refuses transient non-exclusive queues).
Each declaration runs on a channel of its own, because a refusal closes the channel it happened on.

Checking the broker against the app without changing it is :mod:`amqtask.verification`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, ExchangeType

from .connection import Broker
from .errors import ConfigurationError, TopologyError, TopologyMismatchError, TopologyNotFoundError

EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")
QUEUE_TYPES = ("classic", "quorum")
DLQ_SUFFIX = ".dlq"
#: An AMQP short string (a name, a routing key) holds at most this many bytes of UTF-8.
SHORTSTR_BYTES = 255
#: The characters the AMQP client (pamqp) lets through in an exchange or queue name (RabbitMQ takes any).
_NAME_CHARS = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")


def check_name(kind: str, name: object, spare: int = 0) -> None:
    """Raise :class:`ConfigurationError` naming ``name`` unless the broker can take it as a ``kind``.

    ``kind`` is ``"queue"``, ``"exchange"`` or ``"routing key"``; ``spare`` bytes are kept free for a
    suffix the name gets later (a queue's ``.dlq``). Checked before anything is sent: the AMQP client
    would otherwise refuse the frame with a bare ``ValueError``.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"{_what(kind)} must be a string, got {name!r}")
    _check_text(kind, name, spare)


def _what(kind: str) -> str:
    return kind if kind == "routing key" else f"{kind} name"


@functools.lru_cache(maxsize=1024)  # every send checks its route's names: the same few, over and over
def _check_text(kind: str, name: str, spare: int) -> None:
    what = _what(kind)
    shown = repr(name) if len(name) <= 60 else f"{name[:60]!r}..."
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ConfigurationError(f"{what} {shown} is not valid UTF-8") from None
    if size > SHORTSTR_BYTES - spare:
        room = f" (leaving room for {DLQ_SUFFIX!r})" if spare else ""
        raise ConfigurationError(
            f"{what} {shown} is {size} bytes long; AMQP allows at most {SHORTSTR_BYTES - spare}{room}"
        )
    if kind != "routing key" and not _NAME_CHARS.fullmatch(name):
        bad = "".join(sorted({char for char in name if not _NAME_CHARS.fullmatch(char)}))
        raise ConfigurationError(
            f"{what} {shown} holds {bad!r}: such a name may hold only ASCII letters, digits, spaces "
            "and - _ . : @ # , / +"
        )


@dataclass(frozen=True)
class QueueSpec:
    """A task queue: how it is declared and how messages reach it.

    ``exchange=""`` means the default exchange, where the routing key is the queue name (Celery's
    layout for its queues). ``<name>.dlq`` is always declared next to the queue: the worker moves the
    tasks it gives up on there itself. ``dead_letter`` also points the queue's own dead-letter arguments
    (``x-dead-letter-exchange``/``-routing-key``) at it, so messages the *broker* drops (delivery limit,
    TTL, a consumer's reject) land there too. By default (``None``) a quorum queue gets those arguments
    (the broker drops what exceeds its delivery limit unless told where to put it, and RabbitMQ 4 sets
    a limit of 20 even when none is given); a classic queue is declared exactly as Celery, kombu and
    celery-node declare theirs, so any of them can declare it too, before or after amqtask (the broker
    refuses, 406, a second declaration with other arguments, whoever comes second).
    """

    name: str
    exchange: str = ""
    exchange_type: str = "direct"
    routing_key: str | None = None
    binding_keys: tuple[str, ...] = ()
    binding_arguments: Mapping[str, Any] = field(default_factory=dict)
    max_priority: int | None = None
    queue_type: str = "classic"
    delivery_limit: int | None = None
    dead_letter: bool | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("queue", self.name, spare=len(DLQ_SUFFIX))
        where = f"queue {self.name!r}"
        if not self.name or self.name.startswith("amq."):
            raise ConfigurationError(f"{where}: a queue name must be non-empty and not start with 'amq.'")
        check_name("exchange", self.exchange)
        for key in (*self.binding_keys, *([self.routing_key] if self.routing_key is not None else [])):
            check_name("routing key", key)
        if self.exchange_type not in EXCHANGE_TYPES:
            raise ConfigurationError(
                f"{where}: exchange_type must be one of {EXCHANGE_TYPES}, got {self.exchange_type!r}"
            )
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"{where}: queue_type must be one of {QUEUE_TYPES}, got {self.queue_type!r}")
        if self.max_priority is not None:
            if self.queue_type == "quorum":
                raise ConfigurationError(
                    f"{where}: max_priority is not supported on quorum queues (RabbitMQ refuses "
                    "x-max-priority there); quorum queues honour message priorities without it on "
                    "RabbitMQ 4.0-4.2 (two levels) and 4.3 (32 levels), and ignore them on 3.x"
                )
            if not 1 <= self.max_priority <= 255:
                raise ConfigurationError(f"{where}: max_priority must be 1..255, got {self.max_priority}")
        if self.delivery_limit is not None and self.queue_type != "quorum":
            raise ConfigurationError(f"{where}: delivery_limit needs queue_type='quorum'")

    @property
    def publish_exchange(self) -> str:
        """The exchange a task for this queue is published to."""
        return self.exchange

    @property
    def publish_routing_key(self) -> str:
        """The routing key a task for this queue is published with."""
        if not self.exchange:
            return self.name
        if self.routing_key is not None:
            return self.routing_key
        return self.binding_keys[0] if self.binding_keys else self.name

    @property
    def bindings(self) -> tuple[str, ...]:
        """The routing keys the queue is bound with on its exchange."""
        if not self.exchange:
            return ()
        if self.binding_keys:
            return self.binding_keys
        return (self.routing_key if self.routing_key is not None else self.name,)

    @property
    def broker_dead_letter(self) -> bool:
        """Whether the queue is declared with dead-letter arguments pointing at its ``.dlq``."""
        return self.dead_letter if self.dead_letter is not None else self.queue_type == "quorum"

    @property
    def dlq_name(self) -> str:
        """Name of this queue's dead-letter queue."""
        return self.name + DLQ_SUFFIX

    def queue_arguments(self) -> dict[str, Any]:
        """The ``x-`` arguments the queue is declared with."""
        args: dict[str, Any] = {}
        if self.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if self.delivery_limit is not None:
                args["x-delivery-limit"] = self.delivery_limit
        if self.max_priority is not None:
            args["x-max-priority"] = self.max_priority
        if self.broker_dead_letter:
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = self.dlq_name
        args.update(self.arguments)
        return args

    def dlq_arguments(self) -> dict[str, Any]:
        """Arguments of the dead-letter queue (same type as the queue, so it is as safe)."""
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}


# The broker names one differing argument per refusal. It writes a value three ways, depending on
# version and type: ``none``, ``'5'``, or ``the value '5' of type 'byte'`` (seen on 3.10 and 4.3).
_ARG_VALUE = r"none|'[^']*'|the value '[^']*' of type '[^']*'"
INEQUIVALENT = re.compile(
    rf"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'.*?"
    rf"received (?P<received>{_ARG_VALUE}) but current is (?P<current>{_ARG_VALUE})"
)


def _arg_value(text: str) -> str | None:
    """The value in one of the broker's spellings (``None`` for ``none``: the argument is not set)."""
    if text == "none":
        return None
    return text.split("'")[1]


def translate(exc: Exception, kind: str, name: str, wanted: Any) -> Exception:
    """Turn an aiormq channel error from a declaration into amqtask's exception for it."""
    text = str(exc.args[0] if exc.args else exc)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        match = INEQUIVALENT.search(text)
        if match:
            existing = {match["arg"]: _arg_value(match["current"])}
            return TopologyMismatchError(kind, name, existing, wanted, text)
        return TopologyMismatchError(kind, name, "unknown", wanted, text)
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        return TopologyNotFoundError(f"{kind} {name!r} does not exist ({text})")
    return TopologyError(f"broker refused {kind} {name!r}: {text}")


async def run_declaration(
    broker: Broker, kind: str, name: str, wanted: Any, action: Any, timeout: float | None = None
) -> Any:
    """Run ``action`` on a channel of its own, its refusal translated by :func:`translate`."""
    try:
        return await broker.run(action, timeout=timeout)
    except aiormq.exceptions.AMQPChannelError as exc:
        raise translate(exc, kind, name, wanted) from None


async def declare_exchange(broker: Broker, name: str, exchange_type: str = "direct") -> None:
    """Declare a durable exchange."""

    async def action(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, ExchangeType(exchange_type), durable=True)

    await run_declaration(broker, "exchange", name, {"type": exchange_type, "durable": True}, action)


async def declare_queue(broker: Broker, spec: QueueSpec) -> None:
    """Declare ``spec``'s exchange, dead-letter queue, queue and bindings (idempotent).

    A queue that exists with other arguments raises :class:`TopologyMismatchError` with a hint on how to
    make the two declarations agree. Workers and producers call :func:`amqtask.adoption.declare_or_adopt`,
    which takes such a queue as it is unless ``task_queues_strict`` is set.
    """
    await declare_dead_letter_queue(broker, spec)
    wanted = spec.queue_arguments()

    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue(spec.name, durable=True, arguments=wanted)

    try:
        await run_declaration(broker, "queue", spec.name, {"durable": True, **wanted}, declare)
    except TopologyMismatchError as exc:
        raise TopologyMismatchError(
            exc.kind, exc.name, exc.existing, exc.wanted, exc.detail, hint=mismatch_hint(spec, exc.existing)
        ) from None
    await bind_queue(broker, spec)


async def declare_dead_letter_queue(broker: Broker, spec: QueueSpec) -> None:
    """Declare ``spec``'s exchange (if named) and its ``<queue>.dlq``."""
    if spec.exchange:
        await declare_exchange(broker, spec.exchange, spec.exchange_type)
    dlq_args = spec.dlq_arguments()

    async def declare_dlq(channel: AbstractChannel) -> None:
        await channel.declare_queue(spec.dlq_name, durable=True, arguments=dlq_args)

    await run_declaration(broker, "queue", spec.dlq_name, {"durable": True, **dlq_args}, declare_dlq)


async def bind_queue(broker: Broker, spec: QueueSpec) -> None:
    """Bind an existing queue to ``spec``'s exchange with its binding keys (idempotent)."""
    if not spec.bindings:
        return

    async def bind(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue(spec.name, passive=True)
        for key in spec.bindings:
            await queue.bind(spec.exchange, key, arguments=dict(spec.binding_arguments) or None)

    await run_declaration(broker, "queue", spec.name, None, bind)


_DEAD_LETTER_ARGS = ("x-dead-letter-exchange", "x-dead-letter-routing-key")
_OPTION_OF_ARG = {"x-max-priority": "max_priority", "x-queue-type": "queue_type", "x-delivery-limit": "delivery_limit"}


def mismatch_hint(spec: QueueSpec, existing: Any) -> str:
    """What to change so that ``spec`` agrees with a queue the broker holds with other arguments."""
    differing = next(iter(existing), "") if isinstance(existing, Mapping) else ""
    where = f"task_queues={{{spec.name!r}: {{...}}}}"
    adopt = "; or leave task_queues_strict off, and amqtask uses the queue as it is"
    if differing in _DEAD_LETTER_ARGS and existing[differing] is None and spec.broker_dead_letter:
        return (
            f"the queue was declared without dead-letter arguments, as Celery declares its queues; to share "
            f"it, set dead_letter=False for it: task_queues={{{spec.name!r}: {{'dead_letter': False}}}} "
            f"(amqtask still moves failed tasks to {spec.dlq_name!r} itself){adopt}"
        )
    if differing in _DEAD_LETTER_ARGS and not spec.broker_dead_letter:
        return (
            f"the queue has dead-letter arguments (declared by amqtask with dead_letter=True?): set "
            f"dead_letter=True in {where}, or delete the queue so it can be declared anew{adopt}"
        )
    option = _OPTION_OF_ARG.get(differing)
    if option is not None:
        return (
            f"set {option} in {where} to match the existing queue, or delete the queue so it can be "
            f"declared anew{adopt}"
        )
    return (
        f"make the options in {where} match the existing queue (arguments=... for others), or delete the "
        f"queue so it can be declared anew{adopt}"
    )


async def queue_exists(broker: Broker, name: str) -> bool:
    """Whether a queue exists (a passive declare, which never changes anything)."""

    async def passive(channel: AbstractChannel) -> bool:
        await channel.declare_queue(name, passive=True)
        return True

    try:
        return bool(await run_declaration(broker, "queue", name, None, passive))
    except TopologyNotFoundError:
        return False


async def require_exchange(broker: Broker, name: str, timeout: float | None = None) -> None:
    """Raise :class:`TopologyNotFoundError` unless the exchange exists (a passive declare)."""

    async def passive(channel: AbstractChannel) -> None:
        await channel.get_exchange(name, ensure=True)

    await run_declaration(broker, "exchange", name, None, passive, timeout)


async def queue_counts(broker: Broker, name: str) -> tuple[int, int]:
    """A queue's ready messages (not counting deliveries a consumer holds unacked) and its consumers, as
    one passive declare reads them."""

    async def passive(channel: AbstractChannel) -> tuple[int, int]:
        result = (await channel.declare_queue(name, passive=True)).declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    counts: tuple[int, int] = await run_declaration(broker, "queue", name, None, passive)
    return counts


async def queue_depth(broker: Broker, name: str) -> int:
    """Messages ready in a queue (not counting deliveries a consumer holds unacked)."""
    return (await queue_counts(broker, name))[0]


async def purge_queue(broker: Broker, name: str) -> int:
    """Delete every ready message of an existing queue; returns how many were deleted.

    Messages consumers hold unacked are not touched (they come back if not acked). A missing queue
    raises :class:`~amqtask.errors.TopologyNotFoundError` rather than being declared.
    """

    async def action(channel: AbstractChannel) -> int:
        queue = await channel.declare_queue(name, passive=True)
        return int((await queue.purge()).message_count or 0)

    return int(await run_declaration(broker, "queue", name, None, action))


async def delete_queue(broker: Broker, name: str) -> None:
    """Delete a queue if it exists."""

    async def action(channel: AbstractChannel) -> None:
        await channel.queue_delete(name)

    await run_declaration(broker, "queue", name, None, action)


async def delete_exchange(broker: Broker, name: str) -> None:
    """Delete an exchange if it exists."""

    async def action(channel: AbstractChannel) -> None:
        await channel.exchange_delete(name)

    await run_declaration(broker, "exchange", name, None, action)


async def server_version(broker: Broker) -> str:
    """The RabbitMQ version the broker reports, e.g. ``"3.10.8"``."""
    connection = await broker.connection()
    channel = await connection.channel()
    try:
        underlay = await channel.get_underlay_channel()
        version = underlay.connection.server_properties.get("version", "")
    finally:
        await channel.close()
    return version.decode() if isinstance(version, bytes) else str(version)
