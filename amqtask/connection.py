"""One AMQP connection per process and event loop, kept up by amqtask itself.

amqtask does not use aio-pika's robust connection: it has been seen to restore a connection but not
its consumers (aio-pika#231), and after a reconnect it hands out channels on which old delivery tags
are meaningless. Instead :class:`Broker` reconnects (with tenacity's backoff, cycling through the
configured URLs for cluster fail-over) and bumps a *generation*; every user of the connection
(publisher, result consumer, worker consumers) notices the new generation and rebuilds its own
channels, declarations and consumers. A delivery from an older generation is never acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq
import yarl
from aio_pika.abc import AbstractChannel
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from .errors import BrokerConnectionError
from .settings import Settings
from .urls import encode_credentials, mask_url

log = logging.getLogger("amqtask.connection")

#: Errors that mean "the connection or channel went away", as opposed to a broker refusal.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.IncompleteReadError,
)
#: Refusals RabbitMQ sends as a connection close rather than a channel close (quorum queues and 4.3's
#: deprecated features do): the connection went because of a command of ours. A plain close (320
#: CONNECTION_FORCED, a node shutting down) is a lost broker instead.
CONNECTION_REFUSALS: tuple[type[Exception], ...] = (
    aiormq.exceptions.ConnectionCommandInvalid,
    aiormq.exceptions.ConnectionNotAllowed,
    aiormq.exceptions.ConnectionNotImplemented,
    aiormq.exceptions.ConnectionResourceError,
    aiormq.exceptions.ConnectionInternalError,
)
#: How a node refuses to serve a stream while its replica there is (re)starting after another node left:
#: a channel close, gone by itself a moment later.
_REPLICA_STARTING = "does not have a running replica on the local node"


def replica_starting(exc: BaseException) -> bool:
    """Whether ``exc`` is a stream's refusal to be read on this node while its local replica (re)starts."""
    return isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) and _REPLICA_STARTING in str(exc)


#: Errors of acking, rejecting or cancelling on a channel that may be gone: never worth more than a log line.
SETTLE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError)
#: Errors after which a consumer's answer is to wait for the connection and consume again.
RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (*SETTLE_ERRORS, BrokerConnectionError, asyncio.TimeoutError)
_CHANNEL_OPEN_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, RuntimeError)

#: First pause after the broker refused an operation by closing the connection; it doubles up to the max.
REFUSAL_PAUSE_S = 0.5
REFUSAL_PAUSE_MAX_S = 8.0

ReconnectListener = Callable[[int], Awaitable[None]]
T = TypeVar("T")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``amqps://`` URLs: CA verification and hostname checks on by default."""
    options: dict[str, Any] = settings.broker_ssl_options or {}
    if not any(url.startswith("amqps://") for url in settings.broker_url) and not options:
        return None
    context = ssl.create_default_context(cafile=options.get("cafile"))
    context.check_hostname = bool(options.get("check_hostname", True))
    if options.get("certfile"):
        context.load_cert_chain(options["certfile"], options.get("keyfile"))
    return context


