"""What every dstd handler needs, built once at start and passed in (no globals)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.domainxml import DomainDef
from vmmigrate.common.failpoints import Failpoints
from vmmigrate.common.groupcommit import GroupCommit
from vmmigrate.common.hypervisor import QMPHypervisor
from vmmigrate.common.observe import Observability
from vmmigrate.common.shutdown import ShutdownGate
from vmmigrate.common.store import HostStore, MigrationOutcome
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

    # group commits (common/groupcommit.py): the definitions Finish persists and the
    # outcomes it records, many concurrent Finishes' with one flush
    persists: GroupCommit[tuple[str, DomainDef], tuple[DomainDef | None, bool]] = dataclasses.field(
        init=False
    )
    outcome_commits: GroupCommit[MigrationOutcome, None] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        store, failpoints = self.store, self.failpoints

        def midway(i: int, n: int) -> None:
            if n >= 2 and i == n // 2 - 1:
                failpoints.hit_sync("dstd.finish.persist_group_midway")

        def persist(
            items: Sequence[tuple[str, DomainDef]],
        ) -> list[tuple[DomainDef | None, bool] | Exception]:
            return store.persist_incoming_many(items, lambda i: midway(i, len(items)))

        # one incoming migration alone: its writes need no thread hand-off (groupcommit.py)
        alone = self.incoming.alone
        self.persists = GroupCommit(persist, inline=alone)
        self.outcome_commits = GroupCommit(store.outcome_put_many, inline=alone)

    def migrations_in_flight(self) -> int:
        """Incoming migrations a graceful stop waits for (prepared, not finished yet)."""
        return len(self.incoming)
