"""``inspect active_queues`` and ``inspect conf`` answered by an amqtask worker, asked by Celery's own client
(as Flower and ``celery inspect`` ask)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from celery import Celery
from support.workers import TESTS_DIR

from amqtask import App, Worker
from amqtask.remote.commands import visible_settings


def test_conf_shows_no_secrets() -> None:
    conf = App("conf", broker="amqp://user:pa55word@host//", signing_keys=["s3cret-key"]).conf.as_dict()
    shown = visible_settings(conf)
    assert "signing_keys" not in shown and "s3cret" not in str(shown) and "pa55word" not in str(shown)
    assert shown["broker_url"] == ["amqp://user:***@host//"]


@pytest.mark.broker
def test_celery_inspect_active_queues_and_conf(broker_url: str, unique: str) -> None:
    app = App("conf", broker=broker_url, task_default_queue=unique)
    hostname = f"{unique}@inspect"
    celery = Celery("asker", broker=broker_url)

    async def scenario() -> tuple[dict[str, list[dict[str, object]]], dict[str, dict[str, object]]]:
        worker = Worker(app, hostname=hostname)
        await worker.start()
        try:
            inspect = celery.control.inspect(timeout=10, destination=[hostname])
            return await asyncio.to_thread(inspect.active_queues), await asyncio.to_thread(inspect.conf)
        finally:
            await worker.stop(grace=5)

    queues, conf = asyncio.run(asyncio.wait_for(scenario(), 60))
    celery.close()
    (queue,) = queues[hostname]
    assert (queue["name"], queue["routing_key"], queue["durable"]) == (unique, unique, True)
    assert queue["queue_arguments"] == {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{unique}.dlq"}
    settings = conf[hostname]
    assert settings["task_default_queue"] == unique
    assert settings["broker_url"] == [broker_url.replace(":guest@", ":***@")]


@pytest.mark.broker
def test_amqtask_inspect_commands_show_queues_and_conf(broker_url: str, unique: str) -> None:
    app = App("conf", broker=broker_url, task_default_queue=unique)
    hostname = f"{unique}@cli"
    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": unique,
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def cli(*args: str) -> dict[str, object]:
        command = [sys.executable, "-m", "amqtask", "inspect", *args, "-A", "monitoring_tasks", "-d", hostname,
                   "-t", "10", "--json"]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    async def scenario() -> tuple[dict[str, object], dict[str, object]]:
        worker = Worker(app, hostname=hostname)
        await worker.start()
        try:
            return await asyncio.to_thread(cli, "active_queues"), await asyncio.to_thread(cli, "conf")
        finally:
            await worker.stop(grace=5)

    queues, conf = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert [q["name"] for q in queues[hostname]] == [unique]  # type: ignore[attr-defined]
    assert conf[hostname]["task_default_queue"] == unique  # type: ignore[index]
