from django.urls import path

from orders.views import create_order, order_status

urlpatterns = [
    path("orders/", create_order),
    path("orders/<int:order_id>/", order_status),
]
