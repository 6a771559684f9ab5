"""The beat loop: take the leader lock, then send each entry's task at its slots until stopped.

Any number of :class:`Scheduler`\\ s (``amqtask beat`` processes) may run; the one holding the lock
(:mod:`amqtask.beat.leader`) sends, the others retry the lock every ``beat_lock_retry_s``. On taking the
lock a scheduler reads the last-run state (:mod:`amqtask.beat.state`) and applies each entry's catch-up
policy; then it loops: send what is due, write the state, sleep until the next slot.

**No drift.** An entry's next fire is ``schedule.next_after(last slot)``, a pure function of the schedule
(:mod:`amqtask.beat.schedules`), never "an interval after the last send finished". The loop sleeps until
the earliest next slot, at most ``beat_max_loop_s`` (so edits to the schedule file or source and jumps
of the wall clock are noticed), and wakes at once on :meth:`Scheduler.stop` or when the lock's connection closes.

**Sending.** A due entry's message is built exactly as ``delay`` builds it (``app.build_message`` and
``app.sender``: same protocol, routing, middleware), with ``ignore_result`` unless the entry says
otherwise, and published with confirms on the lock's connection. Due entries are sent together, after
checking the lock is still held; a send that fails is logged and retried with backoff (1 s doubling to
60 s): the entry stays due, its slot is never dropped.

**At least once.** The state is written (confirmed) right after the batch's messages are confirmed. A
leader that dies between the two leaves a state without that slot, and the next leader sends the slot
again. The window is one round trip, and the repeat carries the same task id (derived from entry and
slot), so a consumer can discard it. Writing the state first would turn this into at-most-once: a
crash would then lose a fire instead of repeating one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .. import serializers
from ..app import Runtime
from ..connection import CONNECTION_ERRORS
from ..errors import BrokerConnectionError, ConfigurationError, TopologyNotFoundError
from ..producer import Publisher
from ..sending import Outgoing
from .catalog import Catalog
from .entries import Entry
from .leader import FencedBroker, LeaderLock, NotLeaderError, lock_name
from .sources import Fired, ScheduleSource, resolve_source
from .state import BeatState, EntryState, StateStore, reconcile, state_name

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Fired", "Scheduler", "serve", "utc_now"]

log = logging.getLogger("amqtask.beat")

# Failures while taking over that mean "try again": the connection or the lock went away (a CancelledError
# only when FencedBroker.cancelled_by_connection_loss() says so), or the state queue is out of reach (in a
# cluster, its node is down: better to wait than to guess the state).
_TAKEOVER_ERRORS: tuple[type[BaseException], ...] = (
    NotLeaderError, BrokerConnectionError, TopologyNotFoundError, asyncio.CancelledError, *CONNECTION_ERRORS,
)  # fmt: skip
# Backoff of an entry whose send failed: 1 s, doubling, at most 60 s.
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


def utc_now() -> datetime:
    """The current time as an aware UTC datetime (the scheduler's default clock)."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class _Link:
    """A scheduler's own connection and what lives on it: the lock, the state, the fenced publisher."""

    broker: FencedBroker
    lock: LeaderLock
    store: StateStore
    runtime: Runtime


@dataclass
class _Failure:
    attempts: int
    retry_at: float  # time.monotonic()


class Scheduler:
    """The beat loop of one process for ``app``; see the module documentation.

    ``schedule_file`` (default: the ``beat_schedule_file`` setting) is merged over ``beat_schedule``
    and re-read when it changes; so is ``source`` (default: the one the ``beat_scheduler`` setting
    names, see :mod:`amqtask.beat.sources`), read when :meth:`run` starts. ``clock`` returns the
    current time as an aware datetime (tests pass a settable one). Entries are validated here, so a bad
    schedule fails before any connection is made.
    """

    def __init__(
        self,
        app: App,
        *,
        schedule_file: str | os.PathLike[str] | None = None,
        source: ScheduleSource | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.app = app
        self.clock = clock
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        conf = app.conf
        self.lock_name = lock_name(app)
        self.state_name = state_name(app)
        if source is None and conf.beat_scheduler:
            source = resolve_source(app, conf.beat_scheduler)
        #: Where the entries come from, and their re-reading.
        self.catalog = Catalog(app, schedule_file, source)
        #: When this scheduler last took the lock (None while it is not leading).
        self.leader_since: datetime | None = None
        self._states: dict[str, EntryState] = {}
        self._seq = 0
        self._dirty = False
        self._write_retry_at = 0.0
        self._failures: dict[str, _Failure] = {}
        self._stopping = False
        self._wake = asyncio.Event()
        self._link: _Link | None = None

    # ------------------------------------------------------------------------------------------ public
    @property
    def entries(self) -> dict[str, Entry]:
        """The entries this scheduler runs (replaced when their file or source changes)."""
        return self.catalog.entries

    @property
    def leading(self) -> bool:
        """Whether this scheduler holds the lock on its current connection and has loaded the state."""
        return self.leader_since is not None and self._link is not None and self._link.broker.leading

    @property
    def states(self) -> Mapping[str, EntryState]:
        """The last-run state as this scheduler knows it (read from the broker on taking the lock)."""
        return self._states

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has been called."""
        return self._stopping

    def stop(self) -> None:
        """Ask :meth:`run` (or :meth:`acquire`) to return: the batch being sent is finished first."""
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        """Make the loop look at the clock now (tests call it after moving a settable clock)."""
        self._wake.set()

    async def run(self) -> None:
        """Take the lock (waiting as a standby), send on schedule, and repeat after losing it, until stopped.

        Closes the connection on the way out, which releases the lock at once.
        """
        await self.catalog.load_source()
        log.info(
            "beat starting: %d entries (%s); lock %r, state %r",
            len(self.entries), ", ".join(self.entries) or "none", self.lock_name, self.state_name,
        )  # fmt: skip
        try:
            while not self._stopping:
                if not await self.acquire():
                    break
                try:
                    await self._lead()
                except (NotLeaderError, BrokerConnectionError, asyncio.CancelledError) as exc:
                    if (
                        isinstance(exc, asyncio.CancelledError)
                        and not self._connect().broker.cancelled_by_connection_loss()
                    ):
                        raise
                    self.leader_since = None
                    if not self._stopping:
                        log.warning("beat lost the lock (%s); trying to take it again", str(exc) or type(exc).__name__)
        finally:
            await self.close()

    async def acquire(self, timeout: float | None = None) -> bool:
        """Wait until this scheduler holds the lock and has loaded the state; False if stopped or timed out."""
        link = self._connect()
        broker, lock = link.broker, link.lock
        deadline = None if timeout is None else time.monotonic() + timeout
        retry_s = float(self.app.conf.beat_lock_retry_s)
        announced = False
        while not self._stopping:
            started = time.monotonic()
            # Waiting at most one retry interval for a connection keeps stop() prompt while the broker is down.
            if await lock.try_acquire(retry_s):
                try:
                    await broker.while_leading(self._take_over())
                    return True
                except _TAKEOVER_ERRORS as exc:
                    if isinstance(exc, asyncio.CancelledError) and not broker.cancelled_by_connection_loss():
                        raise
                    broker.revoke()
                    log.warning("taking over as the beat leader failed (%s); trying again", str(exc) or repr(exc))
            elif not announced and lock.held_elsewhere:
                log.info("standby: another beat holds %r; trying every %.2fs", self.lock_name, retry_s)
                announced = True
            pause = max(0.0, retry_s - (time.monotonic() - started))
            if deadline is not None and time.monotonic() + pause > deadline:
                return False
            await self._sleep(pause)
        return False

    async def tick(self) -> list[Fired]:
        """Send every entry that is due at ``clock()`` and write the state; return what was sent.

        Raises :class:`NotLeaderError` when the lock is not held; failed sends are logged and retried on
        a later tick.
        """
        link = self._connect()
        link.broker.check()
        await self._reload()
        now = self.clock()
        due = self._due(now)
        fired: list[Fired] = []
        if due:
            await link.lock.verify()
            sends = (self._send(link.runtime, entry, slot) for entry, slot in due)
            results = await asyncio.gather(*sends, return_exceptions=True)
            for (entry, slot), result in zip(due, results, strict=True):
                if isinstance(result, asyncio.CancelledError) and link.broker.cancelled_by_connection_loss():
                    result = NotLeaderError(f"the connection was given up while sending {entry.name!r}")
                if isinstance(result, NotLeaderError):
                    raise result  # the state is not written: the next leader sends these slots again
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    self._send_failed(entry, slot, result)
                    continue
                fired.append(result)
                self._record(entry, slot, result)
        if self._dirty and time.monotonic() >= self._write_retry_at:
            await self._write_state(link)
        await self.catalog.record(fired)  # after the state: the source's bookkeeping is for people to read
        return fired

    async def close(self) -> None:
        """Close this scheduler's connection (releasing the lock)."""
        if self._link is not None:
            link, self._link = self._link, None
            if self.leader_since is not None:
                log.info("beat stopped; releasing the lock %r", self.lock_name)
            self.leader_since = None
            link.broker.revoke()  # a deliberate close: no "lost the lock" warning
            with contextlib.suppress(Exception):
                await link.runtime.publisher.close()
            await link.broker.close()

    # ------------------------------------------------------------------------------------------ leading
    def _connect(self) -> _Link:
        if self._link is None:
            broker = FencedBroker(self.app.conf, name=f"{self.app.main}-beat-{os.getpid()}")
            broker.on_lost = self._wake.set
            # Sends use only the runtime's publisher: beat's own, fenced by the lock.
            runtime = dataclasses.replace(self.app.runtime(), broker=broker, publisher=Publisher(broker, self.app.conf))
            self._link = _Link(broker, LeaderLock(broker, self.lock_name), StateStore(broker, self.state_name), runtime)
        return self._link

    async def _take_over(self) -> None:
        link = self._connect()
        state = await link.store.read() or BeatState()
        if self.catalog.source is not None:
            await self.catalog.refresh()  # a standby's view of the source may be hours old
        now = self.clock()
        self._seq = state.seq
        self._states = reconcile(self.entries, state.entries, now, taking_over=True)
        self._dirty = True  # the first write also collapses a duplicate a reader may have left behind
        self._write_retry_at = 0.0
        self._failures.clear()
        await self._write_state(link)
        self.leader_since = now
        log.info("beat is the leader (lock %r): %d entries", self.lock_name, len(self.entries))

    async def _lead(self) -> None:
        link = self._connect()
        while not self._stopping:
            await link.broker.while_leading(self.tick())
            await self._sleep(self._next_delay())
        if self._dirty and link.broker.leading:  # stopping: leave the last sends recorded if at all possible
            await self._write_state(link)

    def _due(self, now: datetime) -> list[tuple[Entry, datetime]]:
        due = []
        for entry in self.entries.values():
            failure = self._failures.get(entry.name)
            if failure is not None and failure.retry_at > time.monotonic():
                continue
            slot = entry.latest_slot(self._states[entry.name].slot, now)
            if slot is not None:
                due.append((entry, slot))
        return due

    async def _send(self, runtime: Runtime, entry: Entry, slot: datetime) -> Fired:
        options = entry.send_options(self.app.main, slot)
        message, route, codec_name = self.app.build_message(
            entry.task, entry.args, dict(entry.kwargs), self.app.tasks.get(entry.task), options
        )
        await self.app.sender.send(self.app, Outgoing(message, route, serializers.codec(codec_name), runtime=runtime))
        return Fired(entry.name, slot, message.id)

    def _record(self, entry: Entry, slot: datetime, fired: Fired) -> None:
        if self._failures.pop(entry.name, None) is not None:
            log.info("entry %r: sent %s for slot %s after earlier failures", entry.name, entry.task, slot)
        else:
            log.info("entry %r: sent %s for slot %s", entry.name, entry.task, slot)
        self._states[entry.name] = EntryState(slot, entry.schedule.describe(), slot, self.clock(), fired.task_id)
        self._dirty = True

    def _send_failed(self, entry: Entry, slot: datetime, exc: Exception) -> None:
        failure = self._failures.get(entry.name) or _Failure(0, 0.0)
        failure.attempts += 1
        delay = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (failure.attempts - 1))
        failure.retry_at = time.monotonic() + delay
        self._failures[entry.name] = failure
        log.error(
            "entry %r: sending %s for slot %s failed (attempt %d), retrying in %.0fs: %s: %s",
            entry.name, entry.task, slot, failure.attempts, delay, type(exc).__name__, exc,
            exc_info=failure.attempts == 1 and not isinstance(exc, ConfigurationError | OSError),
        )  # fmt: skip

    async def _write_state(self, link: _Link) -> None:
        state = BeatState(self._seq + 1, dict(self._states), self.clock(), self.node)
        try:
            await link.store.write(link.runtime.publisher, state)
        except NotLeaderError:
            raise
        except Exception as exc:
            self._write_retry_at = time.monotonic() + _RETRY_FIRST_S
            log.error("writing the beat state failed, retrying: %s: %s", type(exc).__name__, exc)
            return
        self._seq = state.seq
        self._dirty = False

    def _next_delay(self) -> float:
        """Seconds until the earliest next slot or retry, at most ``beat_max_loop_s``."""
        now, monotonic = self.clock(), time.monotonic()
        delay = float(self.app.conf.beat_max_loop_s)
        if self._dirty:
            delay = min(delay, self._write_retry_at - monotonic)
        for entry in self.entries.values():
            failure = self._failures.get(entry.name)
            if failure is not None:
                delay = min(delay, failure.retry_at - monotonic)
            else:
                next_slot = entry.schedule.next_after(self._states[entry.name].slot)
                delay = min(delay, (next_slot - now).total_seconds())
        return max(0.0, delay)

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0 and not self._wake.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()
        if self._stopping:
            self._wake.set()  # stay awake: every later wait returns at once

    async def _reload(self) -> None:
        """Pick up changed entries; an invalid change keeps the current ones (logged by the catalog)."""
        change = await self.catalog.refresh()
        if change is None:
            return
        for name in change[1]:
            self._failures.pop(name, None)
        states = reconcile(self.entries, self._states, self.clock(), taking_over=False)
        self._dirty = self._dirty or states != self._states
        self._states = states


async def serve(
    app: App, *, schedule_file: str | os.PathLike[str] | None = None, source: ScheduleSource | None = None
) -> None:
    """Run a :class:`Scheduler` until SIGTERM or SIGINT (``amqtask beat``); a second signal aborts."""
    scheduler = Scheduler(app, schedule_file=schedule_file, source=source)
    loop = asyncio.get_running_loop()
    runner = asyncio.current_task()

    def on_signal() -> None:
        if scheduler.stopping and runner is not None:
            runner.cancel()
        scheduler.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await scheduler.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await app.aclose()
