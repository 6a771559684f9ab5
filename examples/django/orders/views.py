import uuid

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import Order
from .tasks import process_order


@csrf_exempt
def create_order(request: HttpRequest) -> JsonResponse:
    """Save an order and process it in the background once the transaction commits."""
    task_id = str(uuid.uuid4())
    with transaction.atomic():
        order = Order.objects.create(item=request.POST.get("item", "?"))
        # Sent only on commit: a worker never looks for an order that a rollback took back.
        process_order.apply_async_on_commit((order.id,), task_id=task_id)
    return JsonResponse({"order": order.id, "task_id": task_id}, status=202)


def order_status(request: HttpRequest, order_id: int) -> JsonResponse:
    order = Order.objects.get(id=order_id)
    return JsonResponse({"order": order.id, "status": order.status})
