"""The process's result store is bounded by bytes and age, not only by count (issue 11, item 5).

Replies arrive from a real worker over the real reply queue: a process that sends tasks and never asks
for their results keeps at most ``result_store_max_bytes`` of them, and none older than ``result_expires_s``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.workers import wait_for, worker_thread

from amqtask import App
from amqtask.results import ResultStore

pytestmark = pytest.mark.broker

BIG = 64 * 1024


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(
        f"store-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", result_store_max_bytes=4 * BIG
    )
    yield application
    application.close()


def test_unread_results_are_bounded_by_bytes(app: App) -> None:
    @app.task(name="t.big")
    def big(i: int) -> str:
        return str(i) * BIG

    with worker_thread(app, concurrency=2):
        sent = [big.delay(i % 10) for i in range(20)]
        last = sent[-1]
        assert last.get(timeout=30) == "9" * BIG
        wait_for(lambda: all(r.state != "PENDING" for r in sent[-3:]), what="the last replies")
    store = app.result_store
    assert store.size_bytes <= 4 * BIG
    assert 1 <= len(store) <= 4  # each reply is a little over BIG bytes
    assert sent[0].state == "PENDING"  # the oldest were dropped, not the newest
    assert last.result == "9" * BIG


def test_results_nobody_waits_for_expire(app: App) -> None:
    now = [0.0]
    app.result_store = ResultStore(ttl_s=60, clock=lambda: now[0])

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    with worker_thread(app):
        early = add.delay(1, 1)
        assert early.get(timeout=30) == 2
        now[0] = 59.0
        later = add.delay(2, 2)
        assert later.get(timeout=30) == 4
    assert early.state == "SUCCESS"
    now[0] = 61.0  # `early` arrived at 0, `later` at 59: only `early` is older than the TTL
    assert early.state == "PENDING" and early.result is None
    assert later.result == 4
    assert len(app.result_store) == 1
