#!/usr/bin/env python3
"""What an unarmed failpoint costs: one `await failpoints.hit(name)` with nothing armed,
next to a bare coroutine call, in the same run.

    .venv/bin/python bench/bench_failpoints.py
"""

from __future__ import annotations

import asyncio
import time

from vmmigrate.common.failpoints import ALL_FAILPOINTS, Failpoints

N = 500_000


async def main() -> None:
    unarmed = Failpoints.parse("")
    # armed elsewhere: the lookup misses, as it does for every other failpoint of a process
    other = Failpoints.parse("srcd.confirm.after=delay(1)")

    async def bare(name: str) -> None:
        return None

    for label, fn in (("bare coroutine", bare), ("unarmed", unarmed.hit), ("other armed", other.hit)):
        t = time.perf_counter()
        for _ in range(N):
            await fn("dstd.finish.before")
        print(f"{label:15} {(time.perf_counter() - t) / N * 1e9:6.0f} ns per call")
    print(f"{len(ALL_FAILPOINTS)} failpoints exist; a migration passes at most about 10 of them")


if __name__ == "__main__":
    asyncio.run(main())
