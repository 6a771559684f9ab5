"""Retries, backoff and the dead-letter queue.

``python retries.py`` runs a worker in this process and shows the three outcomes: a task that
succeeds after explicit retries, one retried automatically with exponential backoff, and one that
keeps failing and ends in ``default.dlq``, where it can be listed and replayed. Every retry waits in
the broker's delay levels, not in the worker: stop the worker mid-backoff and the next one picks it up.

The dead-letter queue from the command line:

    amqtask dlq list default -A retries           # count and table: id, task, reason, exception, time
    amqtask dlq replay default -A retries --all   # back to "default", retries reset (or --id ID)
    amqtask dlq purge default -A retries --yes
"""

from __future__ import annotations

import asyncio
from typing import Any

from amqtask import App, Worker, dlq

# The broker URL comes from AMQTASK_BROKER_URL when set (amqp://guest:guest@localhost:5672// otherwise).
app = App("retries")
calls: dict[str, int] = {}


class Unavailable(Exception):
    """A downstream service said "try later"."""


@app.task(name="retries.fetch", bind=True, max_retries=3)
def fetch(self: Any, url: str) -> str:
    """Retries explicitly: ``self.retry`` raises, the worker republishes with retries + 1, then acks."""
    try:
        if self.request.retries < 2:
            raise Unavailable(f"{url} answered 503")
    except Unavailable as exc:
        raise self.retry(exc=exc, countdown=1) from exc
    return f"fetched {url} on attempt {self.request.retries + 1}"


# Automatic retries on these exceptions, waiting 1, 2, 4 ... s (capped at 4, full jitter) in between.
@app.task(name="retries.sync", bind=True, autoretry_for=(Unavailable,), retry_backoff=1, retry_backoff_max=4,
          max_retries=5)  # fmt: skip
def sync(self: Any, account: str) -> str:
    if self.request.retries < 2:
        raise Unavailable("rate limited")
    return f"synced {account} after {self.request.retries} retries"


@app.task(name="retries.charge", autoretry_for=(ValueError,), max_retries=2, default_retry_delay=0.5)
def charge(card: str) -> None:
    """Fails on every attempt: after the last one the message goes to default.dlq."""
    if not calls.get("fixed"):
        raise ValueError(f"card {card} declined")
    calls["charged"] = calls.get("charged", 0) + 1


async def main() -> None:
    worker = Worker(app, concurrency=4)
    await worker.start()
    try:
        print(await (await fetch.adelay("https://example.com")).aget(timeout=30))
        print(await (await sync.adelay("acme")).aget(timeout=30))
        try:
            await (await charge.adelay("4242")).aget(timeout=30)
        except ValueError as exc:
            print(f"charge failed for good: {exc!r}")  # the caller gets the task's own exception type

        listing = await dlq.inspect(app, "default")
        for entry in listing.messages:
            print(f"in {listing.queue}: {entry.task} [{entry.id}] {entry.reason}: {entry.exception}")
        calls["fixed"] = 1  # say the card processor is fixed: replay sends it back with retries = 0
        replayed = await dlq.replay(app, "default")
        print(f"replayed {len(replayed.replayed)} message(s)")

        # The caller already has this task's FAILURE (the first final state wins), so watch the effect.
        async def charged() -> None:
            while not calls.get("charged"):
                await asyncio.sleep(0.1)

        await asyncio.wait_for(charged(), timeout=30)
        print("the replayed charge went through")
    finally:
        await worker.stop()


if __name__ == "__main__":
    asyncio.run(main())
