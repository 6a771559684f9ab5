"""Send tasks from a plain script and print their results (the synchronous API)."""

from __future__ import annotations

from tasks import add, notify

if __name__ == "__main__":
    result = add.delay(4, 4)
    print(f"add(4, 4) = {result.get(timeout=10)}")
    print(notify.delay(42).get(timeout=10))
    results = [add.delay(i, i) for i in range(5)]
    print("doubles:", [r.get(timeout=10) for r in results])
