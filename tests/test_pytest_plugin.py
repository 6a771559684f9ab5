"""The pytest plugin shipped with amqtask, used from a sample project as a user would (issue 16).

The sample project (written by ``pytester``) has a tasks module and tests that use ``amqtask_eager``
(a chain, no broker) and ``amqtask_worker`` (background and burst, against the real broker). It runs
in a pytest subprocess. Where amqtask is installed (tox, CI) the ``pytest11`` entry point loads the
plugin, exactly as for a user; in a source checkout that is only on the path, it is named with ``-p``.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from amqtask import pytest_plugin

REPO = Path(__file__).resolve().parents[1]

TASKS = """
import os
from amqtask import App

app = App("sample", broker=os.environ["AMQTASK_BROKER_URL"], task_default_queue=os.environ["SAMPLE_QUEUE"])

@app.task(name="sample.add")
def add(x, y):
    return x + y

@app.task(name="sample.double")
async def double(x):
    return 2 * x
"""

SAMPLE_TESTS = """
from amqtask import group
from sample_tasks import add, app, double

def test_a_chain_in_eager_mode(amqtask_eager):
    amqtask_eager(app)
    assert (add.s(1, 2) | double.s() | add.s(1))().get() == 7
    assert group(add.s(1, 1), double.s(5)).delay().get() == [2, 10]

def test_a_background_worker_answers(amqtask_worker):
    worker = amqtask_worker(app, concurrency=2)
    assert add.delay(20, 22).get(timeout=30) == 42
    assert worker.stats["succeeded"] == 1

def test_a_burst_worker_drains_the_queue(amqtask_worker):
    results = [add.delay(i, i) for i in range(5)]
    worker = amqtask_worker(app, burst=True)
    assert worker.stats["succeeded"] == 5
    assert [r.get(timeout=5) for r in results] == [0, 2, 4, 6, 8]
    app.close()
"""


def test_the_plugin_is_declared_as_a_pytest11_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"amqtask": pytest_plugin.__name__}


@pytest.mark.broker
@pytest.mark.ecosystem
def test_a_sample_project_uses_the_fixtures(pytester: pytest.Pytester, broker_url: str, unique: str) -> None:
    pytester.makepyfile(sample_tasks=TASKS, test_sample=SAMPLE_TESTS)
    pytester.makeini("[pytest]\n")  # the sample project's own configuration, not amqtask's
    env = {
        "AMQTASK_BROKER_URL": broker_url,
        "SAMPLE_QUEUE": f"sample-{unique}",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(pytester.path)]),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        outcome = pytester.runpytest_subprocess(*_load_plugin(), "-p", "no:cacheprovider", timeout=180)
    outcome.assert_outcomes(passed=3)


def _load_plugin() -> tuple[str, ...]:
    """Nothing where the entry point loads the plugin (naming it too would register it twice), else ``-p``."""
    entry_points = importlib.metadata.entry_points(group="pytest11")
    if any(entry.value == pytest_plugin.__name__ for entry in entry_points):
        return ()
    return ("-p", pytest_plugin.__name__)
