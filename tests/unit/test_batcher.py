"""srcd's per-destination batcher (srcd/batcher.py) against a fake dstd stub: a lone call
goes at once as the single RPC; calls made while one is in flight coalesce into one batch;
one item's error is that item's only (rebuilt as the single RPC's error would be); a batch
call that fails is every item's failure; UNIMPLEMENTED falls back to single calls; a caller
keeps its own deadline. And dstd's side: batch items answered with their own status."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from vmmigrate.common.errors import (
    ERROR_CLASS_KEY,
    DomainExists,
    OperationInvalid,
    PeerUnavailable,
    Timeout,
)
from vmmigrate.dstd import batch
from vmmigrate.srcd.batcher import DestinationBatcher

from vmmigrate.v1 import vmmigrate_pb2 as pb

PEER = "10.0.0.2:7302"


def _req(mid: str) -> pb.FinishRequest:
    return pb.FinishRequest(header=pb.PhaseHeader(migration_id=mid), dest_name=mid)


def _answer(mid: str) -> pb.FinishResponse:
    return pb.FinishResponse(domain=pb.DomainRef(name=mid, uuid=f"u-{mid}", id=-1))


def _rpc_error(code: grpc.StatusCode, details: str, cls: str = "") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((ERROR_CLASS_KEY, cls)) if cls else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details, None)


class FakeDstd:
    """Finish / FinishBatch of a fake dstd: each call takes ``delay`` seconds; migration ids
    in ``refuse`` fail with DomainExists; ``batch_error`` fails every batch call."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.singles: list[str] = []
        self.batches: list[list[str]] = []
        self.refuse: set[str] = set()
        self.batch_error: grpc.aio.AioRpcError | None = None
        self.timeouts: list[float] = []

    async def Finish(self, request: pb.FinishRequest, *, timeout: float) -> pb.FinishResponse:
        mid = request.header.migration_id
        self.singles.append(mid)
        self.timeouts.append(timeout)
        await asyncio.sleep(self.delay)
        if mid in self.refuse:
            raise _rpc_error(grpc.StatusCode.ALREADY_EXISTS, f"domain '{mid}' exists", "DomainExists")
        return _answer(mid)

    async def FinishBatch(
        self, request: pb.FinishBatchRequest, *, timeout: float
    ) -> pb.FinishBatchResponse:
        self.batches.append([r.header.migration_id for r in request.items])
        self.timeouts.append(timeout)
        await asyncio.sleep(self.delay)
        if self.batch_error is not None:
            raise self.batch_error
        items = []
        for r in request.items:
            mid = r.header.migration_id
            if mid in self.refuse:
                items.append(pb.FinishBatchItem(error=batch.item_status(
                    DomainExists(f"domain '{mid}' exists"))))
            else:
                items.append(pb.FinishBatchItem(response=_answer(mid)))
        return pb.FinishBatchResponse(items=items)


def _batcher(dstd: Any, **kw: Any) -> DestinationBatcher:
    b = DestinationBatcher(lambda: dstd, peer=PEER, what="destination host", **kw)
    # these tests are about coalescing: queued calls wait for the one in flight, however
    # slow the machine (test_a_slow_call_in_flight_holds_the_others_back_max_wait_only)
    b.prepare.max_wait = b.finish.max_wait = 5.0
    return b


def test_a_lone_call_goes_at_once_as_the_single_rpc() -> None:
    dstd = FakeDstd()
    b = _batcher(dstd)

    async def go() -> pb.FinishResponse:
        return await b.finish(_req("m1"), timeout=5.0)

    answer = asyncio.run(go())
    assert answer == _answer("m1")
    assert dstd.singles == ["m1"] and dstd.batches == []
    assert dstd.timeouts == [5.0]  # the caller's own deadline, unchanged


def test_concurrent_calls_coalesce_while_one_is_in_flight() -> None:
    dstd = FakeDstd()
    b = _batcher(dstd)

    async def go() -> list[pb.FinishResponse]:
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)  # m0 is in flight: the next ones queue
        rest = [b.finish(_req(f"m{i}"), timeout=5.0 + i) for i in range(1, 9)]
        return [await first, *await asyncio.gather(*rest)]

    answers = asyncio.run(go())
    assert answers == [_answer(f"m{i}") for i in range(9)]
    assert dstd.singles == ["m0"]
    assert dstd.batches == [[f"m{i}" for i in range(1, 9)]]
    assert dstd.timeouts[-1] == 13.0  # the batch call's deadline: the longest of its items'


def test_batches_are_capped_at_max_items() -> None:
    dstd = FakeDstd()
    b = _batcher(dstd, max_items=3)

    async def go() -> None:
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)
        await asyncio.gather(first, *(b.finish(_req(f"m{i}"), timeout=5.0) for i in range(1, 8)))

    asyncio.run(go())
    assert dstd.batches == [["m1", "m2", "m3"], ["m4", "m5", "m6"]]
    assert dstd.singles == ["m0", "m7"]  # a batch of one is the single RPC


