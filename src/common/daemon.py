"""What both daemons share: main() (options, logging, signals, the ready line) and the gRPC
shell (error translation, health checking, housekeeping, graceful stop)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from vmmigrate.common.config import DaemonConfig, add_common_options, load_config
from vmmigrate.common.decodeguard import DecodeGuard
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.failpoints import ENV_VAR, SEED_VAR, Failpoints
from vmmigrate.common.log import setup_logging
from vmmigrate.common.rpc import SERVER_OPTIONS_BASE, message_size_options, status_of

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
) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=description)
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
        config = load_config(args, default_port=default_port, config_file=args.config)
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


async def _serve(prog: str, config: DaemonConfig, server_factory: ServerFactory) -> None:
    log = structlog.get_logger(f"vmmigrate.{prog}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server_factory(config) as (address, ctx):
        log.info(
            "daemon_ready",
            daemon=prog,
            listen=address,
            state_dir=str(config.state_dir),
            host_uuid=ctx.store.identity.host_uuid,
        )
        await stop.wait()
        log.info("daemon_stopping", daemon=prog)


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
    the error's status code (common/metrics.py), for a service whose context has metrics."""
    obs = getattr(getattr(service, "ctx", None), "obs", None)
    if obs is not None:
        obs.metrics.refused(status_of(exc)[0])


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
) -> AsyncIterator[str]:
    """Serve on config.listen; yields the bound address (port 0 picks one)."""
    server = grpc.aio.server(
        interceptors=[DecodeGuard()],
        options=SERVER_OPTIONS_BASE + message_size_options(config.max_message_bytes),
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # reflection: grpcurl and friends can list and call the services without the .proto
    reflection.enable_server_reflection(
        (
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(config.listen)
    await server.start()
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
        await health.enter_graceful_shutdown()
        await server.stop(grace=2.0)
