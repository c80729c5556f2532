"""dstd's batch calls (PrepareBatch, FinishBatch): each item handled as its single RPC
would handle it, all of them concurrently, and answered on its own: its response, or the
status the single RPC would have ended with (code, message, error class), never another
item's. Concurrent items meet in the store's group commits (dstd/context.py), so a batch of
Finishes writes its definitions and its outcomes with one flush each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from vmmigrate.common.daemon import count_refusal
from vmmigrate.common.errors import InvalidArgument, VmmigrateError
from vmmigrate.common.rpc import item_status

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.destination")

MAX_BATCH_ITEMS = 512  # items per batch call (srcd sends at most 64)

Item = TypeVar("Item", pb.PrepareRequest, pb.FinishRequest)
Answer = TypeVar("Answer", pb.PrepareResponse, pb.FinishResponse)


async def run_items(
    service: Any,
    rpc: str,
    items: Sequence[Item],
    run: Callable[[Item], Awaitable[Answer]],
) -> list[Answer | pb.ItemStatus]:
    """``run`` each item concurrently; its answer or its error's status, in order."""
    if not items:
        raise InvalidArgument(f"{rpc}Batch with no items")
    if len(items) > MAX_BATCH_ITEMS:
        raise InvalidArgument(
            f"{rpc}Batch with {len(items)} items (at most {MAX_BATCH_ITEMS} per call)"
        )

    async def one(item: Item) -> Answer | pb.ItemStatus:
        mid = item.header.migration_id or None
        with structlog.contextvars.bound_contextvars(rpc=rpc, migration_id=mid, batch=True):
            try:
                return await run(item)
            except Exception as exc:
                count_refusal(service, exc)
                if isinstance(exc, VmmigrateError):
                    log.info("rpc_failed", code=exc.code.name, error=exc.message)
                else:
                    log.exception("rpc_crashed")
                return item_status(exc)

    return list(await asyncio.gather(*(one(item) for item in items)))
