"""The Django app of the integration: it brings ``python manage.py amqtask``."""

from django.apps import AppConfig


class AmqtaskConfig(AppConfig):
    name = "amqtask.contrib.django"
    label = "amqtask"  # not "django", the last part of the name
    verbose_name = "amqtask"
