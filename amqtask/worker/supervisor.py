"""Worker processes and signals: one worker in this process, or several supervised child processes.

Signals, decided once: the first SIGTERM or SIGINT drains (stop consuming, finish running tasks within
the grace period, hand the rest back) and exits 0; a second one exits at once with status 1, and the
broker redelivers whatever was unacked. With ``--processes P`` the supervisor starts P children (each
a single-process worker of its own), restarts any that dies, and passes signals on to them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .worker import Worker

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("amqtask.worker")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(app: App, **options: Any) -> int:
    """Run one worker in this process until a stop signal (or the end of a burst)."""
    worker = Worker(app, **options)
    loop = asyncio.get_running_loop()
    signals_seen = 0
    stopping: list[asyncio.Task[None]] = []  # keeps the stop task referenced until it finishes

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second %s: exiting now; the broker redelivers unfinished tasks", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing running tasks (press again to exit at once)", signal.Signals(signum).name)
        stopping.append(loop.create_task(worker.stop()))

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.run()
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    return 0


def _serve_children_metrics(port: int) -> Callable[[int], None]:
    from ..monitoring import metrics

    directory = tempfile.mkdtemp(prefix="amqtask-metrics-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ[metrics.MULTIPROC_ENV] = directory  # inherited by the children
    metrics.serve_children(port, directory)
    return metrics.child_exited


def supervise(child_command: Callable[[int], list[str]], processes: int, metrics_port: int | None = None) -> int:
    """Keep ``processes`` children running; on a stop signal pass it on and wait for them all.

    With ``metrics_port``, serve there the sum of the children's metrics (they record into a directory
    of this run's own, named in their environment).
    """
    exited_hook = _serve_children_metrics(metrics_port) if metrics_port is not None else None
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    restarts: dict[int, float] = {}

    def spawn(index: int) -> None:
        children[index] = subprocess.Popen(child_command(index))
        log.info("started worker process %d (pid %d)", index, children[index].pid)

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            for child in children.values():
                child.kill()
            os._exit(1)
        stopping = True
        for child in children.values():
            child.send_signal(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    for index in range(processes):
        spawn(index)
    while children:
        pid, status = os.wait()
        which = next((i for i, c in children.items() if c.pid == pid), None)
        if which is None:
            continue
        exited = children.pop(which)
        exited.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if exited_hook is not None:
            exited_hook(pid)
        if not stopping:
            # Back off when a child keeps dying at once (a broken deploy must not spin the CPU).
            wait = 1.0 if time.monotonic() - restarts.get(which, 0.0) < 5 else 0.0
            log.warning("worker process %d (pid %d) died (status %d); restarting", which, pid, status)
            time.sleep(wait)
            restarts[which] = time.monotonic()
            spawn(which)
    return 0
