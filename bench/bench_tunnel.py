#!/usr/bin/env python3
"""Tunnel encoding micro-benchmark: raw gRPC messages (no (de)serializers, as
/vmmigrate.v1.TunnelBytes/Carry is served) against a protobuf-typed stream of
``message Chunk { bytes data = 1; }`` carrying the same bytes.

Both ends are what the daemons run, minus the migration around them: a "source" (this
process) reads an emulator's stream from a socket fed by ``dd if=/dev/zero`` and relays it
(common/tunnelwire.relay, credit window included) onto a bidirectional gRPC stream; a
"destination" (a separate process, a grpc.aio server with dstd's options and DecodeGuard
interceptor) relays what arrives into a socket drained by ``dd of=/dev/null`` and sends
credit back once per CREDIT_STEP. The two encodings are served side by side by the same
server and run alternately, --reps times each, --mib MiB per run; the table gives the
median throughput and the CPU seconds per GiB of each process, then what encoding and
decoding one 1 MiB Chunk costs in-process (the typed stream's own overhead, free of the
noise of a shared machine).

    .venv/bin/python -m bench.bench_tunnel --mib 512 --reps 5 [--json out.json]

This is a benchmark script, not a test: it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from vmmigrate.common import tunnelwire
from vmmigrate.common.decodeguard import DecodeGuard
from vmmigrate.common.rpc import SERVER_OPTIONS_BASE, message_size_options, open_channel

from vmmigrate.v1 import vmmigrate_pb2 as pb

# the proto-typed variant: a method of its own on the same server, the same Chunk both ways
PROTO_METHOD = "/bench.TunnelProto/Carry"
MAX_MESSAGE = 16 * 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def _chunk_type() -> Any:
    """``message Chunk { bytes data = 1; }``: the proto's TunnelData is exactly that."""
    return pb.TunnelData


# ---------------------------------------------------------------------------------------
# destination process


async def _sink() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    mine, theirs = socket.socketpair()
    sink = subprocess.Popen(
        ["dd", "of=/dev/null", "bs=1M", "status=none"], stdin=theirs.fileno()
    )
    theirs.close()
    tunnelwire.bounded(mine, socket.SO_SNDBUF).setblocking(False)
    return mine, sink


async def _deliver_all(
    data: AsyncIterator[bytes], credit: Any
) -> AsyncIterator[Any]:
    """dstd's pump, the data direction: relay to the sink, credit per CREDIT_STEP."""
    loop = asyncio.get_running_loop()
    sock, sink = await _sink()
    out: asyncio.Queue[Any] = asyncio.Queue()
    delivered = credited = 0

    async def deliver(chunk: bytes) -> None:
        nonlocal delivered, credited
        await loop.sock_sendall(sock, chunk)
        delivered += len(chunk)
        if delivered - credited >= tunnelwire.CREDIT_STEP:
            credited = delivered
            out.put_nowait(credit(delivered))

    async def run() -> None:
        await tunnelwire.relay(data, deliver)
        out.put_nowait(credit(delivered))
        out.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (item := await out.get()) is not None:
            yield item
        await task
    finally:
        task.cancel()
        sock.close()
        sink.wait()


