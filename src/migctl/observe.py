"""migctl's observability commands (event, jobs) and the --json forms of list, dominfo,
domjobinfo: one JSON document per command, one JSON object per line for event."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import enum
import json
import signal
import sys
from collections.abc import Coroutine, Mapping
from typing import Any

from vmmigrate.common.errors import InvalidArgument
from vmmigrate.common.rpc import translated

from vmmigrate.v1 import vmmigrate_pb2 as pb

CALL_TIMEOUT = 30.0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("event", help="watch the host's domain lifecycle events")
    p.add_argument("--domain", help="only this domain's events (name or UUID)")
    p.add_argument("--event", choices=["lifecycle"], help="the event type (lifecycle only)")
    p.add_argument("--loop", action="store_true", help="go on after the first event")
    p.add_argument("--timeout", type=int, metavar="S", help="stop after S seconds")
    p.add_argument("--timestamp", action="store_true", help="prefix each line with its time")
    p.add_argument("--json", action="store_true", help="one JSON object per event, per line")
    p = sub.add_parser("jobs", help="past migrations on this host (both roles)")
    p.add_argument("--domain", help="only this domain's migrations (name or UUID)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="the newest N only")
    p.add_argument("--json", action="store_true", help="one JSON document")


def dump(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def message_dict(msg: Any) -> dict[str, Any]:
    """A message as JSON: field names as in the proto, every field present, 64-bit
    integers as numbers (not proto3 JSON's strings: a script reads them as numbers)."""
    # imported for --json only: json_format costs every migctl start ~20 ms otherwise
    from google.protobuf.json_format import MessageToDict  # noqa: PLC0415

    doc = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _ints(msg, doc)


def _ints(msg: Any, doc: dict[str, Any]) -> dict[str, Any]:
    for field in msg.DESCRIPTOR.fields:
        value = doc.get(field.name)
        if isinstance(value, str) and field.cpp_type in (
            field.CPPTYPE_INT64,
            field.CPPTYPE_UINT64,
        ):
            doc[field.name] = int(value)
    return doc


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat(timespec="milliseconds")


class LoopEnd(enum.Enum):
    """How an event loop ended (virsh's vshEventWait results)."""

    DONE = "done"  # the first event without --loop, or the stream ended
    TIMEOUT = "timeout"  # --timeout passed
    INTERRUPT = "interrupt"  # Ctrl-C (SIGINT)


async def cmd_event(a: argparse.Namespace, s: Any) -> int:
    """virsh event --event lifecycle: a server stream, ended after the first event unless
    --loop, after --timeout seconds, or by Ctrl-C. As virsh, the exit status is 0 when at
    least one event arrived, 1 otherwise (without an error message)."""
    if a.timeout is not None and a.timeout < 1:
        raise InvalidArgument("event: Invalid timeout")
    count = 0

    async def follow() -> None:
        nonlocal count
        stream = s.dom.Events(pb.EventsRequest(domain=a.domain or ""))
        try:
            async with translated(s.address, "daemon"):
                async for ev in stream:
                    count += 1
                    _print_event(a, ev)
                    if not a.loop:
                        return
        finally:
            stream.cancel()

    end = await until_end(follow(), a.timeout)
    if not a.json:
        if end is LoopEnd.INTERRUPT:
            print("event loop interrupted")
        elif end is LoopEnd.TIMEOUT:
            print("event loop timed out")
        print(f"events received: {count}", flush=True)
    return 0 if count else 1


async def until_end(work: Coroutine[Any, Any, None], timeout: float | None) -> LoopEnd:
    """Run ``work`` until it returns (its errors raised), ``timeout`` seconds pass or SIGINT
    arrives; the handler is installed before ``work`` starts and removed afterwards (Ctrl-C
    is then Python's KeyboardInterrupt again)."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(interrupted.wait())
    try:
        done, _ = await asyncio.wait(
            [task, waiter], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if task in done:
        task.result()
        return LoopEnd.DONE
    return LoopEnd.INTERRUPT if interrupted.is_set() else LoopEnd.TIMEOUT


def _print_event(a: argparse.Namespace, ev: pb.DomainEvent) -> None:
    if a.json:
        print(json.dumps(message_dict(ev), sort_keys=True), flush=True)
        return
    line = f"event 'lifecycle' for domain '{ev.domain}': {ev.event} {ev.detail}"
    if a.timestamp:
        line = f"{_when(ev.time_unix)}: {line}"
    print(line, flush=True)


async def cmd_jobs(a: argparse.Namespace, s: Any) -> None:
    if a.limit < 0:
        raise InvalidArgument("jobs: Invalid limit")
    request = pb.ListJobsRequest(domain=a.domain or "", limit=a.limit)
    r = await s.rpc(s.dom.ListJobs, request)
    if a.json:
        dump([message_dict(j) for j in r.jobs])
        return
    _print_jobs(list(r.jobs))


def _print_jobs(jobs: list[pb.JobRecord]) -> None:
    cols = (
        "Migration ID",
        "Domain",
        "Role",
        "Peer",
        "Kind",
        "Mode",
        "Result",
        "Started",
        "Ended",
        "Bytes",
    )
    rows = [
        (
            j.migration_id,
            j.domain,
            j.role,
            j.peer or "-",
            j.kind,
            j.mode,
            j.result,
            _when(j.started_unix),
            _when(j.ended_unix),
            str(j.bytes),
        )
        for j in jobs
    ]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    header = " " + "   ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    print(header.rstrip())
    print("-" * (len(header) + 2))
    for row, job in zip(rows, jobs, strict=True):
        print((" " + "   ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))).rstrip())
        if job.error:
            print(f"   error: {job.error}")
    print()


def list_json(rows: list[pb.ListEntry], states: Mapping[Any, str]) -> None:
    dump(
        [
            {
                "id": None if e.domain.id < 0 else e.domain.id,
                "name": e.domain.name,
                "uuid": e.domain.uuid,
                "state": states.get(e.state, "no state"),
            }
            for e in rows
        ]
    )


def dominfo_json(r: pb.InfoResponse, states: Mapping[Any, str]) -> None:
    doc = message_dict(r)
    doc["state"] = states.get(r.state, "no state")
    doc["domain"]["id"] = None if r.domain.id < 0 else r.domain.id
    dump(doc)


def jobinfo_json(info: pb.JobInfo) -> None:
    doc = message_dict(info)
    doc["type"] = info.type or "None"
    dump(doc)
