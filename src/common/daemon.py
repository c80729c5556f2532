"""What both daemons share: main() (options, logging, signals, the ready line) and the gRPC
shell (error translation, health checking, housekeeping, graceful stop)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from vmmigrate.common import sdnotify
from vmmigrate.common.authz import AuthInterceptor, Policy
from vmmigrate.common.config import (
    DaemonConfig,
    add_common_options,
    default_config_file,
    load_config,
)
from vmmigrate.common.decodeguard import DecodeGuard
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.failpoints import ENV_VAR, SEED_VAR, Failpoints
from vmmigrate.common.interceptor import OnRefused
from vmmigrate.common.log import setup_logging
from vmmigrate.common.rpc import SERVER_OPTIONS_BASE, message_size_options, status_of
from vmmigrate.common.shutdown import ShutdownGate
from vmmigrate.common.tls import TlsFiles
from vmmigrate.common.version import add_version_option

# Where an installed daemon finds its configuration when no --config is given, as libvirtd
# reads /etc/libvirt/libvirtd.conf: /etc/vmmigrate/srcd.toml and /etc/vmmigrate/dstd.toml.
DEFAULT_CONFIG_DIR = Path("/etc/vmmigrate")

ServerFactory = Callable[[DaemonConfig], contextlib.AbstractAsyncContextManager[Any]]


def daemon_main(
    prog: str,
    *,
    description: str,
    default_port: int,
    server_factory: ServerFactory,
    failpoint_names: tuple[str, ...],
    extra_options: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
    config_dir: Path = DEFAULT_CONFIG_DIR,
) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    add_version_option(ap, prog)
    add_common_options(ap)
    if extra_options is not None:
        extra_options(ap)
    ap.add_argument(
        "--list-failpoints", action="store_true", help="print every failpoint name and exit"
    )
    args = ap.parse_args(argv)
    if args.list_failpoints:
        for name in failpoint_names:
            print(name)
        return 0
    try:
        args.failpoints = os.environ.get(ENV_VAR, "")
        args.failpoint_seed = os.environ.get(SEED_VAR, "")
        Failpoints.parse(args.failpoints)
        # no --config: the host's default file, when there is one
        config_file = args.config or default_config_file(config_dir / f"{prog}.toml")
        config = load_config(args, default_port=default_port, config_file=config_file)
    except VmmigrateError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    try:
        asyncio.run(_serve(prog, config, server_factory))
    except VmmigrateError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # grpc: cannot bind the listen address
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def release_freed_memory() -> None:
    """Give the memory that start-up used and freed (imports, recovery, the store's first
    load) back to the system: glibc keeps freed heap pages mapped until told
    (malloc_trim), so an idle daemon would carry them. About 0.5 MB of srcd's idle RSS
    (docs/PERFORMANCE.md); nothing where the C library has no malloc_trim."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _dump_tasks(log: Any) -> None:
    """SIGUSR1: every asyncio task of the daemon, with where it waits, in the log (what a
    stuck migration is waiting for, without stopping anything)."""
    for task in asyncio.all_tasks():
        frames: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(frames) < 24:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                name = "/".join(frame.f_code.co_filename.rsplit("/", 2)[-2:])
                frames.append(f"{name}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        log.info("task_dump", task=task.get_name(), stack=frames)


async def _serve(prog: str, config: DaemonConfig, server_factory: ServerFactory) -> None:
    log = structlog.get_logger(f"vmmigrate.{prog}")
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: stop waiting for the migrations in flight

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks, log)
    async with server_factory(config) as (address, ctx):
        log.info(
            "daemon_ready",
            daemon=prog,
            listen=address,
            state_dir=str(config.state_dir),
            host_uuid=ctx.store.identity.host_uuid,
        )
        sdnotify.notify(f"READY=1\nSTATUS={prog} serving on {address}")
        release_freed_memory()
        await stop.wait()
        log.info("daemon_stopping", daemon=prog, grace=config.shutdown_grace)
        sdnotify.notify(f"STOPPING=1\nSTATUS={prog} finishing the migrations in flight")
        await drain(ctx, config.shutdown_grace, hurry, log)


async def drain(ctx: Any, grace: float, hurry: asyncio.Event, log: Any) -> None:
    """Refuse new migrations, then wait (at most ``grace`` seconds) for those in flight.

    What is still running after that is left as it is: the emulators outlive the daemon
    and the journal says what each migration had done, so the next start settles them as it
    settles a crash's (recovery)."""
    ctx.gate.close()
    end = loop_time() + grace
    while (left := ctx.migrations_in_flight()) and not hurry.is_set():
        if loop_time() >= end:
            log.warning("shutdown_grace_expired", in_flight=left, left_to="recovery")
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), timeout=min(0.1, max(end - loop_time(), 0)))
    log.info("daemon_drained", in_flight=ctx.migrations_in_flight())


