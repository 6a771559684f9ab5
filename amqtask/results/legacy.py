"""Celery's legacy ``amqp`` result layout, for clients in other languages (``result_legacy_queues``).

celery-node's and gocelery's ``amqp`` result backends read a task's result from a queue named by the task id
without dashes (durable, auto-delete, ``x-expires``), holding Celery's result message as JSON, fetched with
``basic.get`` and never acked. The worker declares that queue itself before publishing (a client declares it
only when it first polls, which may be after the result was sent), with the arguments those clients
declare it with. Only final states are written: a client holds the first message it gets unacked.
It costs a queue per task (see ``docs/results.md``) and the queue lives on one node, so it is off by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel

from .. import protocol
from ..serializers import JSON
from ..settings import Settings

if TYPE_CHECKING:
    from ..producer import Publisher


def legacy_queue_name(task_id: str) -> str:
    """The queue Celery's amqp backend (and its ports) keep a task's result in."""
    return task_id.replace("-", "")


def legacy_queue_arguments(settings: Settings) -> dict[str, Any]:
    """celery-node and gocelery declare ``x-expires`` 86400000 (1 day) unless configured otherwise."""
    return {"x-expires": settings.result_expires_s * 1000}


async def write(publisher: Publisher, settings: Settings, report: protocol.ResultMessage) -> None:
    """Declare the task's legacy result queue and put the final report in it, as JSON."""
    name = legacy_queue_name(report.task_id)
    arguments = legacy_queue_arguments(settings)

    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True, auto_delete=True, arguments=arguments)

    await publisher.broker.run(declare)
    await publisher.publish(protocol.encode_result(report, JSON), "", name, mandatory=False)


__all__ = ["legacy_queue_arguments", "legacy_queue_name", "write"]
