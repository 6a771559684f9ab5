"""OpenTelemetry traces (``amqtask[otel]``), read back with the SDK's in-memory exporter: the producer's publish
span and the worker's process span share a trace, across a chain too, and a failure is recorded."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.queues import cleanup, eventually
from support.workers import running_worker

from amqtask import App, RemoteTaskError, chain
from amqtask.monitoring.tracing import TracingMiddleware, instrument
from amqtask.signing import SigningMiddleware


def _traced_app(broker_url: str, queue: str) -> tuple[App, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App("traced", broker=broker_url, task_default_queue=queue)
    instrument(app, provider)
    tracer = provider.get_tracer("tasks")

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        with tracer.start_as_current_span("inside add"):  # the task's own span: a child of "process add"
            return x + y

    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("no luck")

    return app, exporter


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_tracing_goes_before_signing_and_is_not_imported_by_default() -> None:
    app = App("order")
    instrument(app)
    kinds = [type(m) for m in app.middleware]
    assert kinds.index(TracingMiddleware) == kinds.index(SigningMiddleware) - 1
    # The core never imports OpenTelemetry: an app and a worker load without it.
    code = "import sys, amqtask, amqtask.worker, amqtask.cli; sys.exit('opentelemetry' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.broker
def test_publish_and_process_spans_share_the_trace_and_failures_are_recorded(broker_url: str, unique: str) -> None:
    app, exporter = _traced_app(broker_url, unique)

    async def scenario() -> None:
        async with running_worker(app):
            assert await (await app.tasks["add"].adelay(2, 3)).aget(timeout=30) == 5
            with pytest.raises(RemoteTaskError):
                await (await app.tasks["boom"].adelay()).aget(timeout=30)

            async def all_ended() -> bool:
                return len(_spans(exporter, "process add")) == 1 and len(_spans(exporter, "process boom")) == 1

            await eventually(all_ended, what="the process spans")

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        asyncio.run(cleanup(app, [unique]))
    (publish,) = _spans(exporter, "publish add")
    (process,) = _spans(exporter, "process add")
    (inner,) = _spans(exporter, "inside add")
    assert publish.kind == trace.SpanKind.PRODUCER and process.kind == trace.SpanKind.CONSUMER
    assert publish.context is not None and process.context is not None and inner.context is not None
    assert process.context.trace_id == publish.context.trace_id == inner.context.trace_id
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert inner.parent is not None and inner.parent.span_id == process.context.span_id
    assert publish.attributes is not None and process.attributes is not None
    assert publish.attributes["messaging.system"] == process.attributes["messaging.system"] == "rabbitmq"
    assert publish.attributes["messaging.operation.name"] == "publish"
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["messaging.destination.name"] == unique
    assert process.status.status_code == trace.StatusCode.UNSET

    (failed,) = _spans(exporter, "process boom")
    (boom_publish,) = _spans(exporter, "publish boom")
    assert failed.context is not None and boom_publish.context is not None
    assert failed.context.trace_id == boom_publish.context.trace_id != publish.context.trace_id
    assert failed.status.status_code == trace.StatusCode.ERROR
    (event,) = [e for e in failed.events if e.name == "exception"]
    assert event.attributes is not None and event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "no luck"


@pytest.mark.broker
def test_every_step_of_a_chain_is_in_the_callers_trace(broker_url: str, unique: str) -> None:
    app, exporter = _traced_app(broker_url, unique)
    add = app.tasks["add"]

    async def scenario() -> int:
        async with running_worker(app):
            result = await chain(add.s(1, 2), add.s(10), add.s(100)).aapply_async()
            value = await result.aget(timeout=30)

            async def three_ended() -> bool:
                return len(_spans(exporter, "process add")) == 3

            await eventually(three_ended, what="three process spans")
            return value  # type: ignore[no-any-return]

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 60)) == 113
    finally:
        asyncio.run(cleanup(app, [unique]))
    publishes, processes = _spans(exporter, "publish add"), _spans(exporter, "process add")
    assert len(publishes) == 3
    assert len({span.context.trace_id for span in publishes + processes if span.context is not None}) == 1
    # Each later step is published from inside the previous step's process span, and processed under it.
    by_id = {span.context.span_id: span for span in publishes + processes if span.context is not None}
    for process in processes:
        assert process.parent is not None and by_id[process.parent.span_id].name == "publish add"
    parents = sorted(by_id[p.parent.span_id].name for p in publishes if p.parent is not None)
    assert parents == ["process add", "process add"]