class Broker:
    """A self-healing connection to RabbitMQ, bound to the event loop it was first used on."""

    def __init__(self, settings: Settings, *, name: str, warnings: bool = True) -> None:
        """``warnings=False``: report failed connects and lost connections at DEBUG only, for a connection
        beside another that already says the broker is away (a worker's events connection)."""
        self.settings = settings
        self.name = name
        self._warning_level = logging.WARNING if warnings else logging.DEBUG
        self.generation = 0
        self._urls = itertools.cycle(settings.broker_url)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None
        self._gone = asyncio.Event()  # set when the current connection is gone; replaced per connection
        self._listeners: list[ReconnectListener] = []
        self._listener_tasks: set[asyncio.Future[None]] = set()
        #: The most recent connection failure, masked, for error messages.
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection is up right now."""
        return self._ready.is_set() and self._connection is not None and not self._connection.is_closed

    def on_reconnect(self, listener: ReconnectListener) -> None:
        """Call ``listener(generation)`` after every reconnection (not after the first connect)."""
        self._listeners.append(listener)

    async def connection(self, timeout: float | None = None) -> aio_pika.abc.AbstractConnection:
        """The current connection, waiting (up to ``timeout``) while amqtask (re)connects."""
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep_connected(), name=f"{self.name}-keeper")
        if self._ready.is_set() and self._connection is not None and self._connection.is_closed:
            # Closed: make sure the keeper hears of it (whatever its close callback did) and wait for the next one.
            self._ready.clear()
            self._gone.set()
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                last = f"; last error: {self.last_error}" if self.last_error else ""
                raise BrokerConnectionError(
                    f"no connection to the broker ({', '.join(map(mask_url, self.settings.broker_url))}) "
                    f"within {timeout:.1f}s{last}"
                ) from None
        assert self._connection is not None
        return self._connection

    async def channel(self, *, confirms: bool = True, timeout: float | None = None) -> AbstractChannel:
        """A new channel (publisher confirms on unless told otherwise), waiting out a reconnect.

        ``timeout`` bounds the wait for a usable connection (default ``publish_timeout_s``).
        """
        attempts = self.attempts(timeout, "cannot open a channel")
        while True:
            connection = await self.connection(attempts.remaining())
            try:
                channel: AbstractChannel = await connection.channel(
                    publisher_confirms=confirms, on_return_raises=confirms
                )
                return channel
            except _CHANNEL_OPEN_ERRORS as exc:
                lost: BaseException = exc
            except asyncio.CancelledError as exc:
                raise_if_cancelled(exc)  # failed by a connection aiormq found stuck
                lost = exc
            # The connection died between our check and the channel open: wait for the next one.
            await attempts.after(lost)

    async def run(self, action: Callable[[AbstractChannel], Awaitable[T]], *, timeout: float | None = None) -> T:
        """``action(channel)`` on a fresh channel without confirms, run again on a new connection if this one goes.

        For idempotent operations only (declarations, passive checks, deletions, bindings): an action
        cut off by a lost connection may or may not have taken effect. ``timeout`` (default
        ``publish_timeout_s``) bounds the whole, after which :class:`BrokerConnectionError` says why.
        Broker refusals sent as channel errors are raised as they come, after one try; those sent by
        closing the connection are tried again after growing pauses (see :class:`Attempts`).
        """
        attempts = self.attempts(timeout, "connection lost during a broker operation")
        while True:
            channel = await self.channel(confirms=False, timeout=attempts.remaining())
            try:
                return await action(channel)
            except CONNECTION_ERRORS as exc:
                lost: BaseException = exc
            except asyncio.CancelledError as exc:
                raise_if_cancelled(exc)  # failed by a connection aiormq found stuck
                lost = exc
            finally:
                await close_quietly(channel)
            await attempts.after(lost)

    def attempts(self, timeout: float | None, failure: str) -> Attempts:
        """The tries of one operation that rides out lost connections, for ``timeout`` (default
        ``publish_timeout_s``); ``failure`` says what failed when they run out."""
        deadline = time.monotonic() + (self.settings.publish_timeout_s if timeout is None else timeout)
        return Attempts(self, deadline, failure)

    def connection_lost(self) -> None:
        """Tell the keeper the connection is unusable (a heartbeat miss may not have closed it yet)."""
        if self._connection is not None and not self._connection.is_closed:
            asyncio.get_running_loop().create_task(self._connection.close())

    async def _connect_once(self) -> aio_pika.abc.AbstractConnection:
        url = next(self._urls)
        try:
            connection = await aio_pika.connect(
                # In the URL, not as a keyword: aio-pika 9 (the newest for Python 3.10) ignores the keyword.
                str(yarl.URL(encode_credentials(url)).update_query(heartbeat=self.settings.broker_heartbeat_s)),
                timeout=self.settings.broker_connect_timeout_s,
                ssl_context=ssl_context(self.settings),
                client_properties={"connection_name": self.name},
            )
        except Exception as exc:
            self.last_error = f"{mask_url(url)}: {_describe(exc)}"
            log.log(self._warning_level, "cannot connect to %s%s", self.last_error, _hint(exc, url))
            raise BrokerConnectionError(self.last_error) from exc
        _detect_stalls_after_two_heartbeats(connection, self.settings.broker_heartbeat_s)
        _give_a_reason_to_reasonless_closes(connection)
        return connection

    async def _keep_connected(self) -> None:
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.1, max=self.settings.broker_reconnect_max_s) + wait_random(0, 0.1),
            retry=retry_if_exception_type(BrokerConnectionError),
        )
        while not self._closing:
            async for attempt in retrying:
                with attempt:
                    connection = await self._connect_once()
            lost = self._gone = asyncio.Event()
            connection.close_callbacks.add(lambda *_, event=lost: event.set())
            if connection.is_closed:
                # Closed before the callback was in place (a node shutting down accepts, then closes):
                # the callback will never fire, so don't wait for it.
                lost.set()
            self._connection = connection
            self.generation += 1
            self._ready.set()
            if self.generation > 1:
                log.info("%s reconnected (generation %d)", self.name, self.generation)
                # Listeners run beside the keeper, not inside it: one that needs a channel (the result
                # consumer) would otherwise wait, up to its timeout, for a reconnect that only the
                # keeper can make if this connection dies too.
                for listener in list(self._listeners):
                    task = asyncio.ensure_future(listener(self.generation))
                    self._listener_tasks.add(task)
                    task.add_done_callback(self._listener_done)
            await lost.wait()
            self._ready.clear()
            if not self._closing:
                log.log(self._warning_level, "%s lost its broker connection; reconnecting", self.name)

    def _listener_done(self, task: asyncio.Future[None]) -> None:
        self._listener_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("reconnect listener failed", exc_info=task.exception())

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closing = True
        for task in list(self._listener_tasks):
            task.cancel()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        if self._connection is not None and not self._connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5.0)
        self._ready.clear()


async def close_quietly(channel: AbstractChannel) -> None:
    """Close ``channel`` unless it is closed already; a failure to close is not worth more than nothing."""
    if not channel.is_closed:
        with contextlib.suppress(*SETTLE_ERRORS):
            await channel.close()


def raise_if_cancelled(exc: asyncio.CancelledError) -> None:
    """Re-raise ``exc`` if the running task was really cancelled; return if it only reports a dead connection.

    When aiormq finds a connection stuck (no heartbeat), it cancels the connection's reader and then
    fails every pending confirm and RPC of the connection with that CancelledError, as if each
    caller had been cancelled. Letting it through would cancel a send for good, end a worker's
    consumer loop or the reconnecting keeper. A real cancellation of the running task is counted
    by ``Task.cancelling()`` (Python 3.11+); on 3.10, which cannot tell the two apart, every
    CancelledError stays a cancellation.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is None or cancelling() > 0:
        raise exc


