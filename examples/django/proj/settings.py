"""Settings of the example project (sqlite; the broker from CELERY_BROKER_URL)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "amqtask.contrib.django",  # python manage.py amqtask worker|beat|...
    "orders",
    "reports",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "proj.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

# What `manage.py amqtask ...` runs without -A.
AMQTASK_APP = "proj.amqtask:app"

# A Celery project's settings, read unchanged by app.config_from_object(..., namespace="CELERY").
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("EXAMPLE_QUEUE", "celery")
CELERY_TASK_SERIALIZER = "json"
CELERY_IMPORTS = ["reports.tasks"]  # autodiscovery finds it too; Celery projects often list modules here
CELERY_BEAT_SCHEDULE = {
    "cleanup-processed-orders": {"task": "reports.cleanup", "schedule": 3600, "kwargs": {"days": 30}},
}
