"""Remote control of workers over RabbitMQ, wire-compatible with Celery's pidbox.

:mod:`~amqtask.remote.wire` is the format (names, properties, the one reader of requests and
replies), :mod:`~amqtask.remote.client` the client (``app.control``), :mod:`~amqtask.remote.inspect`
its read-only queries, :mod:`~amqtask.remote.node` a worker's mailbox and
:mod:`~amqtask.remote.commands` what it answers. The worker runs its node through
:class:`amqtask.middleware.control.ControlMiddleware`.
"""

from .client import Control
from .inspect import Inspect, flatten
from .wire import EXCHANGE, NAMESPACE, QUEUE_ARGUMENTS, REPLY_EXCHANGE, reply_queue_name, worker_queue_name

__all__ = [
    "EXCHANGE",
    "NAMESPACE",
    "QUEUE_ARGUMENTS",
    "REPLY_EXCHANGE",
    "Control",
    "Inspect",
    "flatten",
    "reply_queue_name",
    "worker_queue_name",
]
