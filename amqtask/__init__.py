"""amqtask: a task runner built for RabbitMQ, speaking the Celery message protocol v2."""

#: The release, read by the build too (pyproject.toml: ``version = {attr = "amqtask.__version__"}``).
__version__ = "0.1.0"

from .app import App, current_app
from .beat.schedules import crontab, interval
from .canvas import Signature, chain, chord, group, signature
from .errors import (
    AmqtaskError,
    BrokerConnectionError,
    ConfigurationError,
    ContentDisallowedError,
    MaxRetriesExceededError,
    MessageError,
    MisuseError,
    PublishError,
    Reject,
    RemoteTaskError,
    Retry,
    SerializationError,
    SoftTimeLimitExceeded,
    TaskNotRegisteredError,
    TaskRevokedError,
    TimeLimitExceeded,
    TimeoutError,
    TopologyError,
    TopologyMismatchError,
    TopologyNotFoundError,
    UnroutableError,
)
from .middleware import Middleware
from .results import AsyncResult, GroupResult
from .task import Request, Task
from .topology import QueueSpec
from .worker import Worker

__all__ = [
    # application and tasks
    "App",
    "AsyncResult",
    "Middleware",
    "QueueSpec",
    "Request",
    "Task",
    "Worker",
    "current_app",
    # canvas
    "GroupResult",
    "Signature",
    "chain",
    "chord",
    "group",
    "signature",
    # periodic tasks (amqtask beat)
    "crontab",
    "interval",
    # errors
    "AmqtaskError",
    "BrokerConnectionError",
    "ConfigurationError",
    "ContentDisallowedError",
    "MaxRetriesExceededError",
    "MessageError",
    "MisuseError",
    "PublishError",
    "Reject",
    "RemoteTaskError",
    "Retry",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "TaskNotRegisteredError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "TopologyError",
    "TopologyMismatchError",
    "TopologyNotFoundError",
    "UnroutableError",
]
