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

--modes plain,tls (or --tls) carries the same stream over mutual TLS as well: the server
listens on a second, TLS port with dstd's credentials (common/tls.TlsFiles, a client
certificate required), the source connects as srcd does (open_channel with its host
certificate), both certificates issued by a CA made in a temporary directory
(vmmigrate.migctl.certs). The modes run alternately in the same invocation (the order
flips every repetition, so a drift of the machine's load falls on both), and the table
adds the tls/plain ratio of each figure. dstd's AuthInterceptor is left out: it acts once
per call, not per message. With TLS only the raw encoding runs unless --encodings says
otherwise (it is what the daemons carry).

    .venv/bin/python -m bench.bench_tunnel --mib 512 --reps 5 [--json out.json]
    .venv/bin/python -m bench.bench_tunnel --mib 256 --reps 5 --modes plain,tls

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
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from vmmigrate.common import tunnelwire
from vmmigrate.common.decodeguard import DecodeGuard
from vmmigrate.common.rpc import SERVER_OPTIONS_BASE, message_size_options, open_channel
from vmmigrate.common.tls import TlsFiles

from vmmigrate.v1 import vmmigrate_pb2 as pb

# the proto-typed variant: a method of its own on the same server, the same Chunk both ways
PROTO_METHOD = "/bench.TunnelProto/Carry"
MAX_MESSAGE = 16 * 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")
MODES = ("plain", "tls")
ENCODINGS = {"raw": False, "proto": True}  # name -> typed
LOOPBACK = "127.0.0.1"


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


async def serve(tls_dir: str | None) -> None:
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
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    # dstd's TLS port: the same server object, the credentials dstd builds (client
    # certificate required, checked against the CA)
    tls_port = 0
    if tls_dir is not None:
        creds = TlsFiles(Path(tls_dir)).server_credentials()
        tls_port = server.add_secure_port(f"{LOOPBACK}:0", creds)
    await server.start()
    print(port, tls_port, flush=True)
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


def make_pki(root: Path) -> tuple[Path, Path]:
    """A CA and two host certificates for 127.0.0.1: the source's (srcd presents its host
    certificate as client certificate) and the destination's."""
    from vmmigrate.migctl import certs

    certs.init_ca(root / "ca")
    for side in ("src", "dst"):
        certs.issue_host(root / "ca", name=f"bench-{side}", ips=[LOOPBACK], out=root / side)
    return root / "src", root / "dst"


def _one_run(
    server_pid: int, total: int, wall: float, c0: float, s0: float
) -> dict[str, float]:
    gib = total / 2**30
    return {
        "MBps": total / wall / 1e6,
        "src_cpu_per_gib": (time.process_time() - c0) / gib,
        "dst_cpu_per_gib": (_cpu(server_pid) - s0) / gib,
    }


async def _runs(
    channels: dict[str, grpc.aio.Channel], encodings: list[str], args: argparse.Namespace,
    server_pid: int,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """--reps rounds; each round every mode and encoding once, the modes' order flipped
    every other round (plain, tls, tls, plain, ...)."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        m: {e: [] for e in encodings} for m in channels
    }
    for channel in channels.values():  # warm-up, untimed: connection, TLS handshake
        for enc in encodings:
            await _source(channel, ENCODINGS[enc], 64)
    order = list(channels)
    for rep in range(args.reps):
        for mode in order if rep % 2 == 0 else order[::-1]:
            for enc in encodings:
                c0, s0, t0 = time.process_time(), _cpu(server_pid), time.perf_counter()
                total = await _source(channels[mode], ENCODINGS[enc], args.mib)
                wall = time.perf_counter() - t0
                runs[mode][enc].append(_one_run(server_pid, total, wall, c0, s0))
    return runs


def _medians(
    runs: dict[str, dict[str, list[dict[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    return {
        mode: {enc: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for enc, rs in by_enc.items()}
        for mode, by_enc in runs.items()
    }


def _ratios(median: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """tls / plain of every figure, per encoding (needs both modes)."""
    if not all(m in median for m in MODES):
        return {}
    return {
        enc: {k: median["tls"][enc][k] / median["plain"][enc][k] for k in figures}
        for enc, figures in median["plain"].items()
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmm-bench-tunnel-") as tmp:
        src_tls = dst_tls = None
        if "tls" in args.modes:
            src_tls, dst_tls = make_pki(Path(tmp))
        argv = [sys.executable, __file__, "--serve"]
        if dst_tls is not None:
            argv += ["--tls-dir", str(dst_tls)]
        server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdin is not None
        port, tls_port = (int(x) for x in server.stdout.readline().split())
        channels: dict[str, grpc.aio.Channel] = {}
        try:
            for mode in args.modes:  # srcd's channel to dstd: its options, its credentials
                tls = TlsFiles(src_tls) if mode == "tls" and src_tls is not None else None
                address = f"{LOOPBACK}:{tls_port if tls is not None else port}"
                channels[mode] = open_channel(address, max_message_bytes=MAX_MESSAGE, tls=tls)
            runs = await _runs(channels, args.encodings, args, server.pid)
        finally:
            for ch in channels.values():
                await ch.close()
            server.stdin.close()
            server.wait(10)
    median = _medians(runs)
    return {
        "codec": codec_cost(),
        "mib": args.mib,
        "reps": args.reps,
        "modes": args.modes,
        "encodings": args.encodings,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "grpcio": grpc.__version__},
        "loadavg": os.getloadavg(),
        "runs": runs,
        "median": median,
        "ratio_tls_plain": _ratios(median),
    }


def _report(result: dict[str, Any]) -> None:
    print(f"{result['mib']} MiB per run, {result['reps']} runs each, medians:")
    print(f"{'mode':9} {'encoding':10} {'MB/s':>8} {'src CPU s/GiB':>14} {'dst CPU s/GiB':>14}")
    for mode, by_enc in result["median"].items():
        for enc, m in by_enc.items():
            print(f"{mode:9} {enc:10} {m['MBps']:8.0f} {m['src_cpu_per_gib']:14.3f} "
                  f"{m['dst_cpu_per_gib']:14.3f}")
    for enc, r in result["ratio_tls_plain"].items():
        print(f"{'tls/plain':9} {enc:10} {r['MBps']:8.2f} {r['src_cpu_per_gib']:14.2f} "
              f"{r['dst_cpu_per_gib']:14.2f}")
    for mode, by_enc in result["runs"].items():
        for enc, rs in by_enc.items():
            print(mode, enc, "runs MB/s:", " ".join(f"{r['MBps']:.0f}" for r in rs))
    c = result["codec"]
    print(f"typed stream's own cost per 1 MiB message: encode {c['encode_us_per_mib']:.0f} us, "
          f"decode + .data {c['decode_us_per_mib']:.0f} us")
    print("load average:", " ".join(f"{x:.2f}" for x in result["loadavg"]))


def _names(value: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    names = [v for v in value.split(",") if v]
    bad = [v for v in names if v not in allowed]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(allowed)}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=512, help="MiB per run (default 512)")
    p.add_argument("--reps", type=int, default=5, help="runs of each encoding (default 5)")
    p.add_argument(
        "--modes",
        type=lambda v: _names(v, MODES),
        default=None,
        help="channels to run, alternately: plain, tls or plain,tls (default plain)",
    )
    p.add_argument("--tls", action="store_true", help="the same as --modes plain,tls")
    p.add_argument(
        "--encodings",
        type=lambda v: _names(v, list(ENCODINGS)),
        default=None,
        help="raw, proto or raw,proto (default: raw,proto in plaintext only, else raw)",
    )
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tls-dir", help=argparse.SUPPRESS)  # the server's, with --serve
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.tls_dir))
        return
    if args.tls and args.modes not in (None, list(MODES)):
        p.error("--tls is --modes plain,tls: give one or the other")
    args.modes = list(MODES) if args.tls else args.modes or ["plain"]
    if args.encodings is None:
        args.encodings = list(ENCODINGS) if args.modes == ["plain"] else ["raw"]
    result = asyncio.run(measure(args))
    _report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
