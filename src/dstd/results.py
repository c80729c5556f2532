"""Answers by migration id, so that a retried Prepare or Finish returns the first answer
and does the work once (a source that lost the answer on a broken link asks again).

Finish answers are also kept on disk (the store's outcomes), so that a restarted dstd
gives the same answer: the in-memory table covers a Finish still running and the cancelled
tombstones; the store covers everything that ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from vmmigrate.common.errors import OperationInvalid
from vmmigrate.common.store import HostStore, MigrationOutcome

from vmmigrate.v1 import vmmigrate_pb2 as pb

RESULT_TTL = 600.0  # seconds an in-memory answer is kept for retries
MAX_RESULTS = 10_000

T = TypeVar("T")


class _Answers(Generic[T]):
    """First answers by migration id (futures, so that a retry that arrives while the
    first call still runs waits for it)."""

    def __init__(self) -> None:
        self._results: dict[str, tuple[float, str, asyncio.Future[T]]] = {}

    def __contains__(self, migration_id: str) -> bool:
        return migration_id in self._results

    def __len__(self) -> int:
        return len(self._results)

    async def run_once(
        self, migration_id: str, work: Callable[[], Awaitable[T]], fingerprint: str = ""
    ) -> T:
        """The answer of the first call for ``migration_id`` (running ``work`` if none ran).
        It runs to its end even if the caller goes away. A call with another fingerprint
        (not a retry: other arguments) is refused."""
        entry = self._results.get(migration_id)
        if entry is None:
            fut: asyncio.Future[T] = asyncio.ensure_future(work())
            self._results[migration_id] = (time.monotonic(), fingerprint, fut)
            self._trim()
        else:
            _, first, fut = entry
            if first != fingerprint:
                raise OperationInvalid(f"migration id '{migration_id}' is already in use")
        return await asyncio.shield(fut)

    def settle(self, migration_id: str, answer: T) -> None:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        fut.set_result(answer)
        self._results[migration_id] = (time.monotonic(), "", fut)
        self._trim()

    def forget(self, migration_id: str) -> None:
        self._results.pop(migration_id, None)

    def _trim(self) -> None:
        if len(self._results) > MAX_RESULTS:
            oldest = sorted(self._results.items(), key=lambda kv: kv[1][0])
            for mid, (_, _, fut) in oldest[: len(self._results) - MAX_RESULTS]:
                if fut.done():
                    del self._results[mid]

    def expire(self, ttl: float = RESULT_TTL) -> None:
        now = time.monotonic()
        for mid, (when, _, fut) in list(self._results.items()):
            if fut.done() and now - when > ttl:
                del self._results[mid]


class PrepareAnswers(_Answers[pb.PrepareResponse]):
    """Prepare answers while the incoming job lives (forgotten when it ends)."""


class FinishResults(_Answers[pb.FinishResponse]):
    """Finish answers: in memory, then the store's outcomes."""

    def __init__(self, store: HostStore) -> None:
        super().__init__()
        self._store = store

    def ended(self, migration_id: str) -> MigrationOutcome | None:
        """How a migration that is not running any more ended, from the store."""
        return self._store.outcome_get(migration_id)

    def known(self, migration_id: str) -> bool:
        return migration_id in self or self.ended(migration_id) is not None

    def tombstone(self, migration_id: str) -> None:
        """Record a migration as ended with no domain (cancelled before Prepare arrived)."""
        self.settle(migration_id, pb.FinishResponse())