def test_one_items_error_does_not_fail_the_others() -> None:
    dstd = FakeDstd()
    dstd.refuse = {"m2"}
    b = _batcher(dstd)

    async def go() -> list[Any]:
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)
        rest = [b.finish(_req(f"m{i}"), timeout=5.0) for i in range(1, 4)]
        return [await first, *await asyncio.gather(*rest, return_exceptions=True)]

    results = asyncio.run(go())
    assert dstd.batches == [["m1", "m2", "m3"]]
    assert results[1] == _answer("m1") and results[3] == _answer("m3")
    err = results[2]
    # exactly the error the single RPC would have raised: its class, code and message
    assert isinstance(err, DomainExists) and str(err) == "domain 'm2' exists"


def test_a_failed_batch_call_is_every_items_failure() -> None:
    dstd = FakeDstd()
    dstd.batch_error = _rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    b = _batcher(dstd)

    async def go() -> list[Any]:
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)
        rest = [b.finish(_req(f"m{i}"), timeout=5.0) for i in range(1, 4)]
        return [await first, *await asyncio.gather(*rest, return_exceptions=True)]

    results = asyncio.run(go())
    assert results[0] == _answer("m0")
    for err in results[1:]:
        assert isinstance(err, PeerUnavailable)
        assert str(err) == f"unable to connect to destination host '{PEER}': Socket closed"


def test_unimplemented_falls_back_to_single_calls() -> None:
    dstd = FakeDstd()
    dstd.batch_error = _rpc_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    b = _batcher(dstd)

    async def go() -> list[pb.FinishResponse]:
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)
        rest = [b.finish(_req(f"m{i}"), timeout=5.0) for i in range(1, 4)]
        got = [await first, *await asyncio.gather(*rest)]
        # from now on: single calls only, no batch call tried again
        got += await asyncio.gather(*(b.finish(_req(f"n{i}"), timeout=5.0) for i in range(3)))
        return got

    answers = asyncio.run(go())
    assert answers == [_answer(f"m{i}") for i in range(4)] + [_answer(f"n{i}") for i in range(3)]
    assert len(dstd.batches) == 1  # tried once
    assert not b.finish.supported
    assert sorted(dstd.singles) == sorted(["m0", "m1", "m2", "m3", "n0", "n1", "n2"])


def test_a_caller_keeps_its_own_deadline() -> None:
    dstd = FakeDstd(delay=0.3)
    b = _batcher(dstd)

    async def go() -> None:
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)
        with pytest.raises(Timeout, match="did not answer before the deadline"):
            await b.finish(_req("m1"), timeout=0.05)
        await first

    asyncio.run(go())
    # m1's caller gave up while it was queued: it is never sent
    assert dstd.singles == ["m0"] and dstd.batches == []


def test_a_slow_call_in_flight_holds_the_others_back_max_wait_only() -> None:
    """A Finish in flight that takes long (dstd waits for a live stream, or is slow): the
    calls queued behind it go as a call of their own once the oldest waited max_wait."""
    dstd = FakeDstd(delay=1.0)
    b = DestinationBatcher(lambda: dstd, peer=PEER, what="destination host")
    b.finish.max_wait = 0.05

    async def go() -> float:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(b.finish(_req("m0"), timeout=5.0))
        await asyncio.sleep(0.005)
        t0 = loop.time()
        rest = asyncio.gather(*(b.finish(_req(f"m{i}"), timeout=5.0) for i in range(1, 4)))
        await asyncio.sleep(0.5)  # well before m0's answer
        sent_early = dstd.batches == [["m1", "m2", "m3"]]
        await asyncio.gather(first, rest)
        assert sent_early, dstd.batches
        return loop.time() - t0

    took = asyncio.run(go())
    assert took < 1.9  # not m0's second plus theirs


def test_dstd_answers_each_item_with_its_own_status() -> None:
    async def run(item: pb.FinishRequest) -> pb.FinishResponse:
        mid = item.header.migration_id
        if mid == "bad":
            raise OperationInvalid("domain 'bad' is not processing incoming migration")
        if mid == "crash":
            raise RuntimeError("boom")
        return _answer(mid)

    items = [_req("ok1"), _req("bad"), _req("crash"), _req("ok2")]
    got = asyncio.run(batch.run_items(object(), "Finish", items, run))
    assert got[0] == _answer("ok1") and got[3] == _answer("ok2")
    assert got[1] == pb.ItemStatus(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
        message="domain 'bad' is not processing incoming migration",
        error_class="OperationInvalid",
    )
    assert isinstance(got[2], pb.ItemStatus)
    assert got[2].code == grpc.StatusCode.INTERNAL.value[0] and got[2].error_class == ""


def test_dstd_refuses_an_empty_or_oversized_batch() -> None:
    async def run(item: pb.FinishRequest) -> pb.FinishResponse:
        return _answer(item.header.migration_id)

    with pytest.raises(Exception, match="with no items"):
        asyncio.run(batch.run_items(object(), "Finish", [], run))
    many = [_req(f"m{i}") for i in range(batch.MAX_BATCH_ITEMS + 1)]
    with pytest.raises(Exception, match="at most"):
        asyncio.run(batch.run_items(object(), "Finish", many, run))
