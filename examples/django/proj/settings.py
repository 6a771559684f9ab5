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
    "django_celery_beat",  # periodic tasks in the database, edited in the admin; read by amqtask beat
    "orders",
    "reports",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "proj.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
        # Beat writes each run back (last_run_at) while the admin edits rows: with SQLite's default
        # deferred transactions a writer that read first can fail at once with "database is locked";
        # IMMEDIATE (Django >= 5.1) makes it wait its turn instead.
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
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
# `manage.py amqtask beat` reads the periodic tasks from django-celery-beat's tables (the hourly cleanup
# is added by reports/migrations/0001_cleanup_schedule.py), as Celery's beat does with this setting.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
