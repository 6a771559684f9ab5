"""run.py's output: the figures of one run, amqtask's ratios to each peer, the targets of issue 14."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: (key, label, unit, higher is better, how to read it from a system's figures)
ROWS: list[tuple[str, str, str, bool, Callable[[dict[str, Any]], Any]]] = [
    ("drain_def", "drain, plain def no-op", "tasks/s", True, lambda f: f.get("drain_def", {}).get("rate")),
    ("drain_async", "drain, async def no-op", "tasks/s", True, lambda f: f.get("drain_async", {}).get("rate")),
    ("drain_result", "drain, result to a waiting caller", "tasks/s", True,
     lambda f: f.get("drain_result", {}).get("rate")),
    ("enqueue_sequential", "enqueue, sequential", "tasks/s", True, lambda f: f.get("enqueue_sequential")),
    ("enqueue_bulk", "enqueue, bulk/concurrent", "tasks/s", True, lambda f: f.get("enqueue_bulk")),
    ("rt_p50", "round trip p50", "ms", False, lambda f: f.get("round_trip", {}).get("p50_ms")),
    ("rt_p95", "round trip p95", "ms", False, lambda f: f.get("round_trip", {}).get("p95_ms")),
    ("rt_p99", "round trip p99", "ms", False, lambda f: f.get("round_trip", {}).get("p99_ms")),
    ("cpu_def", "worker CPU per task, plain def", "us", False,
     lambda f: f.get("drain_def", {}).get("cpu_us_per_task")),
    ("cpu_result", "worker CPU per task, with result", "us", False,
     lambda f: f.get("drain_result", {}).get("cpu_us_per_task")),
    ("rss", "worker RSS after drain", "MiB", False, lambda f: f.get("drain_def", {}).get("rss_mib")),
    ("startup", "start-up to first task", "s", False, lambda f: f.get("drain_def", {}).get("startup_s")),
]  # fmt: skip

#: Rates depend on how much CPU the worker got on a shared machine; CPU per task much less so.
#: (row, peer, "min" or "max", bound): amqtask / peer must be at least (min) or at most (max) the bound.
TARGETS = [
    ("drain_def", "dramatiq", "min", 1.5),
    ("drain_def", "celery-threads", "min", 2.0),
    ("drain_def", "raw", "min", 0.7),
    ("drain_async", "raw", "min", 0.85),
    ("drain_result", "celery-threads", "min", 2.0),
    ("enqueue_sequential", "raw", "min", 0.95),
    ("enqueue_bulk", "raw", "min", 0.9),
    ("rt_p50", "raw", "max", 1.3),
    ("rss", "celery-threads", "max", 0.75),
]

GUARANTEES = {
    "raw": "confirms on; ack after handling; prefetch 100; RPC reply confirmed before the ack",
    "amqtask": "confirms on; ack late; reply confirmed before the ack; prefetch 32",
    "amqtask-uvloop": "as amqtask, with uvloop's event loop in client and worker",
    "dramatiq": "publishes WITHOUT confirms (confirm_delivery off); ack late; prefetch 16; no RabbitMQ result backend",
    "celery-threads": "publishes WITHOUT confirms; acks EARLY (before the task runs); prefetch 32; rpc:// results",
    "celery-prefork": "publishes WITHOUT confirms; acks EARLY; 8 processes; prefetch 32; rpc:// results",
}
SUBJECT = "amqtask"


def _value(run: dict[str, Any], system: str, row: str) -> Any:
    getter = next(r[4] for r in ROWS if r[0] == row)
    return getter(run["systems"].get(system, {}))


def ratio(run: dict[str, Any], row: str, peer: str, subject: str = SUBJECT) -> float | None:
    mine, theirs = _value(run, subject, row), _value(run, peer, row)
    if mine is None or not theirs:
        return None
    return float(mine) / float(theirs)


def targets(run: dict[str, Any], subject: str = SUBJECT) -> list[tuple[str, str, str, float | None, bool | None]]:
    """Each target as (figure label, peer, bound text, ratio, met)."""
    out = []
    for row, peer, kind, bound in TARGETS:
        found = ratio(run, row, peer, subject)
        met = None if found is None else (found >= bound if kind == "min" else found <= bound)
        label = next(r[1] for r in ROWS if r[0] == row)
        out.append((label, peer, f"{'≥' if kind == 'min' else '≤'} {bound:g}x", found, met))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if isinstance(value, float | int) and abs(value) >= 100 else f"{value:g}"


def _tables(run: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    systems = list(run["systems"])
    peers = [s for s in systems if s != SUBJECT]
    head = ["figure", "unit", *systems, *(f"{SUBJECT} ÷ {p}" for p in peers)]
    rows = []
    for key, label, unit, _, _ in ROWS:
        values = [_value(run, s, key) for s in systems]
        if all(v is None for v in values):
            continue
        ratios = [ratio(run, key, p) for p in peers]
        rows.append([label, unit, *map(_cell, values), *(f"{r:.2f}" if r is not None else "-" for r in ratios)])
    subjects = [s for s in (SUBJECT, f"{SUBJECT}-uvloop") if s in run["systems"]]
    target_head = ["target", "vs", "bound", *(f"{s} ratio" for s in subjects), *(f"{s} met" for s in subjects)]
    found = [targets(run, s) for s in subjects]
    target_rows = [[*found[0][i][:3], *(f"{f[i][3]:.2f}" if f[i][3] is not None else "-" for f in found),
                    *({True: "yes", False: "NO", None: "not measured"}[f[i][4]] for f in found)]
                   for i in range(len(TARGETS))]  # fmt: skip
    return head, rows, target_head, target_rows


def cpu_note(run: dict[str, Any]) -> str:
    cpu = run["cpu"]
    noisy = "NOISY: compare with care" if cpu["other_share"] > 0.1 else "quiet enough"
    return (f"CPU during the run ({cpu['wall_s']}s wall, {cpu['cores']} cores): this run's processes "
            f"{cpu['ours_cpu_s']}s, the broker {cpu['broker_cpu_s']}s (shared with other users of it), other "
            f"processes {cpu['other_cpu_s']}s = {100 * cpu['other_share']:.0f}% of the machine ({noisy}).")  # fmt: skip


def markdown(run: dict[str, Any]) -> str:
    head, rows, target_head, target_rows = _tables(run)
    p = run["parameters"]

    def table(h: list[str], body: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h), *("| " + " | ".join(r) + " |" for r in body)]

    lines = [
        f"Run of {run['date']} (Python {run['python']}): {p['count']:,} tasks per drain and bulk send, "
        f"{p['sequential']:,} sequential sends, {p['round_trips']} round trips, one worker process with "
        f"concurrency {p['concurrency']}.",
        "",
        *table(head, rows),
        "",
        *table(target_head, target_rows),
        "",
        *(f"- **{s}**: {GUARANTEES[s]}" for s in run["systems"]),
        "",
        cpu_note(run),
        "",
    ]
    return "\n".join(lines)


def terminal(run: dict[str, Any]) -> str:
    head, rows, target_head, target_rows = _tables(run)

    def table(h: list[str], body: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [h, *body]) for i in range(len(h))]
        return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                for r in [h, *body]]  # fmt: skip

    return "\n".join(["", *table(head, rows), "", *table(target_head, target_rows), "", cpu_note(run)])
