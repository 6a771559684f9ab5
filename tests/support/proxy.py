"""A TCP proxy on loopback for fault tests: forwards client <-> broker, and can cut or stall the links.

It runs on an event loop in a thread of its own, so synchronous tests, in-process workers on other
loops and worker subprocesses can all connect through it. :meth:`FaultProxy.drop` resets every open
link at once (RST on both sides, what a crashed router or a killed load balancer looks like).
:meth:`FaultProxy.stall` stops forwarding on the open links but keeps their sockets open: neither
side sees a close, which is a network black hole only heartbeats can detect; :meth:`FaultProxy.hold_replies`
does the same to the broker's side only, so what clients send still arrives. Links opened after a
stall forward normally, so a client that notices the stall can reconnect through the proxy;
:meth:`FaultProxy.resume` lets the stalled links flow again. :meth:`FaultProxy.close_links` ends every
link with an orderly FIN both ways, what a node shutting down or a load balancer draining looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 64 * 1024


class _Link:
    """One proxied connection: the client's socket, the broker's, and whether bytes may flow."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)
        self.to_broker, self.to_client = asyncio.Event(), asyncio.Event()
        self.to_broker.set()
        self.to_client.set()
        self.pumps: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """Close both sockets with RST (SO_LINGER 0) rather than an orderly FIN."""
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for pump in self.pumps:
            pump.cancel()

    def close(self) -> None:
        """Stop forwarding and close both sockets with an orderly FIN."""
        for pump in self.pumps:
            pump.cancel()
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.close()


class FaultProxy:
    """``FaultProxy(host, port)``: listen on 127.0.0.1 (a free port) and forward to ``host:port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        #: Bytes forwarded from clients to the broker so far: tells a test that a client's request went out.
        self.bytes_to_broker = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        """A proxy in front of the broker of an ``amqp://`` URL."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5672)

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        """Start listening; returns once the port is bound."""
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        """Stop listening, reset every link and stop the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def url(self, broker_url: str) -> str:
        """``broker_url`` rewritten to go through the proxy (credentials, vhost and query kept)."""
        parts = urlsplit(broker_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # ------------------------------------------------------------------------------------------ faults
    @property
    def open_links(self) -> int:
        """Links currently open (stalled or not)."""
        return len(self._links)

    def drop(self) -> int:
        """Reset every open link (RST both ways); returns how many were cut."""
        return int(self._call(self._end_links(_Link.reset)))

    def stall(self) -> int:
        """Stop forwarding on every open link, keeping its sockets open; returns how many were stalled."""
        return int(self._call(self._set_flowing(False, both_ways=True)))

    def hold_replies(self) -> int:
        """Stop forwarding what the broker sends on every open link (clients' frames still arrive)."""
        return int(self._call(self._set_flowing(False, both_ways=False)))

    def resume(self) -> int:
        """Let stalled links forward again; returns how many were resumed."""
        return int(self._call(self._set_flowing(True, both_ways=True)))

    def close_links(self) -> int:
        """Close every open link in an orderly way (FIN both ways); returns how many were closed."""
        return int(self._call(self._end_links(_Link.close)))

    # ------------------------------------------------------------------------------------------ inside the loop
    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._end_links(_Link.reset)
        # Let each connection's handler see its pumps end and close its sockets before the loop stops.
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5)

    async def _end_links(self, end: Callable[[_Link], None]) -> int:
        links = list(self._links)
        for link in links:
            end(link)
        self._links.clear()
        return len(links)

    async def _set_flowing(self, flowing: bool, *, both_ways: bool) -> int:
        for link in self._links:
            for direction in (link.to_broker, link.to_client) if both_ways else (link.to_client,):
                if flowing:
                    direction.set()
                else:
                    direction.clear()
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(link.to_broker, reader, up_writer, self._count_to_broker)),
            asyncio.create_task(self._pump(link.to_client, up_reader, writer, None)),
        ]
        await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        # One side closed (not a stall, not a drop): close the other side in an orderly way.
        link.close()
        self._links.discard(link)

    def _count_to_broker(self, size: int) -> None:
        self.bytes_to_broker += size

    @staticmethod
    async def _pump(
        flowing: asyncio.Event,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        count: Callable[[int], None] | None,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                # A stalled link reads nothing more, so the peers' TCP windows fill up as on a dead path.
                await flowing.wait()
                data = await source.read(_CHUNK)
                if not data:
                    return
                await flowing.wait()
                sink.write(data)
                if count is not None:
                    count(len(data))
                await sink.drain()
