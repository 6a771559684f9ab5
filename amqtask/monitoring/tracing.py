"""OpenTelemetry traces (``pip install 'amqtask[otel]'``), turned on by :func:`instrument`.

The producer's ``publish`` span puts its W3C ``traceparent`` (and ``tracestate``) in the message headers;
the worker's ``process`` span continues that trace, so a call, its retries and every step of a chain
(published from inside the previous step's ``process`` span) share one trace id. Spans follow
OpenTelemetry's messaging conventions (``messaging.system`` = ``rabbitmq``, operation ``publish`` /
``process``); a final failure is recorded on the ``process`` span as an exception with status ERROR.
While a task runs, its span is the current one, so spans the task's code starts are its children.

Nothing here is imported unless :func:`instrument` is called; without the package it raises
:class:`~amqtask.errors.ConfigurationError` saying what to install. A malformed ``traceparent`` in a
message is ignored (a new trace starts), as the W3C propagator does.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..middleware import Middleware, current_queue
from ..remote.wire import header_text
from ..signing import SigningMiddleware

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.context import Context
except ImportError:
    raise ConfigurationError(
        "traces need OpenTelemetry: pip install 'amqtask[otel]' (or opentelemetry-api and an SDK)"
    ) from None

if TYPE_CHECKING:
    from ..app import App
    from ..errors import Reject, Retry
    from ..protocol import ResultMessage, TaskMessage, WireMessage
    from ..routing import Route
    from ..worker.worker import Worker

#: The headers the W3C trace-context propagator reads and writes.
TRACE_HEADERS = ("traceparent", "tracestate")
#: The span of the publish under way and the ``process`` span of the delivery being handled (with the
#: token that made it current). Context variables: each send and each delivery has its own.
_publishing: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar("amqtask_publish_span", default=None)
_processing: contextvars.ContextVar[tuple[trace.Span, contextvars.Token[Context]] | None] = contextvars.ContextVar(
    "amqtask_process_span", default=None
)


def instrument(app: App, tracer_provider: trace.TracerProvider | None = None) -> TracingMiddleware:
    """Trace ``app``'s sends and the tasks its workers run; returns the middleware it added.

    It goes before message signing, which must sign the headers it writes.
    """
    middleware = TracingMiddleware(tracer_provider)
    signing = next((i for i, m in enumerate(app.middleware) if isinstance(m, SigningMiddleware)), len(app.middleware))
    app.middleware.insert(signing, middleware)
    return middleware


class TracingMiddleware(Middleware):
    """``publish`` spans around sends, ``process`` spans around deliveries, linked by ``traceparent``."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        from .. import __version__

        self.tracer = trace.get_tracer("amqtask", __version__, tracer_provider=tracer_provider)

    # ------------------------------------------------------------------------------------------ producer
    async def before_publish(self, app: App, message: TaskMessage, wire: WireMessage) -> None:
        span = self.tracer.start_span(
            f"publish {message.task}",
            kind=trace.SpanKind.PRODUCER,
            attributes=_attributes(message, "publish", "send"),
        )
        _publishing.set(span)
        propagate.inject(wire.headers, context=trace.set_span_in_context(span))

    async def after_publish(self, app: App, message: TaskMessage, route: Route) -> None:
        span = _publishing.get()
        if span is None:
            return
        _publishing.set(None)
        # RabbitMQ's destination is the exchange; OpenTelemetry names the default one "amq.default".
        span.set_attribute("messaging.destination.name", route.exchange or "amq.default")
        span.set_attribute("messaging.rabbitmq.destination.routing_key", route.routing_key)
        span.end()

    # ------------------------------------------------------------------------------------------ worker
    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        carrier = {name: header_text(wire.headers.get(name)) or "" for name in TRACE_HEADERS}
        parent = propagate.extract({name: value for name, value in carrier.items() if value})
        attributes = _attributes(message, "process", "process")
        attributes["messaging.destination.name"] = current_queue.get() or ""
        attributes["messaging.client.id"] = worker.hostname
        span = self.tracer.start_span(
            f"process {message.task}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
        )
        _processing.set((span, context.attach(trace.set_span_in_context(span))))

    async def after_success(self, worker: Worker, message: TaskMessage, value: Any, report: ResultMessage) -> None:
        self._outcome("succeeded")

    async def after_failure(
        self, worker: Worker, message: TaskMessage, exc: BaseException, report: ResultMessage
    ) -> None:
        span = self._outcome("failed")
        if span is not None:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    async def on_retry(self, worker: Worker, message: TaskMessage, retry: Retry) -> None:
        span = self._outcome("retried")
        if span is not None and retry.exc is not None:
            span.record_exception(retry.exc)

    async def after_reject(self, worker: Worker, message: TaskMessage, reject: Reject) -> None:
        self._outcome("rejected")

    async def after_delivery(self, worker: Worker) -> None:
        current = _processing.get()
        if current is None:
            return
        span, token = current
        _processing.set(None)
        context.detach(token)
        span.end()

    def _outcome(self, outcome: str) -> trace.Span | None:
        current = _processing.get()
        if current is None:
            return None
        current[0].set_attribute("amqtask.task.outcome", outcome)
        return current[0]


def _attributes(message: TaskMessage, operation: str, kind: str) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": operation,
        "messaging.operation.type": kind,
        "messaging.message.id": message.id,
        "amqtask.task.name": message.task,
        "amqtask.task.retries": message.retries,
    }


__all__ = ["TRACE_HEADERS", "TracingMiddleware", "instrument"]
