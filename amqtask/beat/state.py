"""What beat knows of past runs: the last-run state kept in RabbitMQ, how it is reconciled, and ``beat list``.

**The state lives in a durable queue holding one message, the latest state.**

The broker is the only server (DESIGN decision 6), so what a new or restarted leader must know (for
each entry, the last slot it handled) lives in a queue: ``beat_state_name``, default
``amqtask.beat.<app main>.state``, declared durable and classic with ``x-max-length: 1`` and
``x-overflow: drop-head``, so each new state pushes the previous one out. The leader publishes the whole
state (JSON, persistent, publisher-confirmed) after every batch of sends, on its lock connection (so a
beat that lost the lock cannot write it; see :mod:`amqtask.beat.leader`), and reads it once when it
takes the lock.

**Reading without taking.** AMQP has no peek, so a reader ``basic.get``\\ s every message in the queue
without acking, keeps the one with the highest sequence number and nacks them all back (requeue).
Normally there is one; there can be two for a moment, when a state is published while a reader (``beat
list``) holds the previous one unacked (the length limit counts only ready messages): the sequence number
picks the newer, and the leader's next write collapses them. A reader holding the message also makes the
queue look empty to another for that round trip, so an empty read is retried a few times before it is
believed (an empty state makes a new leader start every entry afresh, skipping missed runs).

**Why classic, explicitly**: a quorum queue (the vhost default on some clusters) counts every
nack-requeue as a delivery attempt on RabbitMQ 4.0-4.2 and drops the message at the default delivery
limit of 20, which repeated reads would reach. In a cluster the state therefore lives on one node; while
that node is down a new leader cannot read the state and waits for it rather than guess.

:func:`reconcile` turns a state read at takeover (or kept across a schedule-file reload) into the state
the loop starts from, applying each entry's catch-up policy; :func:`status` is what ``amqtask beat
list`` shows: entries, next runs, last runs from the state, and whether a beat holds the lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from ..connection import SETTLE_ERRORS, Broker
from ..errors import AmqtaskError, TopologyNotFoundError, UnroutableError
from ..producer import Publisher
from ..protocol import WireMessage
from ..topology import translate
from .catalog import Catalog
from .entries import Entry
from .leader import lock_is_held, lock_name
from .sources import ScheduleSource, resolve_source

if TYPE_CHECKING:
    from ..app import App

__all__ = [
    "STATE_QUEUE_ARGUMENTS",
    "BeatState",
    "EntryState",
    "EntryStatus",
    "StateStore",
    "Status",
    "decode_state",
    "encode_state",
    "reconcile",
    "state_name",
    "status",
]

log = logging.getLogger("amqtask.beat")

#: Arguments of the state queue: it holds only the newest state; classic, for the reason above.
STATE_QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-length": 1, "x-overflow": "drop-head", "x-queue-type": "classic"}
_FORMAT = 1
# An empty read is believed only after this many tries this far apart (a reader may hold the message).
_EMPTY_READS = 3
_EMPTY_READ_PAUSE_S = 0.05
# States of entries no longer scheduled are kept this long (another beat version may still run them).
_FORGET_AFTER_S = 30 * 86_400
# Failures of `beat list`'s broker reads: shown instead of the states.
_STATUS_ERRORS: tuple[type[BaseException], ...] = (AmqtaskError, *SETTLE_ERRORS)


def state_name(app: App) -> str:
    """The state queue of ``app``'s beats: ``beat_state_name``, default ``amqtask.beat.<app main>.state``."""
    return str(app.conf.beat_state_name or f"amqtask.beat.{app.main}.state")


@dataclass(frozen=True)
class EntryState:
    """What beat knows of one entry.

    ``slot`` is the latest slot handled: sent, skipped (catch-up ``"skip"``), or, for an entry new to
    the state, the moment beat first saw it (its first fire is the next slot after that). ``schedule``
    is the schedule's description when ``slot`` was recorded; if the entry's schedule has changed since,
    beat starts it afresh. ``sent_slot``, ``sent_at`` and ``task_id`` describe the last message sent.
    """

    slot: datetime
    schedule: str
    sent_slot: datetime | None = None
    sent_at: datetime | None = None
    task_id: str | None = None


