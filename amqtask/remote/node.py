"""The worker's side of remote control: its mailbox queue, which requests are for it, and the replies.

Each running worker gets a :class:`ControlNode` that consumes ``<hostname>.celery.pidbox`` (see
:mod:`amqtask.remote.wire`) on a channel of its own, so a failing reply never stops the task
consumers, and the other way round. The commands it answers are :mod:`amqtask.remote.commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .. import serializers
from ..connection import RECOVERABLE_ERRORS, SETTLE_ERRORS
from ..errors import AmqtaskError, SerializationError
from ..producer import to_amqp
from . import wire
from .commands import Commands

if TYPE_CHECKING:
    from ..protocol import TaskMessage
    from ..worker.worker import Worker

log = logging.getLogger("amqtask.control")

#: Failures that end one attempt to consume or reply, but not remote control.
_TRANSIENT: tuple[type[BaseException], ...] = (*RECOVERABLE_ERRORS, AmqtaskError)
#: How long a starting worker waits for its control consumer before it gets on with the tasks.
CONTROL_READY_WAIT_S = 5.0
#: Requests in flight at once: a flood waits in the broker, not in the worker's memory.
CONTROL_PREFETCH = 8
#: A request is a method and a few arguments (a revoke of ~1,500 ids fits); nothing bigger is decoded.
MAX_REQUEST_BYTES = 64 * 1024
#: The longest ``glob`` pattern a request may address workers with.
MAX_PATTERN_LENGTH = 256
#: The most a ``reply_to`` routing key may hold (an AMQP short string).
MAX_ROUTING_KEY_BYTES = 255


def glob_match(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` with ``*`` (any run) and ``?`` (one character); the rest is literal.

    Two indices and the last ``*`` to fall back to: at most ``len(pattern) * len(name)`` steps, no
    regex engine and no recursion, so no pattern can make it backtrack for long.
    """
    p = n = 0
    star, mark = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] in ("?", name[n]):
            p, n = p + 1, n + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, n, p + 1
        elif star >= 0:
            mark += 1
            p, n = star + 1, mark
        else:
            return False
    return all(char == "*" for char in pattern[p:])


def _matches(hostname: str, body: dict[str, Any], complain: Callable[..., None] = log.warning) -> bool:
    """Whether a request is addressed to ``hostname``: kombu's ``destination`` / ``pattern`` rules.

    Only ``glob`` patterns are matched. ``pcre`` ones, regular expressions from the wire, are refused:
    one backtracking pattern would hold the event loop (heartbeats, every task) for as long as it runs.
    """
    destination = body.get("destination")
    if destination:
        return isinstance(destination, list | tuple) and hostname in destination
    pattern, matcher = body.get("pattern"), body.get("matcher")
    if pattern and matcher:
        if matcher == "glob" and isinstance(pattern, str) and len(pattern) <= MAX_PATTERN_LENGTH:
            return glob_match(pattern, hostname)
        complain(
            "control request ignored: only glob patterns of up to %d characters are matched, got %.20r %.80r",
            MAX_PATTERN_LENGTH,
            matcher,
            pattern,
        )
        return False
    return True


