"""The Django example project (examples/django) set up once per test process, for every module using it.

Django reads its settings once per process, so the modules testing the example (the worker, beat) share
one migrated sqlite database and one in-process set-up; each test then uses queues of its own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from support.workers import REPO_DIR

PROJECT = REPO_DIR / "examples" / "django"
_ENV: dict[str, str] = {}


def example_env(broker_url: str) -> dict[str, str]:
    """The example's environment (its own sqlite file and default queue), migrated, Django set up here."""
    if _ENV:
        return dict(_ENV)
    directory = Path(tempfile.mkdtemp(prefix="django-example-"))
    atexit.register(shutil.rmtree, directory, True)
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker_url,
        "EXAMPLE_QUEUE": f"django-{directory.name}",
        "EXAMPLE_DB": str(directory / "db.sqlite3"),
        "DJANGO_SETTINGS_MODULE": "proj.settings",
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(REPO_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    manage(env, "migrate", "--no-input")
    os.environ.update({k: env[k] for k in ("CELERY_BROKER_URL", "EXAMPLE_QUEUE", "EXAMPLE_DB")})
    os.environ["DJANGO_SETTINGS_MODULE"] = "proj.settings"
    sys.path[:0] = [str(PROJECT)]
    import django

    django.setup()
    _ENV.update(env)
    return dict(env)


def manage(env: dict[str, str], *args: str) -> str:
    """``python manage.py ARGS`` in the example project; its output (fails the test on an error)."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT, env=env, capture_output=True, text=True,
        timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