@dataclass(frozen=True)
class BeatState:
    """One state message: a sequence number (one more per write) and the entries' states."""

    seq: int = 0
    entries: Mapping[str, EntryState] = field(default_factory=dict)
    written_at: datetime | None = None
    writer: str | None = None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _date(value: Any) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}")
    return moment


def encode_state(state: BeatState) -> bytes:
    """The JSON body of a state message."""
    entries = {
        name: {
            "slot": _iso(entry.slot),
            "schedule": entry.schedule,
            "sent_slot": _iso(entry.sent_slot),
            "sent_at": _iso(entry.sent_at),
            "task_id": entry.task_id,
        }
        for name, entry in state.entries.items()
    }
    document = {
        "format": _FORMAT,
        "seq": state.seq,
        "written_at": _iso(state.written_at),
        "writer": state.writer,
        "entries": entries,
    }
    return json.dumps(document, sort_keys=True).encode()


def decode_state(body: bytes) -> BeatState:
    """Parse a state message body; raises ValueError when it is not one."""
    try:
        document = json.loads(body)
        if document.get("format") != _FORMAT:
            raise ValueError(f"unknown state format {document.get('format')!r}")
        entries = {}
        for name, raw in document["entries"].items():
            slot = _date(raw["slot"])
            if slot is None:
                raise ValueError(f"entry {name!r} has no slot")
            entries[name] = EntryState(
                slot, str(raw["schedule"]), _date(raw.get("sent_slot")), _date(raw.get("sent_at")),
                raw.get("task_id"),
            )  # fmt: skip
        return BeatState(int(document["seq"]), entries, _date(document.get("written_at")), document.get("writer"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a beat state message: {exc!r}") from None


class StateStore:
    """The state queue ``name`` on ``broker``: read with get + nack (requeue), written with confirms."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = name

    async def declare(self) -> None:
        """Declare the state queue (idempotent); a queue of that name with other arguments is an error."""
        channel = await self.broker.channel(confirms=False)
        try:
            await channel.declare_queue(self.name, durable=True, arguments=dict(STATE_QUEUE_ARGUMENTS))
        except aiormq.exceptions.AMQPChannelError as exc:
            raise translate(exc, "queue", self.name, STATE_QUEUE_ARGUMENTS) from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def read(self, *, passive: bool = False, timeout: float | None = None) -> BeatState | None:
        """The newest state in the queue, or None when there is none (yet).

        With ``passive`` (for ``beat list``) a missing queue means None instead of being declared.
        The messages are left in the queue. An unreadable message is logged and ignored.
        """
        if not passive:
            await self.declare()
        for attempt in range(_EMPTY_READS):
            if attempt:
                await asyncio.sleep(_EMPTY_READ_PAUSE_S)
            messages = await self._get_all(passive, timeout)
            if messages is None:
                return None
            newest = _newest(messages)
            if newest is not None:
                return newest
        return None

    async def _get_all(self, passive: bool, timeout: float | None) -> list[bytes] | None:
        channel = await self.broker.channel(confirms=False, timeout=timeout)
        try:
            queue = await channel.declare_queue(self.name, passive=True)
            held: list[AbstractIncomingMessage] = []
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                held.append(message)
            if held:
                await held[-1].nack(multiple=True, requeue=True)
            return [message.body for message in held]
        except aiormq.exceptions.ChannelNotFoundEntity:
            if passive:
                return None
            raise TopologyNotFoundError(f"beat state queue {self.name!r} vanished while being read") from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def write(self, publisher: Publisher, state: BeatState) -> None:
        """Publish ``state`` (persistent) and wait for the broker's confirm; redeclare a deleted queue."""
        wire = WireMessage(
            body=encode_state(state), content_type="application/json", delivery_mode=2,
            headers={"amqtask_beat_state": state.seq},
        )  # fmt: skip
        try:
            await publisher.publish(wire, "", self.name, mandatory=True)
        except UnroutableError:
            log.warning("beat state queue %r was missing; declaring it again", self.name)
            await self.declare()
            await publisher.publish(wire, "", self.name, mandatory=True)


def _newest(bodies: list[bytes]) -> BeatState | None:
    newest: BeatState | None = None
    for body in bodies:
        try:
            state = decode_state(body)
        except ValueError as exc:
            log.error("ignoring an unreadable beat state message (%s): %r", exc, body[:200])
            continue
        if newest is None or state.seq > newest.seq:
            newest = state
    return newest


def reconcile(
    entries: Mapping[str, Entry], states: Mapping[str, EntryState], now: datetime, *, taking_over: bool
) -> dict[str, EntryState]:
    """The states after (re)starting leadership at ``now`` or loading a changed schedule.

    An entry without a state, or whose schedule changed, starts afresh: its first fire is its first slot
    after ``now``. On ``taking_over``, a ``"skip"`` entry's missed slots are marked handled without
    sending; ``"once"`` entries keep their state, so the next tick sends their latest missed slot.
    States of entries not in ``entries`` are kept (another beat version may run them) until they are
    older than 30 days.
    """
    result: dict[str, EntryState] = {}
    for name, known in states.items():
        if name in entries or (now - known.slot).total_seconds() < _FORGET_AFTER_S:
            result[name] = known
    for name, entry in entries.items():
        current = result.get(name)
        described = entry.schedule.describe()
        if current is None or current.schedule != described:
            if current is not None:
                log.info("entry %r: schedule changed to %s; next run at its next slot", name, described)
            result[name] = EntryState(now, described, *(_sent(current)))
        elif taking_over and entry.catch_up == "skip":
            missed = entry.latest_slot(current.slot, now)
            if missed is not None:
                log.info("entry %r: skipping runs missed while no beat was leading (up to %s)", name, missed)
                result[name] = dataclasses.replace(current, slot=missed)
    return result


def _sent(known: EntryState | None) -> tuple[datetime | None, datetime | None, str | None]:
    return (None, None, None) if known is None else (known.sent_slot, known.sent_at, known.task_id)


@dataclass(frozen=True)
class EntryStatus:
    """One row of ``amqtask beat list``: the entry, its next slot, and its state (None if unknown)."""

    entry: Entry
    next_run: datetime
    state: EntryState | None


@dataclass(frozen=True)
class Status:
    """What ``amqtask beat list`` shows: the entries, and whether a beat leads (None: broker unreachable)."""

    lock_name: str
    state_name: str
    entries: list[EntryStatus]
    leader: bool | None
    error: str | None


async def status(
    app: App,
    *,
    schedule_file: str | os.PathLike[str] | None = None,
    source: ScheduleSource | None = None,
    now: datetime | None = None,
) -> Status:
    """The entries beat would run for ``app``, with next runs and, from the broker, last runs and the lock.

    Reads the state without taking it (get + requeue) and never takes the lock. When the broker cannot
    be reached, ``error`` says why and the states are unknown.
    """
    if source is None and app.conf.beat_scheduler:
        source = resolve_source(app, app.conf.beat_scheduler)
    catalog = Catalog(app, schedule_file, source)
    await catalog.load_source()
    entries = catalog.entries
    lock_queue, state_queue = lock_name(app), state_name(app)
    moment = now or datetime.now(timezone.utc)
    broker = app.runtime().broker
    timeout = app.conf.broker_connect_timeout_s
    states: Mapping[str, EntryState] = {}
    leader: bool | None = None
    error: str | None = None
    try:
        leader = await lock_is_held(broker, lock_queue, timeout)
        found = await StateStore(broker, state_queue).read(passive=True, timeout=timeout)
        states = found.entries if found is not None else {}
    except _STATUS_ERRORS as exc:
        error = f"{type(exc).__name__}: {exc}"
    rows = [EntryStatus(entry, entry.schedule.next_after(moment), states.get(name)) for name, entry in entries.items()]
    return Status(lock_queue, state_queue, rows, leader, error)
