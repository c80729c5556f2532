"""Pure policies: the live-migration watch decision and the client's progress line."""

from __future__ import annotations

import io

import pytest
from vmmigrate.migctl.progress import Progress
from vmmigrate.srcd.perform import Action, decide

from vmmigrate.v1 import vmmigrate_pb2 as pb

CASES = [
    # elapsed, timeout, suspend, suspended, abort, cancelling -> action
    (0.5, 0, False, False, False, False, Action.WAIT),
    (99.0, 0, False, False, False, False, Action.WAIT),  # no --timeout: never
    (0.5, 1, False, False, False, False, Action.WAIT),
    (1.0, 1, False, False, False, False, Action.CANCEL_TIMEOUT),
    (1.0, 1, True, False, False, False, Action.SUSPEND),
    (5.0, 1, True, True, False, False, Action.WAIT),  # suspended once, then wait
    (0.1, 0, False, False, True, False, Action.CANCEL_ABORT),
    (5.0, 1, True, False, True, False, Action.CANCEL_ABORT),  # abort beats timeout
    (5.0, 1, False, False, True, True, Action.WAIT),  # already cancelling
]


@pytest.mark.parametrize(("elapsed", "timeout", "suspend", "suspended", "abort", "cancelling",
                          "expected"), CASES)
def test_decide(elapsed: float, timeout: int, suspend: bool, suspended: bool, abort: bool,
                cancelling: bool, expected: Action) -> None:
    assert decide(elapsed=elapsed, timeout_s=timeout, timeout_suspend=suspend,
                  suspended=suspended, abort_requested=abort, cancelling=cancelling) is expected


def test_progress_never_goes_backwards() -> None:
    out = io.StringIO()
    p = Progress(out)
    seen = []
    for remaining in (100, 60, 30, 70, 10, 40, 0):  # dirtying makes "remaining" grow again
        info = pb.JobInfo(type="Unbounded", data_total=100, data_remaining=remaining,
                          memory_bps=1024 * 1024)
        p.show(info)
        seen.append(p.best)
    assert seen == sorted(seen)
    assert seen[-1] == 99  # 100 % is shown only once the migration has really ended
    p.done(True)
    assert out.getvalue().endswith("Migration: [100 %]" + " " * 50 + "\n")
    assert "1.0 MiB/s" in out.getvalue()
