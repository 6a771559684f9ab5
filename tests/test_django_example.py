"""The Django example project (examples/django), run as a team would run it (issue 16).

A real worker, started with ``python manage.py amqtask worker``, serves the project's tasks from two
apps (found by ``autodiscover_tasks`` and ``CELERY_IMPORTS``, settings read with ``namespace="CELERY"``);
the project's view, run in this process with Django's test client on sqlite, enqueues with
``apply_async_on_commit``: sent on commit, never on rollback. The project's management command runs
the periodic cleanup, here and in the worker. ``DjangoTask`` closes the task thread's database
connections after each task.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from support.django_example import PROJECT, example_env, manage
from support.interop import delete_objects, depth
from support.workers import REPO_DIR, wait_for

from amqtask import AsyncResult

pytest.importorskip("django_celery_beat", reason="the example project needs the django-beat extra")

pytestmark = [pytest.mark.broker, pytest.mark.ecosystem]

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def project(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The example's environment (migrated, Django set up here), with a worker running."""
    env = example_env(broker_url)
    log = tmp_path_factory.mktemp("django-example") / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "amqtask", "worker", "-c", "2", "-l", "info"],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: "consuming" in log.read_text() or worker.poll() is not None, 60, "the Django worker")
        assert worker.poll() is None, log.read_text()
        yield {**env, "LOG": str(log)}
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
        delete_objects(broker_url, (env["EXAMPLE_QUEUE"], env["EXAMPLE_QUEUE"] + "-idle"))


@pytest.fixture(scope="module")
def django_here(project: dict[str, str]) -> Any:
    """The example's app, in this process (Django set up with the worker's database and queue)."""
    import proj

    yield proj.app
    proj.app.close()


def test_the_view_enqueues_on_commit_and_the_worker_processes_the_order(django_here: Any) -> None:
    from django.test import Client
    from orders.models import Order

    response = Client().post("/orders/", {"item": "book"})
    assert response.status_code == 202
    sent = response.json()
    assert AsyncResult(sent["task_id"], django_here).get(timeout=TIMEOUT) == sent["order"]
    assert Order.objects.get(id=sent["order"]).status == "processed"


def test_nothing_is_sent_when_the_transaction_rolls_back(django_here: Any, project: dict[str, str]) -> None:
    from django.db import transaction
    from orders.models import Order
    from orders.tasks import process_order

    idle = project["EXAMPLE_QUEUE"] + "-idle"  # no worker consumes it: what arrives stays there
    asyncio.run(_declare(project["CELERY_BROKER_URL"], idle))
    with pytest.raises(RuntimeError), transaction.atomic():
        order = Order.objects.create(item="never")
        process_order.apply_async_on_commit((order.id,), queue=idle)
        process_order.delay_on_commit(order.id)
        raise RuntimeError("roll back")
    with transaction.atomic():
        order = Order.objects.create(item="kept")
        process_order.apply_async_on_commit((order.id,), queue=idle, ignore_result=True)
        assert depth(project["CELERY_BROKER_URL"], idle) == 0  # not before the commit
    assert depth(project["CELERY_BROKER_URL"], idle) == 1  # the committed one only


