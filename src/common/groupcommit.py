"""Group commit: blocking store writes that many coroutines ask for at about the same time,
run together in one thread hand-off whose one flush covers them all (common/durable.py
atomic_write_many).

One flusher per committer: a caller queues its item and waits; if no flush is running, one
starts at once (a lone write waits for nothing, and costs what it did before); while one
runs, the items that arrive queue up and go together in the next. Each caller resumes only
when the flush that covered its item has ended (its write is durable), and gets its own
result or its own error: the batch function answers per item.

``inline``: when it says the daemon has nothing else in flight (one migration alone), an
item that finds no flush running and nothing queued is written in the caller's own thread,
on the event loop: the thread hand-off costs a lone migration more than the small write
itself (docs/PERFORMANCE.md), and with nothing else in flight there is nobody for the
write to hold up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_GROUP = 256  # items per flush


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A caller cancelled meanwhile leaves its future behind: mark its error seen."""
    if not fut.cancelled():
        fut.exception()


class GroupCommit(Generic[Item, Result]):
    """``run(items)`` (blocking, in a thread) returns one result or exception per item, in
    order; an exception it raises is every item's."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Sequence[Result | BaseException]],
        max_group: int = MAX_GROUP,
        *,
        inline: Callable[[], bool] | None = None,
    ) -> None:
        self._run = run
        self._max = max_group
        self._inline = inline
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0  # groups run (tests, figures)

    async def submit(self, item: Item) -> Result:
        if (
            self._inline is not None
            and not self._queue
            and self._flusher is None
            and self._inline()
        ):
            return self._run_inline(item)
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieved)
        self._queue.append((item, fut))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_all())
        # the write goes on if the caller is cancelled: its flush is shared
        return await asyncio.shield(fut)

    def _run_inline(self, item: Item) -> Result:
        """One item's flush where the caller is (see ``inline``)."""
        self.flushes += 1
        res = self._run([item])[0]
        if isinstance(res, BaseException):
            raise res
        return res

    async def _flush_all(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[: self._max], self._queue[self._max :]
                await self._flush(group)
        finally:
            self._flusher = None

    async def _flush(self, group: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        self.flushes += 1
        try:
            results = await asyncio.to_thread(self._run, [item for item, _ in group])
        except asyncio.CancelledError:
            for _, fut in group:
                fut.cancel()
            raise
        except Exception as exc:  # every caller gets it
            results = [exc] * len(group)
        for (_, fut), res in zip(group, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)


def _call_each(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = []
    for fn in fns:
        try:
            results.append(fn())
        except Exception as exc:  # that call's own error
            results.append(exc)
    return results


def offloader(inline: Callable[[], bool] | None = None) -> GroupCommit[Callable[[], Any], Any]:
    """Blocking store calls that need no flush of their own (a plain unlink, a write that
    is not fsync'd), off the event loop, several coroutines' in one thread hand-off: on a
    busy file system even an unlink can wait milliseconds for the journal commit another
    writer's flush forced, and on the event loop that wait stalls every migration (with
    nothing else in flight, ``inline`` keeps them on it: see the module docstring)."""
    return GroupCommit(_call_each, inline=inline)