#: Where aiormq keeps how long a connection may stay silent before it is given up (a name-mangled attribute).
_AIORMQ_GRACE = "_Connection__heartbeat_grace_timeout"


class Attempts:
    """One operation's tries against the broker until a deadline: what to wait for after each lost one.

    A lost connection is handed to the keeper and the next try waits for the new one. A refusal the
    broker sends by closing the connection (``CONNECTION_REFUSALS``: a quorum queue without a live
    member, say) is tried again only after a pause that doubles each time, since every try closes the
    connection, and with it every channel of the process (a worker's task consumers too).
    """

    def __init__(self, broker: Broker, deadline: float, failure: str) -> None:
        self.broker = broker
        self.deadline = deadline
        self.failure = failure
        self._refusal_pause = REFUSAL_PAUSE_S

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once it has passed)."""
        return max(0.0, self.deadline - time.monotonic())

    async def after(self, lost: BaseException) -> None:
        """After ``lost`` cut a try short: raise ``failure`` past the deadline, else wait for the next try."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerConnectionError(f"{self.failure}: {_describe(lost)}") from lost
        if isinstance(lost, CONNECTION_REFUSALS) or replica_starting(lost):
            pause = min(self._refusal_pause, remaining)
            log.warning("%s: the broker refused it (%s); trying again in %.1fs", self.failure, _describe(lost), pause)
            self._refusal_pause = min(2 * self._refusal_pause, REFUSAL_PAUSE_MAX_S)
            await asyncio.sleep(pause)
            return
        log.debug("%s (%s); trying again on a new connection", self.failure, _describe(lost))
        self.broker.connection_lost()
        await asyncio.sleep(0)  # let the keeper notice the close before the next channel is asked for