async def _declare(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        await (await connection.channel()).declare_queue(queue, durable=True)


def test_tasks_of_both_apps_run_on_the_worker_and_the_command_runs_the_cleanup(
    django_here: Any, project: dict[str, str]
) -> None:
    # An unregistered task would come back as a failure: both apps' tasks are registered in the worker.
    assert django_here.send_task("reports.cleanup", kwargs={"days": 0}).get(timeout=TIMEOUT) >= 0
    out = manage(project, "cleanup_orders", "--days", "0", "--in-background")
    assert out.startswith("deleted ") and out.endswith(" order(s)\n")


def test_a_task_closes_its_threads_database_connection(django_here: Any) -> None:
    from django.db import connection
    from reports.tasks import cleanup

    seen: dict[str, Any] = {}

    def in_a_worker_thread() -> None:
        cleanup(days=10_000)  # queries the database in this thread
        seen["open"] = connection.connection is not None

    thread = threading.Thread(target=in_a_worker_thread)
    thread.start()
    thread.join()
    assert seen == {"open": False}


def test_unchanged_celery_settings_are_read(django_here: Any, project: dict[str, str]) -> None:
    conf = django_here.conf
    assert conf.imports == ("reports.tasks",)
    assert conf.task_default_queue == project["EXAMPLE_QUEUE"]
    assert conf.beat_scheduler == "django_celery_beat.schedulers:DatabaseScheduler"


def test_a_worker_started_as_celery_starts_one_sets_django_up(
    django_here: Any, project: dict[str, str], broker_url: str, tmp_path: Path
) -> None:
    # `amqtask -A proj worker`, outside manage.py, as `celery -A proj worker` is run: task modules import
    # models, so Django must be set up before they are (it used to fail with AppRegistryNotReady).
    from orders.models import Order

    queue = f"{project['EXAMPLE_QUEUE']}-plain"
    env = {name: value for name, value in project.items() if name != "DJANGO_SETTINGS_MODULE"}  # proj sets it
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "amqtask", "-A", "proj", "worker", "-Q", queue, "-c", "2", "-l", "info"],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: "consuming" in log.read_text() or worker.poll() is not None, 60, "the worker")
        assert worker.poll() is None, log.read_text()
        order = Order.objects.create(item="lamp")
        assert django_here.send_task("orders.process", (order.id,), queue=queue).get(timeout=TIMEOUT) == order.id
        order.refresh_from_db()
        assert order.status == "processed"
        # The other app's task, from CELERY_IMPORTS (imported first, before the installed apps' tasks).
        assert django_here.send_task("reports.cleanup", kwargs={"days": 0}, queue=queue).get(timeout=TIMEOUT) >= 1
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
        delete_objects(broker_url, (queue,))


def _start_worker(tmp_path: Path, broker_url: str, settings_module: str | None) -> subprocess.CompletedProcess[str]:
    """``amqtask -A plain_app worker --burst`` in ``tmp_path``, with ``DJANGO_SETTINGS_MODULE`` as given."""
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    env.update(AMQTASK_BROKER_URL=broker_url, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_DIR)]))
    if settings_module is not None:
        env["DJANGO_SETTINGS_MODULE"] = settings_module
    queue = f"plain-{tmp_path.name}"
    command = [sys.executable, "-m", "amqtask", "-A", "plain_app", "worker", "--burst", "-Q", queue]
    try:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                              check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        delete_objects(broker_url, (queue, f"{queue}.dlq"))


def test_django_settings_in_the_environment_that_fail_are_one_clear_error(tmp_path: Path, broker_url: str) -> None:
    (tmp_path / "broken_settings.py").write_text('SECRET_KEY = "x"\nINSTALLED_APPS = ["no_such_app"]\n')
    (tmp_path / "needs_django.py").write_text("from django.contrib.auth.models import User\n")
    (tmp_path / "plain_app.py").write_text('from amqtask import App\napp = App("plain", imports=["needs_django"])\n')
    lines = {
        "broken_settings": "error: ConfigurationError: Django could not be set up "
        "(DJANGO_SETTINGS_MODULE='broken_settings'): ModuleNotFoundError: No module named 'no_such_app'",
        "no_such_settings": "error: ConfigurationError: importing needs_django: Django's settings module "
        "'no_such_settings' (DJANGO_SETTINGS_MODULE) cannot be imported",
        None: "error: ConfigurationError: importing needs_django: ImproperlyConfigured: Requested setting",
    }
    for settings_module, line in lines.items():
        done = _start_worker(tmp_path, broker_url, settings_module)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(line), (settings_module, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_django_settings_module_left_in_the_environment_does_not_stop_another_projects_worker(
    tmp_path: Path, broker_url: str
) -> None:
    (tmp_path / "plain_app.py").write_text('from amqtask import App\napp = App("plain")\n')
    done = _start_worker(tmp_path, broker_url, "somebody_elses.settings")
    assert done.returncode == 0, done.stderr
    assert "DJANGO_SETTINGS_MODULE='somebody_elses.settings' names no module this process can import" in done.stderr
