"""Taking a queue as another client declared it: how amqtask drops in next to Celery in any start order.

RabbitMQ refuses (406) a declaration whose arguments differ from the queue it holds, and AMQP 0-9-1
offers no way to read a queue's arguments. When a worker or producer finds its queue declared with
other arguments (Celery's ``x-max-priority``, a quorum queue with settings of its own, a DLX of its
own), it learns the broker's arguments from the refusals themselves: each names one differing
argument and the value the broker holds, so a declaration that takes that value is tried next, until
one is accepted as equivalent (which changes nothing). The queue is then used as it is: the worker
consumes it and still moves the tasks it gives up on into ``<queue>.dlq`` itself (confirmed before
the ack), and one WARNING names the differences and what they cost. ``task_queues_strict=True``
restores the refusal (:class:`~amqtask.errors.TopologyMismatchError`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel

from . import topology, verification
from .connection import Broker
from .errors import TopologyMismatchError
from .topology import QueueSpec
from .verification import Check

if TYPE_CHECKING:
    from .delays import DelayTopology

log = logging.getLogger("amqtask.topology")

#: Refusals followed before giving up on learning the rest (a queue rarely differs in more than three).
_MAX_PROBES = 8
_TYPED = re.compile(r"^the value '(?P<value>[^']*)' of type '(?P<type>[^']*)'$")
_INTEGER_TYPES = {"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort", "unsignedint", "timestamp"}
_NOT_AN_ARGUMENT = ("durable", "exclusive", "auto_delete")


def _broker_value(text: str) -> Any:
    """A value as the broker spelled it in a refusal, typed so that declaring it is found equivalent."""
    if text == "none":
        return None
    typed = _TYPED.match(text)
    if typed:
        value, kind = typed["value"], typed["type"]
        if kind in _INTEGER_TYPES:
            return int(value)
        if kind == "bool":
            return value == "true"
        return value
    value = text.strip("'")
    return int(value) if re.fullmatch(r"-?\d+", value) else value


@dataclass(frozen=True)
class Adoption:
    """A queue used as the broker holds it: ``differences`` maps argument -> (wanted, held)."""

    queue: str
    differences: Mapping[str, tuple[Any, Any]]
    complete: bool

    def losses(self) -> list[str]:
        """What the app asked for and does not get, in words."""
        lost: list[str] = []
        for arg, (wanted, held) in self.differences.items():
            text = _loss(self.queue, arg, wanted, held)
            if text and text not in lost:
                lost.append(text)
        return lost

    def describe(self) -> str:
        """The differences, one ``arg: wanted W, held H`` each."""
        parts = [f"{arg}: wanted {wanted!r}, held {held!r}" for arg, (wanted, held) in self.differences.items()]
        if not self.complete:
            parts.append("(and maybe more the broker did not name)")
        return "; ".join(parts)


def _loss(queue: str, arg: str, wanted: Any, held: Any) -> str:
    if arg in ("x-dead-letter-exchange", "x-dead-letter-routing-key") and wanted is not None:
        return (
            "broker-side dead-lettering into the .dlq (messages the broker drops for TTL, length or a delivery "
            f"limit are not kept there; the worker still moves the tasks it gives up on into {queue}.dlq)"
        )
    if arg == "x-max-priority" and wanted is not None:
        return "message priorities" if held is None else f"priorities above {held}"
    if arg == "x-queue-type" and wanted == "quorum":
        return "quorum replication and the delivery limit (a task that kills its worker is redelivered without end)"
    if arg == "x-delivery-limit" and wanted is not None:
        return f"the delivery limit of {wanted} (the queue's is {held if held is not None else 'the broker default'})"
    if wanted is not None:
        return f"{arg}={wanted!r}"
    return ""  # an argument only the queue has: nothing the app asked for is lost


async def held_arguments(broker: Broker, spec: QueueSpec) -> tuple[dict[str, Any], bool]:
    """The arguments the broker holds for ``spec``'s queue, as far as it compares them, and whether all were found.

    Starts from the arguments amqtask wants and, for each refusal, takes the value the broker names.
    A declaration the broker accepts is equivalent to the queue, so it changes nothing.
    """
    probe = spec.queue_arguments()
    seen: set[str] = set()
    for _ in range(_MAX_PROBES):
        arguments = dict(probe)

        async def declare(channel: AbstractChannel, arguments: dict[str, Any] = arguments) -> None:
            await channel.declare_queue(spec.name, durable=True, arguments=arguments)

        try:
            await topology.run_declaration(broker, "queue", spec.name, arguments, declare)
            return probe, True
        except TopologyMismatchError as exc:
            refusal = topology.INEQUIVALENT.search(exc.detail)
            if refusal is None or refusal["arg"] in _NOT_AN_ARGUMENT or refusal["arg"] in seen:
                return probe, False
            seen.add(refusal["arg"])
            held = _broker_value(refusal["current"])
            if held is None:
                probe.pop(refusal["arg"], None)
            else:
                probe[refusal["arg"]] = held
    return probe, False


async def adoption_of(broker: Broker, spec: QueueSpec) -> Adoption:
    """How the queue the broker holds differs from ``spec`` (the queue exists with other arguments)."""
    wanted = spec.queue_arguments()
    held, complete = await held_arguments(broker, spec)
    differences = {
        arg: (wanted.get(arg), held.get(arg)) for arg in sorted({*wanted, *held}) if wanted.get(arg) != held.get(arg)
    }
    return Adoption(spec.name, differences, complete)


# One warning per queue and set of differences per process: producers check their queues again on
# every reconnection, and a worker declares on each start.
_warned: set[tuple[str, str]] = set()


async def declare_or_adopt(broker: Broker, spec: QueueSpec, *, strict: bool) -> Adoption | None:
    """Declare ``spec``'s queue, or, unless ``strict``, adopt the queue the broker holds with other arguments.

    Returns the :class:`Adoption` when the queue was taken as it is. The dead-letter queue and the
    bindings are declared either way.
    """
    try:
        await topology.declare_queue(broker, spec)
        return None
    except TopologyMismatchError:
        if strict:
            raise
    adoption = await adoption_of(broker, spec)
    await topology.bind_queue(broker, spec)
    key = (spec.name, adoption.describe())
    if key not in _warned:
        _warned.add(key)
        lost = "; ".join(adoption.losses()) or "nothing the app asked for"
        log.warning(
            "queue %r exists with other arguments than amqtask would declare (%s); using it as it is. Lost: %s. "
            "Set task_queues_strict=True to refuse such a queue instead",
            spec.name, adoption.describe(), lost,
        )  # fmt: skip
    return adoption


async def verify(
    broker: Broker, specs: Iterable[QueueSpec], delay_topology: DelayTopology | None = None, *, strict: bool
) -> list[Check]:
    """:func:`amqtask.verification.verify`, with task queues held with other arguments reported as ``adopted``
    (what a worker would do with them) unless ``strict``."""
    specs = list(specs)
    checks = await verification.verify(broker, specs, delay_topology)
    if strict:
        return checks
    by_name = {spec.name: spec for spec in specs}
    reported: list[Check] = []
    for check in checks:
        spec = by_name.get(check.name) if check.kind == "queue" else None
        if spec is not None and check.problem == "mismatch":
            adoption = await adoption_of(broker, spec)
            lost = "; ".join(adoption.losses()) or "nothing"
            check = Check(check.kind, check.name, "adopted", f"{adoption.describe()}; lost: {lost}")
        reported.append(check)
    return reported
