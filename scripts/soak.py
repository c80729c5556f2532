#!/usr/bin/env python3
"""The long soak: migrations back and forth between two loopback hosts with every failpoint
armed at random; prints the counts, exits 1 on any invariant violation.

    .venv/bin/python -m scripts.soak --migrations 2000   # from the repository root
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from tests.helpers.soak import soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--migrations", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4, help="migrations in flight per round")
    ap.add_argument("--offline-domains", type=int, default=12)
    ap.add_argument("--live-domains", type=int, default=4)
    ap.add_argument("--percent", type=float, default=2.0, help="how often each failpoint fires")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", help="keep the hosts' state and logs here (default: a temp dir)")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if a.workdir:
            tmp = a.workdir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmmigrate-soak-"))
        try:
            counts = soak(Path(tmp), migrations=a.migrations, workers=a.workers,
                          n_offline=a.offline_domains, n_live=a.live_domains,
                          percent=a.percent, seed=a.seed)
        except BaseException:
            if not a.workdir:  # keep what a failed soak leaves, to be examined
                kept = tempfile.mkdtemp(prefix="vmmigrate-soak-failed-")
                shutil.copytree(tmp, kept, dirs_exist_ok=True, symlinks=True,
                                ignore=shutil.ignore_patterns("*.qmp", "*.sock", "*.incoming"))
                print(f"soak failed: state and logs kept in {kept}", file=sys.stderr)
            raise
    print(counts.summary())
    for v in counts.violations:
        print("violation:", v)
    return 1 if counts.invariant_violations else 0


if __name__ == "__main__":
    sys.exit(main())
