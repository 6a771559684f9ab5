"""Tasks of the orders app, found by app.autodiscover_tasks()."""

import time

from proj.amqtask import app

from .models import Order


@app.task(name="orders.process")
def process_order(order_id: int) -> int:
    """The slow job a request should not wait for."""
    time.sleep(0.2)
    Order.objects.filter(id=order_id).update(status="processed")
    return order_id
