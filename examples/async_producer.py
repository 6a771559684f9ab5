"""Send tasks from async code (what a FastAPI handler does): ``adelay`` and ``await result``."""

from __future__ import annotations

import asyncio

from tasks import add, app, notify


async def main() -> None:
    first = await add.adelay(40, 2)
    print(f"add(40, 2) = {await first}")
    sent = await asyncio.gather(*(notify.adelay(user) for user in range(3)))
    print(await asyncio.gather(*(r.aget(timeout=10) for r in sent)))
    await app.aclose()


if __name__ == "__main__":
    asyncio.run(main())
