"""The example project: importing it makes the amqtask app available, as Celery's layout does."""

from .amqtask import app

__all__ = ["app"]
