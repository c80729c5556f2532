"""What a daemon tells its operators, in one object passed in through its context: the
metrics, the host's event log and the host's migration history."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

from vmmigrate.common.config import DaemonConfig
from vmmigrate.common.events import EventLog
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.history import History, HistoryRecord
from vmmigrate.common.metrics import Metrics


def kind_of(flags: MigrateFlag) -> str:
    return "offline" if MigrateFlag.OFFLINE in flags else "live"


def mode_of(flags: MigrateFlag) -> str:
    if MigrateFlag.TUNNELLED in flags:
        return "tunnelled"
    return "p2p" if MigrateFlag.PEER2PEER in flags else "client-driven"


def phase_durations(entered: list[tuple[str, float]], ended: float) -> list[tuple[str, float]]:
    """(phase, seconds) from the monotonic times each phase was entered."""
    ends = [t for _, t in entered[1:]] + [ended]
    return [(label, end - start) for (label, start), end in zip(entered, ends, strict=True)]


@dataclasses.dataclass
class Observability:
    metrics: Metrics
    events: EventLog
    history: History

    @classmethod
    def for_daemon(cls, config: DaemonConfig, daemon: str, role: str) -> Observability:
        return cls(
            metrics=Metrics(role),
            events=EventLog(config.state_dir, daemon),
            history=History(config.state_dir, config.history_limit, writer=daemon),
        )

    def record(self, rec: HistoryRecord, phases: list[tuple[str, float]]) -> None:
        """A migration ended here: count it and keep it in the history."""
        self.metrics.finished(rec.kind, rec.mode, rec.result, rec.bytes)
        self.metrics.phases(phases)
        self.history.add(rec)


@contextlib.contextmanager
def serving_metrics(obs: Observability, listen: str | None) -> Iterator[str | None]:
    """Serve the metrics while the daemon runs, if asked to (off by default)."""
    if not listen:
        yield None
        return
    try:
        yield obs.metrics.serve(listen)
    finally:
        obs.metrics.close()


def now() -> float:
    return time.time()
