"""The event_loop setting: worker and sync callers on uvloop (the optional extra), and a clear error without it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
from support.workers import running_worker

from amqtask import App, ConfigurationError, loops

pytestmark = pytest.mark.broker


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"loop-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", event_loop="uvloop")

    @application.task(name="loop.kind")
    def kind(x: int) -> str:
        # A plain task calling the sync API from its thread goes through the worker's (uvloop) loop.
        return f"{x}:{type(application.portal.loop).__module__.split('.')[0]}"

    yield application
    application.close()


def test_worker_and_sync_callers_run_on_uvloop(app: App) -> None:
    async def scenario() -> tuple[str, str]:
        async with running_worker(app, concurrency=2):
            result = await app.asend_task("loop.kind", (7,))
            return type(asyncio.get_running_loop()).__module__, await result.aget(timeout=30)

    worker_loop, answer = loops.run(scenario(), app.conf.event_loop)
    assert worker_loop.startswith("uvloop")
    assert answer == "7:uvloop"


def test_sync_client_portal_runs_on_uvloop(app: App) -> None:
    app.send_task("loop.kind", (1,))  # a sync send starts the portal's loop
    assert type(app.portal.loop).__module__.startswith("uvloop")


def test_uvloop_missing_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an environment without the extra looks like
    with pytest.raises(ConfigurationError, match=r"pip install 'amqtask\[uvloop\]'"):
        loops.loop_factory("uvloop")


def test_unknown_event_loop_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be one of asyncio, uvloop"):
        App("loop-bad", event_loop="trio")
