"""Finish answers by migration id, so that a retried Finish returns the first answer and
does the work once (a source that lost the answer on a broken link asks again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from vmmigrate.v1 import vmmigrate_pb2 as pb

RESULT_TTL = 600.0  # seconds an answer is kept for retries
MAX_RESULTS = 10_000


class FinishResults:
    def __init__(self) -> None:
        self._results: dict[str, tuple[float, asyncio.Future[pb.FinishResponse]]] = {}

    def __contains__(self, migration_id: str) -> bool:
        return migration_id in self._results

    async def run_once(
        self, migration_id: str, finish: Callable[[], Awaitable[pb.FinishResponse]]
    ) -> pb.FinishResponse:
        """The answer of the first Finish for ``migration_id`` (running it if none ran).
        It runs to its end even if the caller goes away."""
        entry = self._results.get(migration_id)
        if entry is None:
            fut: asyncio.Future[pb.FinishResponse] = asyncio.ensure_future(finish())
            self._results[migration_id] = (time.monotonic(), fut)
            self._trim()
        else:
            fut = entry[1]
        return await asyncio.shield(fut)

    def tombstone(self, migration_id: str) -> None:
        """Record a migration as ended with no domain (cancelled before Prepare arrived)."""
        fut: asyncio.Future[pb.FinishResponse] = asyncio.get_running_loop().create_future()
        fut.set_result(pb.FinishResponse())
        self._results[migration_id] = (time.monotonic(), fut)
        self._trim()

    def _trim(self) -> None:
        if len(self._results) > MAX_RESULTS:
            oldest = sorted(self._results.items(), key=lambda kv: kv[1][0])
            for mid, (_, fut) in oldest[: len(self._results) - MAX_RESULTS]:
                if fut.done():
                    del self._results[mid]

    def expire(self) -> None:
        now = time.monotonic()
        for mid, (when, fut) in list(self._results.items()):
            if fut.done() and now - when > RESULT_TTL:
                del self._results[mid]
