"""What every dstd handler needs, built once at start and passed in (no globals)."""

from __future__ import annotations

import dataclasses

from common.config import DaemonConfig
from common.failpoints import Failpoints
from common.store import HostStore
from dstd.incoming import IncomingTable


@dataclasses.dataclass
class DestinationContext:
    config: DaemonConfig
    store: HostStore
    incoming: IncomingTable
    failpoints: Failpoints
