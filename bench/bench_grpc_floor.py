#!/usr/bin/env python3
"""The floor under an offline p2p migration's latency on this stack (grpcio's asyncio API,
CPython): the same call shape with no work in it. A client calls A (srcd's Migrate); A's
handler calls B twice in sequence (dstd's Prepare and Finish) and answers. Each party is a
process of its own on loopback, as the daemons are; messages are a few hundred bytes and
are not protobuf-decoded. ``--shape client``: the client-driven sequence instead, the
client calling A's Begin, B's Prepare, B's Finish and A's Confirm itself. ``--fsync`` adds the three flushes a migration cannot skip (the
destination's definition, file and directory; the source's undefine, directory), each as
its own fsync on the machine's disk, in the handlers that would do them.

    .venv/bin/python -m bench.bench_grpc_floor [--n 2000] [--shape p2p|client] [--fsync]
        [--json PATH]

Whatever our daemons do beyond this is ours to cut; this much is not, while the daemons
are Python on grpc.aio (docs/PERFORMANCE.md, "Issue 12's targets").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "floor.Floor"
PAYLOAD = b"x" * 400  # about a small domain XML's cookie-and-header share of a request


def _ident(b: bytes) -> bytes:
    return b


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _flush(directory: str, with_file: bool) -> None:
    """One durable write (file then directory), or a directory flush alone."""
    if with_file:
        path = os.path.join(directory, "def.xml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, PAYLOAD)
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


async def _serve(address: str, methods: dict[str, Handler]) -> None:
    """Serve ``methods`` (bytes in, bytes out) on ``address``; print the port once up."""
    server = grpc.aio.server()
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn, _ident, _ident)
        for name, fn in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{address}:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _echo(fsync_dir: str | None = None, with_file: bool = False) -> Handler:
    """A handler answering with its request, after a flush in ``fsync_dir`` if given."""

    async def handle(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        if fsync_dir:
            await asyncio.to_thread(_flush, fsync_dir, with_file)
        return req

    return handle


async def _serve_b(fsync_dir: str | None) -> None:
    await _serve("127.0.0.3", {"Prepare": _echo(), "Finish": _echo(fsync_dir, with_file=True)})


async def _serve_a(b_port: int, fsync_dir: str | None) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.3:{b_port}")
    prepare = channel.unary_unary(_method("Prepare"), _ident, _ident)
    finish = channel.unary_unary(_method("Finish"), _ident, _ident)

    async def migrate(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        await prepare(req, timeout=10)
        out: bytes = await finish(req, timeout=10)
        if fsync_dir:
            await asyncio.to_thread(_flush, fsync_dir, False)
        return out

    await _serve("127.0.0.2", {"Migrate": migrate, "Begin": _echo(), "Confirm": _echo(fsync_dir)})


def _party(role: str, b_port: int, fsync_dir: str | None) -> tuple[subprocess.Popen[str], int]:
    """Start A or B as a process of its own; it prints its port once it serves."""
    cmd = [sys.executable, "-m", "bench.bench_grpc_floor", "--role", role, "--b-port", str(b_port)]
    if fsync_dir:
        cmd += ["--flush-dir", fsync_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"floor party {role} did not start (exit {proc.poll()})")
    return proc, int(line)


async def _client(a_port: int, b_port: int, shape: str, n: int, warmup: int) -> list[float]:
    async with (
        grpc.aio.insecure_channel(f"127.0.0.2:{a_port}") as to_a,
        grpc.aio.insecure_channel(f"127.0.0.3:{b_port}") as to_b,
    ):
        if shape == "p2p":
            steps = [to_a.unary_unary(_method("Migrate"), _ident, _ident)]
        else:
            steps = [
                to_a.unary_unary(_method("Begin"), _ident, _ident),
                to_b.unary_unary(_method("Prepare"), _ident, _ident),
                to_b.unary_unary(_method("Finish"), _ident, _ident),
                to_a.unary_unary(_method("Confirm"), _ident, _ident),
            ]
        times: list[float] = []
        for i in range(warmup + n):
            t = time.perf_counter()
            for step in steps:
                await step(PAYLOAD, timeout=10)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
        return times


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * p / 100))], 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--shape", choices=("p2p", "client"), default="p2p")
    ap.add_argument("--fsync", action="store_true", help="add the three flushes (see above)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--role", choices=("a", "b"), help=argparse.SUPPRESS)  # a party's process
    ap.add_argument("--b-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--flush-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "b":
        asyncio.run(_serve_b(args.flush_dir))
        return 0
    if args.role == "a":
        asyncio.run(_serve_a(args.b_port, args.flush_dir))
        return 0
    with tempfile.TemporaryDirectory(prefix="vmm-floor-", dir=ROOT) as work:
        dirs = [os.path.join(work, d) for d in ("a", "b")]
        for d in dirs:
            os.mkdir(d)
        fs_a, fs_b = (dirs[0], dirs[1]) if args.fsync else (None, None)
        started: list[subprocess.Popen[str]] = []
        try:
            b, b_port = _party("b", 0, fs_b)
            started.append(b)
            a, a_port = _party("a", b_port, fs_a)
            started.append(a)
            times = asyncio.run(_client(a_port, b_port, args.shape, args.n, args.warmup))
        finally:
            for p in started:  # the processes this run started, by their Popen
                p.terminate()
                p.wait(10)
                if p.stdout is not None:
                    p.stdout.close()
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "shape": args.shape,
        "fsync": args.fsync,
        "n": args.n,
        "p50_ms": pct(times, 50),
        "p90_ms": pct(times, 90),
        "p99_ms": pct(times, 99),
        "min_ms": round(min(times), 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
