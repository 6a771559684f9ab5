"""Results: :class:`AsyncResult`, the reply-queue consumer and store (RPC), and :class:`GroupResult`."""

from .async_result import AsyncResult
from .group import GroupResult
from .rpc import ResultConsumer, ResultStore, new_reply_queue_name, reply_queue_arguments

__all__ = [
    "AsyncResult",
    "GroupResult",
    "ResultConsumer",
    "ResultStore",
    "new_reply_queue_name",
    "reply_queue_arguments",
]