def loop_time() -> float:
    return asyncio.get_running_loop().time()


# ---------------------------------------------------------------------------------------
# The gRPC shell both daemons share. This is the one module in common that serves: the
# translation of errors to a status (one place per server: this decorator) and the server's
# life cycle (health checking, housekeeping, graceful stop). The services live in srcd/
# and dstd/.

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Any], Awaitable[Resp]]


def rpc_handler(role: str) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """Decorator for unary handlers: binds log context (rpc, role, migration id) and turns
    any error into a gRPC status, with our error class in the trailing metadata."""
    log = structlog.get_logger(f"vmmigrate.{role}")

    def decorate(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Req, context: Any) -> Resp:
            header = getattr(request, "header", None)
            mid = getattr(header, "migration_id", "") or getattr(request, "migration_id", "")
            with structlog.contextvars.bound_contextvars(
                rpc=fn.__name__, role=role, migration_id=mid or None
            ):
                try:
                    return await fn(self, request, context)
                except Exception as exc:
                    count_refusal(self, exc)
                    await abort_with(context, exc, log)
                    raise  # abort() raises; never reached

        return wrapper

    return decorate


def count_refusal(service: Any, exc: BaseException) -> None:
    """Refusals by reason, counted where every error is translated: the reason comes from
    the error's class (common/metrics.py), for a service whose context has metrics."""
    obs = getattr(getattr(service, "ctx", None), "obs", None)
    if obs is not None:
        obs.metrics.refused(exc)


async def abort_with(context: Any, exc: BaseException, log: Any) -> None:
    code, message, metadata = status_of(exc)
    if isinstance(exc, VmmigrateError):
        log.info("rpc_failed", code=code.name, error=message)
    else:
        log.exception("rpc_crashed")
    await context.abort(code, message, trailing_metadata=tuple(metadata))


@contextlib.asynccontextmanager
async def grpc_server(
    config: DaemonConfig,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    housekeeping: Callable[[], Awaitable[None]],
    interval: float = 1.0,
    *,
    gate: ShutdownGate | None = None,
    tls: TlsFiles | None = None,
    policy: Policy | None = None,
    on_refused: OnRefused | None = None,
) -> AsyncIterator[str]:
    """Serve on config.listen; yields the bound address (port 0 picks one). With ``tls``:
    mutual TLS, ``policy`` checked on every call (before the request is decoded), the
    certificates re-read on SIGHUP; without: plaintext (common/tls.py decides which).
    ``gate`` refuses new migrations once the daemon stops (graceful SIGTERM). Calls these
    two (and the decode guard) refuse are counted through ``on_refused``, as the handlers'
    own refusals are."""
    interceptors: list[Any] = []
    if tls is not None and policy is not None:
        # first: nothing runs for a stranger
        interceptors.append(AuthInterceptor(policy, on_refused))
    if gate is not None:
        gate.on_refused = on_refused
        interceptors.append(gate)
    server = grpc.aio.server(
        interceptors=[*interceptors, DecodeGuard(on_refused)],
        options=SERVER_OPTIONS_BASE + message_size_options(config.max_message_bytes),
    )
    register(server)
    health = _add_health_and_reflection(server, service_names)
    if tls is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, tls.server_credentials())
    await server.start()
    _reload_on_sighup(tls)
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            await housekeeping()

    task = asyncio.ensure_future(loop())
    host = config.listen.rpartition(":")[0]
    try:
        yield f"{host}:{port}"
    finally:
        task.cancel()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await health.enter_graceful_shutdown()
        await server.stop(grace=2.0)


def _add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> HealthServicer:
    """grpc health (what probes and healthchecks ask) and reflection (grpcurl and friends
    can list and call the services without the .proto)."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return health


def _reload_on_sighup(tls: TlsFiles | None) -> None:
    """SIGHUP re-reads the certificates (rotation without a restart): the next handshake,
    and the next channel to a peer, use the new files; connections already open go on."""
    log = structlog.get_logger("vmmigrate.tls")

    def hangup() -> None:
        if tls is None:
            log.info("sighup_ignored", reason="plaintext: no certificates to re-read")
            return
        log.info("tls_reload_requested", tls_dir=str(tls.directory))
        tls.request_reload()
        tls.current()  # re-read now, so that a bad rotation is logged at once

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)
