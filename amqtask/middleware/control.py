"""The hook that gives each worker remote control (:mod:`amqtask.remote`) and skips revoked tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..remote.node import CONTROL_READY_WAIT_S, ControlNode
from . import Middleware

if TYPE_CHECKING:
    from ..protocol import TaskMessage, WireMessage
    from ..worker.worker import Worker


class ControlMiddleware(Middleware):
    """Runs a :class:`ControlNode` for each worker of the app, and skips revoked tasks."""

    def __init__(self) -> None:
        self.nodes: dict[Worker, ControlNode] = {}

    async def on_worker_start(self, worker: Worker) -> None:
        """Start the worker's control consumer; a worker without remote control still runs tasks."""
        node = ControlNode(worker)
        self.nodes[worker] = node
        # Bounded: remote control is not worth delaying the tasks for; it goes on trying in the background.
        await node.start(min(worker.app.conf.publish_timeout_s, CONTROL_READY_WAIT_S))

    async def on_worker_stop(self, worker: Worker) -> None:
        """Stop the worker's control consumer."""
        node = self.nodes.pop(worker, None)
        if node is not None:
            await node.stop()

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        """Refuse a revoked task (acked, answered REVOKED) and note when the others start."""
        node = self.nodes.get(worker)
        if node is not None:
            node.check(message)


__all__ = ["ControlMiddleware"]
