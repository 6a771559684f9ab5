"""The hourly cleanup as a django-celery-beat row, editable in the admin (``amqtask beat`` reads it).

A data migration so a fresh database has it; operators then change the interval, the arguments or the
enabled flag in the admin (or with the ORM) and the running beat picks the change up.
"""

import json
from typing import Any

from django.db import migrations


def add_cleanup(apps: Any, schema_editor: Any) -> None:
    interval_model = apps.get_model("django_celery_beat", "IntervalSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    hourly, _ = interval_model.objects.get_or_create(every=1, period="hours")
    task_model.objects.get_or_create(
        name="cleanup-processed-orders",
        defaults={"task": "reports.cleanup", "interval": hourly, "kwargs": json.dumps({"days": 30})},
    )


def remove_cleanup(apps: Any, schema_editor: Any) -> None:
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name="cleanup-processed-orders").delete()


class Migration(migrations.Migration):
    dependencies = [("django_celery_beat", "0012_periodictask_expire_seconds")]
    operations = [migrations.RunPython(add_cleanup, remove_cleanup)]
