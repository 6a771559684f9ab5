"""Periodic tasks: the three ways to declare them, sent by ``amqtask beat``.

From this directory, with ``AMQTASK_BROKER_URL`` pointing at your broker::

    amqtask worker -A beat_tasks -Q default,maintenance     # runs the tasks
    amqtask beat -A beat_tasks --schedule-file beat_schedule.toml
    amqtask beat -A beat_tasks --schedule-file beat_schedule.toml list

Start ``amqtask beat`` twice (or on two machines) for fail-over: one sends, the other waits for the lock.
Edit beat_schedule.toml while beat runs and the change is picked up within ``beat_max_loop_s``.
"""

from __future__ import annotations

from datetime import timedelta

from amqtask import App, crontab

# The broker URL comes from AMQTASK_BROKER_URL when set (amqp://guest:guest@localhost:5672// otherwise).
app = App("beat_tasks")
app.conf.timezone = "Europe/Berlin"  # crontabs without a zone of their own run on Berlin's wall clock


@app.task(name="tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tasks.report")
def report(full: bool = False) -> str:
    return "full report" if full else "report"


@app.task(name="tasks.clean_log")
def clean_log(days: int = 30) -> int:
    return days


# 1. Settings, in Celery's shape: a timedelta or seconds for intervals, a crontab, or a cron string.
app.conf.beat_schedule = {
    "add-every-30-seconds": {"task": "tasks.add", "schedule": timedelta(seconds=30), "args": (16, 16)},
    "hourly": {"task": "tasks.report", "schedule": 3600.0},
    "weekly-cleanup": {
        "task": "tasks.clean_log",
        "schedule": crontab(minute=0, hour=3, day_of_week="sunday"),
        "options": {"queue": "maintenance", "priority": 2, "expires": 600},
    },
}


# 2. A decorator that registers the task and its schedule at once; "skip": runs missed while no beat
# was up are dropped rather than made up for.
@app.periodic_task(crontab(minute="*/15", hour="8-18", day_of_week="mon-fri"), name="tasks.heartbeat", catch_up="skip")
def heartbeat() -> str:
    return "ok"


# 3. add_periodic_task with a task, a task name or a signature (partial arguments and options included).
app.add_periodic_task(crontab(minute=30, hour=6), report.s(full=True), name="morning-report")
