"""Where a task's state reports go: the caller's reply queue, and for ``amqp`` tasks the result stream.

The one path for every report a worker makes (STARTED, ``update_state``, RETRY, SUCCESS, FAILURE, REVOKED).
For an ``amqp`` task the reply and the stream record are one publish (the reply queue named in ``BCC``),
so the sender learns the outcome as fast as with ``rpc`` alone, and the delivery is acked only after the
broker confirmed that both queues hold it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from .. import protocol, serializers, signing
from ..errors import SerializationError
from ..failures import encode_exception
from ..protocol import READY_STATES, ResultMessage, TaskMessage
from . import legacy, stream
from .rpc import expiry_header

if TYPE_CHECKING:
    from ..app import App, Runtime


def backend_of(app: App, task_name: str | None) -> str:
    """``rpc`` or ``amqp``: the task's own ``result_backend``, else the app's."""
    task = app.tasks.get(task_name) if task_name else None
    chosen = task.options.get("result_backend") if task is not None else None
    return str(chosen or app.conf.result_backend)


def expires_of(app: App, task_name: str | None) -> float:
    """How long a task's results stay readable: its ``result_expires``, at most the stream's retention."""
    task = app.tasks.get(task_name) if task_name else None
    own = task.options.get("result_expires") if task is not None else None
    retention = float(app.conf.result_expires_s)
    return retention if own is None else min(float(own), retention)


def result_codec(app: App, content_type: str | None) -> serializers.Codec:
    """``result_serializer``, else the caller's own encoding: a Celery client that sent JSON may accept only JSON."""
    name = app.conf.result_serializer
    if name is None:
        name = "msgpack" if content_type == serializers.MSGPACK_CONTENT_TYPE else "json"
    return serializers.codec(name)


async def report(
    app: App, runtime: Runtime, report: ResultMessage, *, task: str | None, reply_to: str | None,
    content_type: str | None, keys: Sequence[str] | None = None,
) -> None:  # fmt: skip
    """Send ``report`` to ``reply_to`` (if any) and, for an ``amqp`` task, append it to the result stream.

    Signed with the first of ``keys`` (default: ``signing_keys``) when signing is on; a worker passes the
    key its caller used first.
    """
    codec = result_codec(app, content_type)
    persistent = app.conf.result_persistent
    try:
        out = protocol.encode_result(report, codec, persistent=persistent)
    except SerializationError as exc:
        report = ResultMessage(report.task_id, protocol.FAILURE, encode_exception(exc),
                               date_done=protocol.now_iso(), parent_id=report.parent_id)  # fmt: skip
        out = protocol.encode_result(report, codec, persistent=persistent)
    publisher = runtime.publisher
    amqp = backend_of(app, task) == "amqp"
    if amqp:
        out.headers.update(expiry_header(expires_of(app, task)))  # the sender's copy expires when the stream's does
    signing.seal(app.conf.signing_keys if keys is None else keys, out, signing.Kind.RESULT)
    sends: list[Awaitable[Any]] = []
    if amqp:
        # One publish for the stream and the reply: confirmed once both hold it (see stream.append).
        sends.append(stream.append(publisher, app.conf, out, copy_to=reply_to))
        if app.conf.result_legacy_queues and report.status in READY_STATES:
            sends.append(legacy.write(publisher, app.conf, report))
    elif reply_to:
        # Not mandatory: a caller that went away (its reply queue expired) is nobody to tell.
        sends.append(publisher.publish(out, "", reply_to, mandatory=False))
    if len(sends) == 1:
        await sends[0]  # the usual case: no task (and no gather) per report
    else:
        await asyncio.gather(*sends)


def promised_ids(message: TaskMessage) -> list[tuple[str, str]]:
    """The ids (with their task names) a client's send hands out: the task's own, its chain's later steps
    (a chain's caller holds the last one's id) and a chord's body (announced by the first header task only)."""
    steps = [*(message.chain or []), *([message.chord] if message.chord and not message.group_index else [])]
    promised = [(message.id, message.task)]
    for step in steps:
        options, name = step.get("options"), step.get("task")
        task_id = options.get("task_id") if isinstance(options, dict) else None
        if isinstance(task_id, str) and isinstance(name, str):
            promised.append((task_id, name))
    return promised


def announcement(app: App, runtime: Runtime, message: TaskMessage, delay_s: float) -> Awaitable[Any] | None:
    """Announcing the ``amqp`` ids this send hands out in a SENT record (None: no such id).

    Without it an id nobody sent and a task still waiting in its queue would both read PENDING; with it a
    reader can tell them apart (``AsyncResult.known``, the gateway's 404). A record lasts as long as the
    task's results would, counted from when the task is due.
    """
    if not app.conf.result_track_sent:
        return None
    by_lifetime: dict[int, list[str]] = {}
    for task_id, name in promised_ids(message):
        if backend_of(app, name) == "amqp":
            # Whole seconds: sends with a countdown share a batch with those of the same second.
            by_lifetime.setdefault(math.ceil(delay_s + expires_of(app, name)), []).append(task_id)
    records = [stream.announce(runtime.publisher, app.conf, ids, expires) for expires, ids in by_lifetime.items()]
    return asyncio.gather(*records) if records else None


__all__ = ["announcement", "backend_of", "expires_of", "promised_ids", "report", "result_codec"]
