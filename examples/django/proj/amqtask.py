"""The project's amqtask app, configured from Django's settings as a Celery project's would be.

``namespace="CELERY"`` reads the ``CELERY_*`` settings unchanged (a project moving from Celery keeps
its settings.py); ``autodiscover_tasks()`` registers ``tasks.py`` of every installed app when a worker
starts. ``DjangoTask`` gives tasks ``delay_on_commit`` and closes stale database connections around them.
"""

import os

from amqtask import App
from amqtask.contrib.django import DjangoTask

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = App("proj", task_cls=DjangoTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
