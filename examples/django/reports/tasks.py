"""Tasks of the reports app: the periodic cleanup (beat sends it hourly: a django-celery-beat row)."""

from datetime import timedelta

from django.utils import timezone

from orders.models import Order
from proj.amqtask import app


@app.task(name="reports.cleanup")
def cleanup(days: int = 30) -> int:
    """Delete processed orders older than ``days``; returns how many."""
    cutoff = timezone.now() - timedelta(days=days)
    deleted, _ = Order.objects.filter(status="processed", created__lt=cutoff).delete()
    return deleted