class ControlNode:
    """One worker's mailbox: consumes its request queue, runs commands, publishes replies."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.hostname = worker.hostname
        self.clock = wire.LamportClock()
        self.commands = Commands(worker, self.clock)
        conf = worker.app.conf
        self._reader = wire.Reader(
            self.clock,
            serializers.normalize_accept(conf.accept_content),
            dataclasses.replace(serializers.CONTROL_LIMITS, max_bytes=MAX_REQUEST_BYTES),
            "control request",
            conf.signing_keys,
        )
        self._ready = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._replies: AbstractChannel | None = None
        self._reply_declared = False
        self._complained: set[str] = set()

    # ------------------------------------------------------------------------------------------ consuming
    async def start(self, timeout: float) -> None:
        """Start consuming; wait (up to ``timeout``) until requests arrive, or it is clear they cannot."""
        self._serving = asyncio.create_task(self._serve(), name=f"amqtask-control-{self.hostname}")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("remote control for %s is not ready after %.1fs; still trying", self.hostname, timeout)

    async def stop(self) -> None:
        """Stop consuming and close the node's channels (the exclusive queue goes with them)."""
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
        if self._replies is not None and not self._replies.is_closed:
            with contextlib.suppress(*RECOVERABLE_ERRORS):
                await self._replies.close()

    async def _serve(self) -> None:
        """Consume until stopped, starting over after the channel or connection is lost."""
        failures = 0
        while True:
            interrupted = asyncio.Event()
            try:
                channel = await self._consume(interrupted)
            except aiormq.exceptions.ChannelLockedResource:
                log.error(
                    "another worker named %r already consumes %s; remote control is off for this worker "
                    "(give each worker its own hostname with -n)",
                    self.hostname,
                    wire.worker_queue_name(self.hostname),
                )
                self._ready.set()
                return
            except _TRANSIENT as exc:
                failures += 1
                log.warning("remote control for %s interrupted (%s); consuming again", self.hostname, exc)
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                continue
            failures = 0
            self._ready.set()
            try:
                await interrupted.wait()
            finally:
                if not channel.is_closed:
                    with contextlib.suppress(*RECOVERABLE_ERRORS):
                        await channel.close()

    async def _consume(self, interrupted: asyncio.Event) -> AbstractChannel:
        channel = await self.worker.runtime.broker.channel(confirms=False)
        try:
            channel.close_callbacks.add(lambda *_: interrupted.set())
            # aiormq drops a broker-sent basic.cancel (e.g. the queue was deleted) without a word.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda *_: interrupted.set())
            await wire.declare_exchange(channel, wire.EXCHANGE, ExchangeType.FANOUT)
            queue = await channel.declare_queue(
                wire.worker_queue_name(self.hostname),
                exclusive=True,
                auto_delete=True,
                arguments=wire.QUEUE_ARGUMENTS,
            )
            await queue.bind(wire.EXCHANGE, "")
            # Acked, with a bounded prefetch: the broker holds a flood of requests, not this process.
            await channel.set_qos(prefetch_count=CONTROL_PREFETCH)
            await queue.consume(self._on_request)
        except BaseException:
            if not channel.is_closed:
                with contextlib.suppress(*RECOVERABLE_ERRORS):
                    await channel.close()
            raise
        return channel

    # ------------------------------------------------------------------------------------------ requests
    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._answer(message)
        finally:
            # Acked whatever happened: a request is never redelivered, so none can loop.
            with contextlib.suppress(*SETTLE_ERRORS):
                await message.ack()

    async def _answer(self, message: AbstractIncomingMessage) -> None:
        request = wire.read(self._reader, message)
        if request is None:
            return
        body = request.body
        if not isinstance(body.get("method"), str):
            log.error("dropping a control request without a method: %.200r", body)
            return
        if not _matches(self.hostname, body, self._complain):
            return
        reply = self.commands.dispatch(body["method"], body.get("arguments"))
        reply_to = body.get("reply_to")
        if isinstance(reply_to, dict):
            # Answer in the request's encoding: a Celery client may accept nothing else.
            msgpack = request.content_type == serializers.MSGPACK_CONTENT_TYPE
            codec = serializers.MSGPACK if msgpack else serializers.JSON
            ticket = wire.header_text(body.get("ticket"))
            await self._reply(reply_to, ticket, {self.hostname: reply}, codec, request.reply_keys)

    async def _reply(
        self,
        reply_to: dict[str, Any],
        ticket: str | None,
        data: dict[str, Any],
        codec: serializers.Codec,
        keys: Sequence[str],
    ) -> None:
        exchange, routing_key = reply_to.get("exchange"), reply_to.get("routing_key")
        # Replies go to the mailbox reply exchange only (Celery's and amqtask's clients use nothing
        # else): a request must not make the worker declare exchanges or publish into task queues.
        if (
            exchange != wire.REPLY_EXCHANGE
            or not isinstance(routing_key, str)
            or len(routing_key.encode("utf-8", "surrogatepass")) > MAX_ROUTING_KEY_BYTES
        ):
            log.warning(
                "control request not answered: reply_to must name %s, got %.200r", wire.REPLY_EXCHANGE, reply_to
            )
            return
        headers = {"ticket": ticket, "clock": self.clock.forward()}
        try:
            out = wire.encode_message(data, headers, codec, reply=True, keys=keys)
        except SerializationError as exc:
            out = wire.encode_message({self.hostname: {"error": str(exc)}}, headers, codec, reply=True, keys=keys)
        try:
            channel = await self._reply_channel()
            if not self._reply_declared:
                # kombu declares the reply exchange before every reply; once per channel is enough.
                await wire.declare_exchange(channel, wire.REPLY_EXCHANGE, ExchangeType.DIRECT)
                self._reply_declared = True
            target = await channel.get_exchange(wire.REPLY_EXCHANGE, ensure=False)
            await target.publish(to_amqp(out), routing_key, mandatory=False)
        except _TRANSIENT as exc:
            log.warning("could not reply to a control request (%s)", exc)

    def _complain(self, message: str, *args: Any) -> None:
        """Log a refused request at WARNING the first time, then at DEBUG: a flood must not flood the log."""
        log.log(logging.DEBUG if message in self._complained else logging.WARNING, message, *args)
        self._complained.add(message)

    async def _reply_channel(self) -> AbstractChannel:
        if self._replies is None or self._replies.is_closed:
            self._replies = await self.worker.runtime.broker.channel(confirms=False)
            self._reply_declared = False
        return self._replies

    def check(self, msg: TaskMessage) -> None:
        """Before a task runs: raise :class:`~amqtask.errors.Revoked` if it was revoked; note its start."""
        self.commands.check(msg)


__all__ = ["CONTROL_READY_WAIT_S", "ControlNode"]
