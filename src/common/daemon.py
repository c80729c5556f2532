"""What both daemons' main() share: option parsing glue, logging, signals, the ready line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import structlog

from common.config import DaemonConfig, add_common_options, load_config
from common.errors import VmmigrateError
from common.failpoints import ENV_VAR, Failpoints
from common.log import setup_logging

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
    async with server_factory(config) as (_server, address, ctx):
        log.info(
            "daemon_ready",
            daemon=prog,
            listen=address,
            state_dir=str(config.state_dir),
            host_uuid=ctx.store.identity.host_uuid,
        )
        await stop.wait()
        log.info("daemon_stopping", daemon=prog)
