"""amqtask next to Celery, Dramatiq and raw aio-pika on one broker, in one run: the table of issue 14.

    python benchmarks/run.py [--count 20000] [--sequential 2000] [--round-trips 500] [--systems ...]
    tox -e bench

Each system runs in a process of its own (``bench_<system>.py``), one after the other, on the same
broker (RabbitMQ 3.10 of deploy/rabbitmq.sh, in a vhost made for the run and deleted after it), each
in its documented defaults. Figures depend on the machine; the ratios from one run are what count.
The machine is shared, so the run also records how much CPU other processes used meanwhile: a run
where they took a large share is noisy, and says so.

Writes benchmarks/results/latest.{md,json} (and a timestamped copy of the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from harness import HERE, REPO, broker_url
from report import markdown, terminal

SYSTEMS = {
    "raw": ["bench_raw.py"],
    "amqtask": ["bench_amqtask.py"],
    "amqtask-uvloop": ["bench_amqtask.py"],
    "dramatiq": ["bench_dramatiq.py"],
    "celery-threads": ["bench_celery.py", "threads"],
    "celery-prefork": ["bench_celery.py", "prefork"],
}
BROKER = "amqtask-310"


def ctl(*args: str) -> None:
    subprocess.run(["bash", str(REPO / "deploy" / "rabbitmq.sh"), "ctl", "--name", BROKER, "--", *args],
                   check=True, capture_output=True)  # fmt: skip


class CpuLedger:
    """CPU seconds used during the run: by the whole machine, by this run's processes, by the broker."""

    def __init__(self) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.broker_pid = _broker_pid()
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        mine = os.times()
        broker = 0.0
        if self.broker_pid:
            stat = Path(f"/proc/{self.broker_pid}/stat").read_text().rsplit(")", 1)[1].split()
            broker = (int(stat[11]) + int(stat[12])) / self.ticks
        return {"machine": busy / self.ticks, "ours": mine.user + mine.system + mine.children_user
                + mine.children_system, "broker": broker, "wall": time.monotonic()}  # fmt: skip

    def summary(self) -> dict[str, float]:
        end = self._sample()
        used = {key: end[key] - self.start[key] for key in end}
        other = max(0.0, used["machine"] - used["ours"] - used["broker"])
        wall = used["wall"]
        cores = os.cpu_count() or 1
        return {"wall_s": round(wall, 1), "cores": cores, "ours_cpu_s": round(used["ours"], 1),
                "broker_cpu_s": round(used["broker"], 1), "other_cpu_s": round(other, 1),
                "other_share": round(other / (wall * cores), 3)}  # fmt: skip


def _broker_pid() -> int | None:
    """The shared broker's Erlang VM (its CPU is this run's and other sessions' broker work)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if args and args[0].endswith(b"beam.smp") and b"rabbit" in args and f"/{BROKER}/".encode() in b" ".join(args):
            return int(cmdline.parent.name)
    return None


def run_system(name: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one system's benchmark process and return its figures."""
    started = time.monotonic()
    system_env = {**env, "AMQTASK_EVENT_LOOP": "uvloop"} if name.endswith("-uvloop") else env
    # A session of its own, so that a system that overruns is ended with every worker it started.
    process = subprocess.Popen([sys.executable, *SYSTEMS[name]], env=system_env, cwd=HERE, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"{name} did not finish within 30 minutes") from None
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    figures: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    print(f"  {name}: {time.monotonic() - started:.0f}s", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="tasks per drain and bulk send")
    parser.add_argument("--sequential", type=int, default=2_000, help="sequential sends")
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of: " + ", ".join(SYSTEMS))
    parser.add_argument("--url", help="a broker (and vhost) to use as it is, instead of a vhost of deploy's 3.10")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    vhost = None
    url = args.url
    if url is None:
        vhost = f"bench-{uuid.uuid4().hex[:8]}"
        url = broker_url(from_env=False).rstrip("/") + "/" + vhost  # the broker whose vhosts ctl() manages
        ctl("add_vhost", vhost)
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    env = {**os.environ, "BENCH_URL": url, "BENCH_PREFIX": vhost or "bench", "BENCH_COUNT": str(args.count),
           "BENCH_SEQUENTIAL": str(args.sequential), "BENCH_ROUND_TRIPS": str(args.round_trips),
           "BENCH_CONCURRENCY": str(args.concurrency)}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    print(f"{args.count} tasks per drain, concurrency {args.concurrency}; systems one after the other:", flush=True)
    ledger = CpuLedger()
    try:
        results = {name: run_system(name, env) for name in args.systems.split(",")}
    finally:
        if vhost is not None:
            ctl("delete_vhost", vhost)
    run = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "parameters": {
            "count": args.count,
            "sequential": args.sequential,
            "round_trips": args.round_trips,
            "concurrency": args.concurrency,
        },
        "cpu": ledger.summary(),
        "systems": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = run["date"].replace(":", "").replace("-", "")[:15]
    for path in (args.out / "latest.json", args.out / f"run-{stamp}.json"):
        path.write_text(json.dumps(run, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(run))
    print(terminal(run))


if __name__ == "__main__":
    main()