async def _raw(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for msg in _deliver_all(requests, tunnelwire.credit_frame):
        yield msg


async def _typed(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    chunk = _chunk_type()

    async def data() -> AsyncIterator[bytes]:
        async for msg in requests:
            yield msg.data

    async for msg in _deliver_all(data(), lambda n: chunk(data=tunnelwire.credit_frame(n))):
        yield msg


async def serve() -> None:
    chunk = _chunk_type()
    server = grpc.aio.server(
        interceptors=[DecodeGuard()],
        options=SERVER_OPTIONS_BASE + message_size_options(MAX_MESSAGE),
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                tunnelwire.SERVICE, {"Carry": grpc.stream_stream_rpc_method_handler(_raw)}
            ),
            grpc.method_handlers_generic_handler(
                "bench.TunnelProto",
                {
                    "Carry": grpc.stream_stream_rpc_method_handler(
                        _typed,
                        request_deserializer=chunk.FromString,
                        response_serializer=chunk.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
    await server.stop(grace=None)


# ---------------------------------------------------------------------------------------
# source side (this process)


async def _source(channel: grpc.aio.Channel, typed: bool, mib: int) -> int:
    """srcd's side: dd -> socket -> relay -> gRPC, within the credit window."""
    chunk = _chunk_type()
    if typed:
        call = channel.stream_stream(
            PROTO_METHOD,
            request_serializer=chunk.SerializeToString,
            response_deserializer=chunk.FromString,
        )()
    else:
        call = channel.stream_stream(tunnelwire.METHOD)()
    mine, theirs = socket.socketpair()
    feed = subprocess.Popen(
        ["dd", "if=/dev/zero", "bs=1M", f"count={mib}", "status=none"], stdout=theirs.fileno()
    )
    theirs.close()
    tunnelwire.bounded(mine, socket.SO_RCVBUF).setblocking(False)
    loop = asyncio.get_running_loop()
    sent = acked = 0
    event = asyncio.Event()

    async def credit() -> None:
        nonlocal acked
        async for msg in call:
            _, acked = tunnelwire.parse_frame(msg.data if typed else msg)  # type: ignore[assignment]
            event.set()

    reader = asyncio.ensure_future(credit())

    async def send(data: bytes) -> None:
        nonlocal sent
        while sent - acked >= tunnelwire.CREDIT_WINDOW:
            event.clear()
            await event.wait()
        sent += len(data)
        await call.write(chunk(data=data) if typed else data)

    try:
        await tunnelwire.relay(tunnelwire.socket_chunks(loop, mine), send)
        await call.done_writing()
        await reader
    finally:
        mine.close()
        feed.wait()
    assert acked == sent == mib * 1024 * 1024, (acked, sent)
    return sent


def codec_cost(n: int = 1000) -> dict[str, float]:
    """What the typed stream adds per 1 MiB message, in-process: encoding on the source,
    decoding and reading ``.data`` on the destination (microseconds, median of 5)."""
    chunk = _chunk_type()
    payload = b"\xab" * tunnelwire.CHUNK
    wire = chunk(data=payload).SerializeToString()
    enc, dec = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            chunk(data=payload).SerializeToString()
        t1 = time.perf_counter()
        for _ in range(n):
            _ = chunk.FromString(wire).data
        t2 = time.perf_counter()
        enc.append((t1 - t0) / n * 1e6)
        dec.append((t2 - t1) / n * 1e6)
    return {"encode_us_per_mib": statistics.median(enc), "decode_us_per_mib": statistics.median(dec)}


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    port = int(server.stdout.readline())
    channel = open_channel(f"127.0.0.1:{port}", max_message_bytes=MAX_MESSAGE)
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "proto": []}
    try:
        for typed in (False, True):  # warm-up, untimed
            await _source(channel, typed, 64)
        for _ in range(args.reps):
            for name, typed in (("raw", False), ("proto", True)):
                c0, s0, t0 = time.process_time(), _cpu(server.pid), time.perf_counter()
                total = await _source(channel, typed, args.mib)
                wall = time.perf_counter() - t0
                gib = total / 2**30
                runs[name].append(
                    {
                        "MBps": total / wall / 1e6,
                        "src_cpu_per_gib": (time.process_time() - c0) / gib,
                        "dst_cpu_per_gib": (_cpu(server.pid) - s0) / gib,
                    }
                )
    finally:
        await channel.close()
        server.stdin.close()
        server.wait(10)
    return {
        "codec": codec_cost(),
        "mib": args.mib,
        "reps": args.reps,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "grpcio": grpc.__version__},
        "runs": runs,
        "median": {
            name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for name, rs in runs.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=512, help="MiB per run (default 512)")
    p.add_argument("--reps", type=int, default=5, help="runs of each encoding (default 5)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    result = asyncio.run(measure(args))
    print(f"{args.mib} MiB per run, {args.reps} runs each, medians:")
    print(f"{'encoding':10} {'MB/s':>8} {'src CPU s/GiB':>14} {'dst CPU s/GiB':>14}")
    for name, m in result["median"].items():
        print(f"{name:10} {m['MBps']:8.0f} {m['src_cpu_per_gib']:14.3f} {m['dst_cpu_per_gib']:14.3f}")
    for name, rs in result["runs"].items():
        print(name, "runs MB/s:", " ".join(f"{r['MBps']:.0f}" for r in rs))
    c = result["codec"]
    print(f"typed stream's own cost per 1 MiB message: encode {c['encode_us_per_mib']:.0f} us, "
          f"decode + .data {c['decode_us_per_mib']:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