def _detect_stalls_after_two_heartbeats(connection: aio_pika.abc.AbstractConnection, heartbeat_s: int) -> None:
    """Give up on a connection that received nothing for two heartbeat intervals.

    A stalled peer (a black-holed route, a hung load balancer) closes nothing: only silence tells.
    aiormq's own detector waits 3 x (heartbeat + 1) s (93 s at the default 30 s, 9 s at 2 s), which is
    what delays reconnection, consumer recovery and every confirm waiting on that connection. AMQP and
    RabbitMQ's own rule is two missed heartbeats, and RabbitMQ sends one every heartbeat / 2 s, so a
    healthy connection is never silent that long. aiormq has no public knob for this; it reads the
    bound from this attribute each time it checks, so setting it keeps aiormq's own teardown of a
    stuck connection (transport aborted, no wait for the dead peer). If a future aiormq drops the
    attribute, its slower default applies (tests/test_faults_connection.py would say so).
    """
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    if heartbeat_s > 0 and underlay is not None and hasattr(underlay, _AIORMQ_GRACE):
        setattr(underlay, _AIORMQ_GRACE, 2 * heartbeat_s)


def _give_a_reason_to_reasonless_closes(connection: aio_pika.abc.AbstractConnection) -> None:
    """Fail what is pending on ``connection`` with a connection error when it closes without a reason.

    When the peer's FIN arrives while aiormq's reader is between two frames (a node shutting down, a
    proxy or load balancer closing the link, seen under load), the reader ends without an error and
    aiormq closes the connection with no reason. It then fails every pending confirm and RPC, and
    every one started later on that connection's channels, with a bare ``Exception()``, which nobody
    can tell from a bug. aiormq hands the reason to ``_cancel_tasks`` (aiormq 6 and 7); giving it a
    ``ConnectionClosed`` there makes such a loss what it is, a connection error that amqtask rides out.
    """
    underlay: Any = getattr(getattr(connection, "transport", None), "connection", None)
    fail_pending = getattr(underlay, "_cancel_tasks", None)
    if fail_pending is None:
        return

    def fail_pending_with_a_reason(exc: BaseException | None = None) -> Any:
        reason = exc if exc is not None else aiormq.exceptions.ConnectionClosed(320, "the broker closed the connection")
        return fail_pending(reason)

    underlay._cancel_tasks = fail_pending_with_a_reason


def _hint(exc: BaseException, url: str) -> str:
    """What to check when nothing answers at ``url`` (refused, unreachable, timed out; not TLS or login)."""
    code = exc.errno if isinstance(exc, OSError) else exc.args[0] if exc.args else None
    if isinstance(exc, asyncio.TimeoutError) or code in _NOBODY_THERE:
        return f"; is RabbitMQ running at {mask_url(url)}? set AMQTASK_BROKER_URL"
    return ""


#: Connect errors that mean no broker listens at the address (as opposed to TLS or login failures).
_NOBODY_THERE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT})


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = [
    "CONNECTION_ERRORS",
    "REFUSAL_PAUSE_MAX_S",
    "REFUSAL_PAUSE_S",
    "Attempts",
    "CONNECTION_REFUSALS",
    "RECOVERABLE_ERRORS",
    "SETTLE_ERRORS",
    "Broker",
    "raise_if_cancelled",
    "ssl_context",
]
