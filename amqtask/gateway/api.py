"""The gateway's routes: send (``POST /tasks/{name}``), read (``GET /tasks/{id}``), revoke, health, OpenAPI.

Every answer is JSON; every refusal is ``{"error": message}`` with its status code. Messages never carry
a credential: a bearer token is never repeated, and broker errors are masked as the CLI masks them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import protocol
from ..app import App
from ..errors import AmqtaskError, BrokerConnectionError, PublishError, TimeoutError
from ..failures import decode_exception
from ..results import AsyncResult
from ..results.reporting import backend_of
from ..urls import mask_text
from .auth import authorized, load_tokens
from .openapi import document, queue_names
from .requests import HTTPError, parse_send, read_json

MAX_ID = 255
log = logging.getLogger("amqtask.gateway")


class Gateway:
    """The request handlers, bound to one :class:`~amqtask.App`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.tokens = load_tokens(app.conf)
        self.openapi = document(app)
        self.queues = frozenset(queue_names(app))

    def allowed(self, name: str) -> bool:
        allow = self.app.conf.gateway_allow
        return name in allow if allow is not None else name in self.app.tasks

    def check(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization"), self.tokens):
            raise HTTPError(401, "a valid bearer token is required")

    async def send(self, request: Request) -> JSONResponse:
        self.check(request)
        name = request.path_params["name"]
        if not self.allowed(name):
            raise HTTPError(404, "no such task (not registered, or not allowed through the gateway)")
        conf = self.app.conf
        body = await read_json(request, conf.gateway_max_body_bytes, conf.gateway_max_json_depth)
        sent = parse_send(body, self.queues)
        result = await self.app.asend_task(name, sent.args, sent.kwargs, **sent.options)
        return JSONResponse({"id": result.id}, status_code=202, headers={"location": f"/tasks/{result.id}"})

    async def read(self, request: Request) -> JSONResponse:
        self.check(request)
        task_id = _task_id(request)
        if backend_of(self.app, None) != "amqp":
            raise HTTPError(501, "reading results by id needs result_backend='amqp' in the gateway's app")
        wait_s = _wait(request, self.app.conf.gateway_max_wait_s)
        result: AsyncResult[Any] = AsyncResult(task_id, self.app)
        await result.arefresh()
        if wait_s:
            # Long poll: woken by the result's arrival in the stream, not by asking the broker again.
            with contextlib.suppress(TimeoutError):
                await self.app.result_store.wait(task_id, wait_s)
        report = self.app.result_store.get(task_id)
        if report is None and self.app.conf.result_track_sent:
            # Sent tasks are announced: nothing at all means never sent (or expired, or forgotten).
            raise HTTPError(404, "no such task known (never sent with amqp results, expired or forgotten)")
        return JSONResponse(describe(task_id, report))

    async def revoke(self, request: Request) -> JSONResponse:
        self.check(request)
        task_id = _task_id(request)
        await self.app.control.arevoke(task_id)
        return JSONResponse({"id": task_id, "revoked": True}, status_code=202)

    async def health(self, request: Request) -> JSONResponse:
        try:
            await self.app.runtime().broker.connection(timeout=5)
        except BrokerConnectionError:
            return JSONResponse({"status": "unavailable", "broker": False}, status_code=503)
        return JSONResponse({"status": "ok", "broker": True})

    async def schema(self, request: Request) -> JSONResponse:
        return JSONResponse(self.openapi)


def describe(task_id: str, report: protocol.ResultMessage | None) -> dict[str, Any]:
    """The JSON view of a task's latest state."""
    if report is None:
        return {"id": task_id, "state": protocol.PENDING, "result": None, "meta": None}
    if report.status in (protocol.FAILURE, protocol.REVOKED):
        error = decode_exception(report.result, report.traceback)
        shown = {"type": type(error).__name__, "message": str(error), "traceback": report.traceback}
        return {"id": task_id, "state": report.status, "meta": None, "error": shown}
    if report.status == protocol.SUCCESS:
        return {"id": task_id, "state": report.status, "result": report.result, "meta": None}
    return {"id": task_id, "state": report.status, "result": None, "meta": report.result}


def _task_id(request: Request) -> str:
    task_id: str = request.path_params["task_id"]
    if not 0 < len(task_id) <= MAX_ID:
        raise HTTPError(422, f"a task id has 1 to {MAX_ID} characters")
    return task_id


def _wait(request: Request, most_s: float) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        wait_s = float(raw)
    except ValueError:
        raise HTTPError(422, "wait must be a number of seconds") from None
    if not 0 <= wait_s <= most_s:
        raise HTTPError(422, f"wait must be between 0 and {most_s:g} seconds")
    return wait_s


def build(app: App) -> Starlette:
    """The Starlette application serving ``app``."""
    gateway = Gateway(app)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, HTTPError):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        # A timeout: the broker did not confirm a send, or a first read of the stream's history is still
        # under way (it goes on in the background; a retry finds it read).
        status = 503 if isinstance(exc, BrokerConnectionError | PublishError | TimeoutError) else 400
        return JSONResponse({"error": mask_text(f"{type(exc).__name__}: {exc}", app.conf.broker_url)}, status)

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "status_code", 404)
        return JSONResponse({"error": "no such route" if code == 404 else "method not allowed"}, status_code=code)

    routes = [
        Route("/tasks/{name}", gateway.send, methods=["POST"]),
        Route("/tasks/{task_id}", gateway.read, methods=["GET"]),
        Route("/tasks/{task_id}", gateway.revoke, methods=["DELETE"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/openapi.json", gateway.schema, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {HTTPError: refused, AmqtaskError: refused, 404: not_found, 405: not_found,
                                Exception: crashed}  # fmt: skip
    return Starlette(routes=routes, exception_handlers=handlers)


__all__ = ["Gateway", "build", "describe"]
