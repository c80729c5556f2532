"""What every dstd handler needs, built once at start and passed in (no globals)."""

from __future__ import annotations

import dataclasses

from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.failpoints import Failpoints
from vmmigrate.common.hypervisor import QMPHypervisor
from vmmigrate.common.observe import Observability
from vmmigrate.common.shutdown import ShutdownGate
from vmmigrate.common.store import HostStore
from vmmigrate.dstd.incoming import IncomingTable
from vmmigrate.dstd.ports import PortAllocator
from vmmigrate.dstd.results import FinishResults, PrepareAnswers


@dataclasses.dataclass
class DestinationContext:
    config: DaemonConfig
    store: HostStore
    incoming: IncomingTable
    failpoints: Failpoints
    hypervisor: QMPHypervisor
    ports: PortAllocator
    results: FinishResults
    obs: Observability  # metrics, events, history
    prepares: PrepareAnswers = dataclasses.field(default_factory=PrepareAnswers)
    outcomes_swept: float = float("-inf")  # monotonic time of the last expiry sweep
    # Closed on SIGTERM: new migrations are refused while those in flight finish.
    gate: ShutdownGate = dataclasses.field(default_factory=ShutdownGate)

    def migrations_in_flight(self) -> int:
        """Incoming migrations a graceful stop waits for (prepared, not finished yet)."""
        return len(self.incoming)
