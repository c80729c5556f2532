"""Command-line rules that ``migrate`` and ``evacuate`` share (docs/ARCHITECTURE.md section
4): virsh's checks of --timeout, --timeout-* and --bandwidth, with virsh's texts after the
command's name. A module of its own so that evacuate's code, imported only when it runs,
and migctl's main module both use it without importing each other."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def check_stream_options(
    a: argparse.Namespace, command: str, *, offline: bool, error: Callable[[str], Exception]
) -> None:
    """Refuse, with ``error("<command>: <text>")``, a --timeout where the migration is
    ``offline`` (it has no stream to time) or below 1 s, a --timeout-* option without
    --timeout, and a negative --bandwidth."""
    if a.timeout is not None:
        if offline:
            raise error(f"{command}: Unexpected timeout for offline migration")
        if a.timeout < 1:
            raise error(f"{command}: Invalid timeout")
    elif a.timeout_suspend:
        raise error(f"{command}: Unexpected --timeout-* option without --timeout")
    if a.bandwidth is not None and a.bandwidth < 0:
        raise error(f"{command}: Invalid bandwidth")
