"""Coalesced destination calls: many offline migrations' Prepare (or Finish) to one dstd in
one PrepareBatch (FinishBatch) round trip (docs/ARCHITECTURE.md, "Batched phase calls").

Nagle-like, per destination and per phase: a call with no call in flight to that dstd is
sent at once (a lone migration waits for nothing); calls made while one is in flight are
queued and sent together when it returns, up to ``max_items`` (and a byte budget) per
batch, or when the oldest of them has waited ``max_wait`` (20 ms), so that a slow call in
flight never holds the others back for longer. Each caller gets exactly what the single
RPC would have given it: the item's response, or the error its status rebuilds
(common/rpc.py translate_status), each item on its own. A failure of the whole batch call
(peer unreachable, no answer) is every item's failure, as it would have been each single
call's. A dstd that answers UNIMPLEMENTED (an older peer) gets single calls from then on.

A lane looks like a unary method (``await lane(request, timeout=...)``), so the v3 client's
retry helpers drive it unchanged: each caller keeps its own deadline, and the batch call's
deadline is the longest of its items'.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
import structlog
from vmmigrate.common.errors import OperationFailed, Timeout, VmmigrateError
from vmmigrate.common.rpc import (
    cancelled_by_others,
    channel_gone,
    status_code,
    translate,
    translate_status,
    translated,
)

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.batcher")

Req = TypeVar("Req", pb.PrepareRequest, pb.FinishRequest)
Resp = TypeVar("Resp", pb.PrepareResponse, pb.FinishResponse)

MAX_ITEMS = 64  # items per batch call
# How long a queued call waits for the call in flight to return before it goes anyway, in
# a call of its own, seconds: a batch answers in a few ms; a slow one (a long Finish)
# delays the others by at most this much.
MAX_WAIT = 0.02


@dataclasses.dataclass
class _Waiting(Generic[Req, Resp]):
    request: Req
    timeout: float
    future: asyncio.Future[Resp]
    queued: float  # loop time


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A caller that gave up (its own deadline) leaves its future behind: mark the
    exception seen, so asyncio does not report it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


class Lane(Generic[Req, Resp]):
    """One phase's queue to one destination (see the module docstring)."""

    def __init__(
        self,
        *,
        single: Callable[[], Any],
        batch: Callable[[], Any],
        wrap: Callable[[Sequence[Req]], Any],
        unwrap: Callable[[Any], Sequence[Any]],
        peer: str,
        what: str,
        max_items: int = MAX_ITEMS,
        max_bytes: int = 4 << 20,
        max_wait: float = MAX_WAIT,
        answered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._answered = answered  # after a batch's answer arrives, before it is handed out
        self._single = single  # () -> the unary method, looked up per call (reconnects)
        self._batch = batch
        self._wrap: Callable[[Sequence[Req]], Any] = wrap
        self._unwrap = unwrap
        self.peer = peer
        self.what = what
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.supported = True  # False once the peer answered UNIMPLEMENTED
        self.max_wait = max_wait
        self._queue: list[_Waiting[Req, Resp]] = []
        self._sender: asyncio.Task[None] | None = None
        self._in_flight = 0  # calls (single or batch) under way
        self._calls: set[asyncio.Task[None]] = set()  # kept referenced until they end
        self._returned = asyncio.Event()  # set when a call in flight returns
        self.batches_sent = 0  # batch calls made (tests, metrics)

    async def __call__(self, request: Req, *, timeout: float) -> Resp:
        if not self.supported:
            response: Resp = await self._single()(request, timeout=timeout)
            return response
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Resp] = loop.create_future()
        fut.add_done_callback(_retrieved)
        self._queue.append(_Waiting(request, timeout, fut, loop.time()))
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_all())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise Timeout(f"{self.what} '{self.peer}' did not answer before the deadline") from None
        finally:
            # the caller gave up (its deadline, or cancelled): still queued, the call is not
            # sent; in flight, its answer is dropped, as a single call's would be
            if not fut.done():
                fut.cancel()

    def _take(self) -> list[_Waiting[Req, Resp]]:
        """The next batch: up to max_items, and within the byte budget (at least one)."""
        taken: list[_Waiting[Req, Resp]] = []
        size = 0
        for w in self._queue:
            size += w.request.ByteSize()
            if taken and (len(taken) >= self.max_items or size > self.max_bytes):
                break
            taken.append(w)
        del self._queue[: len(taken)]
        return taken

    async def _send_all(self) -> None:
        """Send what is queued: at once when nothing is in flight; else when a call in
        flight returns, or when the oldest queued call has waited max_wait (a slow call in
        flight, a long Finish, must not hold the others back: they go as a call of their
        own)."""
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self._in_flight:
                    wait = self._queue[0].queued + self.max_wait - loop.time()
                    if wait > 0:
                        self._returned.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._returned.wait(), wait)
                        continue
                self._in_flight += 1
                task = asyncio.ensure_future(self._send(self._take()))
                task.add_done_callback(self._sent)
                self._calls.add(task)
        finally:
            self._sender = None

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        self._in_flight -= 1
        self._returned.set()

    async def _send(self, items: list[_Waiting[Req, Resp]]) -> None:
        try:
            await self._send_items(items)
        except Exception as exc:  # a bug: each caller gets an error, none waits it out
            log.exception("batch_call_failed", peer=self.peer, what=self.what)
            _fail(items, OperationFailed(f"{self.what} '{self.peer}': internal error ({exc!r})"))

    async def _send_items(self, items: list[_Waiting[Req, Resp]]) -> None:
        items = [w for w in items if not w.future.done()]
        if not items:
            return
        if not self.supported or len(items) == 1:
            # nothing to coalesce with: the plain call, as a lone migration makes it
            await self._send_singly(items)
            return
        timeout = max(w.timeout for w in items)
        try:
            answer = await self._batch()(self._wrap([w.request for w in items]), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False  # an older dstd: single calls from now on
                await self._send_singly(items)
                return
            _fail(items, translate(err, self.peer, self.what))
            return
        except (grpc.aio.UsageError, asyncio.CancelledError) as exc:
            # the channel closed under the call (a reconnect): every item's unavailability
            if isinstance(exc, asyncio.CancelledError) and not cancelled_by_others():
                _fail(items, Timeout(f"{self.what} '{self.peer}': the call was cancelled"))
                raise
            _fail(items, channel_gone(self.peer, self.what))
            return
        self.batches_sent += 1
        if self._answered is not None:
            await self._answered()  # srcd's failpoint: killed with a batch's answers in hand
        self._deliver(items, self._unwrap(answer))

    def _deliver(self, items: list[_Waiting[Req, Resp]], results: Sequence[Any]) -> None:
        for i, w in enumerate(items):
            if w.future.done():
                continue
            if i >= len(results):
                w.future.set_exception(
                    translate_status(
                        grpc.StatusCode.INTERNAL,
                        f"{len(results)} answers to a batch of {len(items)}",
                        None,
                        self.peer,
                        self.what,
                    )
                )
            elif results[i].HasField("error"):
                st = results[i].error
                w.future.set_exception(
                    translate_status(
                        _status_code(st.code), st.message, st.error_class or None,
                        self.peer, self.what,
                    )
                )  # fmt: skip
            else:
                w.future.set_result(results[i].response)

    async def _send_singly(self, items: list[_Waiting[Req, Resp]]) -> None:
        """Each item as the single RPC, concurrently (after UNIMPLEMENTED, or alone)."""

        async def one(w: _Waiting[Req, Resp]) -> None:
            try:
                async with translated(self.peer, self.what):
                    response = await self._single()(w.request, timeout=w.timeout)
            except VmmigrateError as exc:
                _fail([w], exc)
                return
            if not w.future.done():
                w.future.set_result(response)

        await asyncio.gather(*(one(w) for w in items))


def _fail(items: Sequence[_Waiting[Req, Resp]], error: VmmigrateError) -> None:
    for w in items:
        if not w.future.done():
            w.future.set_exception(error)


def _status_code(value: int) -> grpc.StatusCode:
    code = status_code(value)
    return grpc.StatusCode.UNKNOWN if code == grpc.StatusCode.OK else code


class DestinationBatcher:
    """The Prepare and Finish lanes to one dstd (offline migrations)."""

    def __init__(
        self,
        stub: Callable[[], Any],
        *,
        peer: str,
        what: str,
        max_items: int = MAX_ITEMS,
        max_bytes: int = 4 << 20,
        answered: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        def hook(phase: str) -> Callable[[], Awaitable[None]] | None:
            return None if answered is None else lambda: answered(phase)

        self.prepare: Lane[pb.PrepareRequest, pb.PrepareResponse] = Lane(
            single=lambda: stub().Prepare,
            batch=lambda: stub().PrepareBatch,
            wrap=lambda items: pb.PrepareBatchRequest(items=items),
            unwrap=lambda answer: answer.items,
            peer=peer,
            what=what,
            max_items=max_items,
            max_bytes=max_bytes,
            answered=hook("prepare"),
        )
        self.finish: Lane[pb.FinishRequest, pb.FinishResponse] = Lane(
            single=lambda: stub().Finish,
            batch=lambda: stub().FinishBatch,
            wrap=lambda items: pb.FinishBatchRequest(items=items),
            unwrap=lambda answer: answer.items,
            peer=peer,
            what=what,
            max_items=max_items,
            max_bytes=max_bytes,
            answered=hook("finish"),
        )
