"""The command line as a user runs it: worker, call, topology apply, and their exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest
from support.queues import delete
from support.workers import TESTS_DIR, get_raw, queue_depth, stop_process, worker_process

from amqtask import App

pytestmark = pytest.mark.broker


def amqtask(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **env, "PYTHONPATH": str(TESTS_DIR)}
    return subprocess.run([sys.executable, "-m", "amqtask", *args], env=environment, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_call_waits_for_the_result_of_a_running_worker(broker_url: str, unique: str, tmp_path: Path) -> None:
    env = {"AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": f"q-{unique}"}
    worker = worker_process("core_tasks", broker_url, "-c", "2", env=env)
    try:
        done = amqtask("call", "-A", "core_tasks", "core.add", "--args", "[20, 22]", "--wait", env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == 42
    finally:
        stop_process(worker)


def test_burst_worker_drains_what_call_sent_and_exits(broker_url: str, unique: str) -> None:
    env = {"AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": f"q-{unique}"}
    sent = amqtask("call", "-A", "core_tasks", "core.add", "--args", "[1, 2]", env=env)
    assert sent.returncode == 0, sent.stderr
    assert len(sent.stdout.strip()) == 36  # the task id
    drained = amqtask("worker", "-A", "core_tasks", "--burst", "-l", "info", env=env)
    assert drained.returncode == 0, drained.stderr
    assert "consuming" in drained.stderr


def test_topology_apply_declares_the_queues(broker_url: str, unique: str) -> None:
    env = {"AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": f"q-{unique}"}
    applied = amqtask("topology", "apply", "-A", "core_tasks", env=env)
    assert applied.returncode == 0, applied.stderr
    assert f"declared queue q-{unique}" in applied.stdout


def test_bad_arguments_and_settings_exit_2_with_a_clear_message(broker_url: str) -> None:
    env = {"AMQTASK_BROKER_URL": broker_url}
    not_json = amqtask("call", "-A", "core_tasks", "core.add", "--args", "[1,", env=env)
    assert not_json.returncode == 2 and "not JSON" in not_json.stderr
    bad_setting = amqtask("call", "-A", "core_tasks", "core.add", env={**env, "AMQTASK_WORKER_CONCURENCY": "4"})
    assert bad_setting.returncode == 2 and "worker_concurrency" in bad_setting.stderr


def test_unreachable_broker_exits_3_without_the_password() -> None:
    env = {"AMQTASK_BROKER_URL": "amqp://guest:hunter2@127.0.0.1:1//", "AMQTASK_PUBLISH_TIMEOUT_S": "1",
           "AMQTASK_BROKER_CONNECT_TIMEOUT_S": "0.2"}  # fmt: skip
    failed = amqtask("call", "-A", "core_tasks", "core.add", "--args", "[1, 2]", env=env)
    assert failed.returncode == 3, failed.stderr
    assert "hunter2" not in failed.stderr + failed.stdout


def test_call_to_a_routing_key_no_queue_is_bound_to_exits_3_saying_so(broker_url: str, unique: str) -> None:
    sent = amqtask("call", "core.add", "--exchange", "amq.direct", "--routing-key", f"nowhere-{unique}",
                   env={"AMQTASK_BROKER_URL": broker_url})  # fmt: skip
    assert (sent.returncode, sent.stdout) == (3, ""), sent.stderr
    assert sent.stderr == (
        f"error: UnroutableError: no queue is bound to exchange 'amq.direct' for routing key 'nowhere-{unique}'; "
        "the message was returned by the broker, not delivered\n"
    )


def test_check_reports_health(broker_url: str, unique: str) -> None:
    env = {"AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": f"q-{unique}"}
    missing = amqtask("check", "-A", "core_tasks", env=env)
    assert missing.returncode == 3 and f"q-{unique}" in missing.stderr
    assert amqtask("topology", "apply", "-A", "core_tasks", env=env).returncode == 0
    healthy = amqtask("check", "-A", "core_tasks", env=env)
    assert healthy.returncode == 0 and healthy.stdout.strip() == "ok"


def test_call_needs_no_app_module_only_the_broker_url(broker_url: str, unique: str) -> None:
    env = {"AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": f"q-{unique}"}
    worker = worker_process("core_tasks", broker_url, env=env)
    try:
        done = amqtask("call", "core.add", "--args", "[2, 3]", "--wait", env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == 5
    finally:
        stop_process(worker)


def test_call_options_reach_the_message(broker_url: str, unique: str) -> None:
    queue = f"q-{unique}"
    env = {"AMQTASK_BROKER_URL": broker_url}
    eta, expires = "2030-01-31T09:00:00+00:00", "2030-02-01T00:00:00Z"
    # An eta far ahead goes through the delay levels: check the options on an exchange route instead.
    sent = amqtask("call", "core.add", "--args", "[1, 2]", "--exchange", "", "--routing-key", queue,
                   "--serializer", "json", "--expires", expires, "--priority", "3", env=env)  # fmt: skip
    assert sent.returncode == 3 and "not delivered" in sent.stderr, "no queue for the key: returned, not lost"
    asyncio.run(declare(broker_url, queue))
    sent = amqtask("call", "core.add", "--args", "[1, 2]", "--exchange", "", "--routing-key", queue,
                   "--serializer", "json", "--expires", expires, "--priority", "3", env=env)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    message = asyncio.run(get_raw(broker_url, queue))
    assert message.content_type == "application/json"
    assert message.priority == 3
    assert message.headers["id"] == sent.stdout.strip()
    assert message.headers["expires"] == "2030-02-01T00:00:00+00:00"
    delayed = amqtask("call", "core.add", "--queue", queue, "--eta", eta, env=env)
    assert delayed.returncode == 0, delayed.stderr
    bad = amqtask("call", "core.add", "--eta", "next tuesday", env=env)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
    asyncio.run(delete_queues(broker_url, queue))


def test_purge_empties_a_queue_and_refuses_a_missing_one(broker_url: str, unique: str) -> None:
    queue = f"q-{unique}"
    env = {"AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": queue}
    for _ in range(2):
        assert amqtask("call", "core.add", "--args", "[1, 2]", env=env).returncode == 0
    purged = amqtask("purge", queue, "--yes", env=env)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"purged 2 message(s) from {queue}\n"
    assert asyncio.run(queue_depth(broker_url, queue)) == 0
    missing = amqtask("purge", f"{queue}-nope", "-f", env=env)
    assert missing.returncode == 2 and f"{queue}-nope" in missing.stderr, missing.stderr
    asyncio.run(delete_queues(broker_url, queue))


async def declare(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        await (await connection.channel()).declare_queue(queue, durable=True)


async def delete_queues(url: str, queue: str) -> None:
    app = App("cli-test-cleanup", broker=url)
    try:
        await delete(app, [queue])
    finally:
        await app.aclose()
