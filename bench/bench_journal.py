#!/usr/bin/env python3
"""What the job journal costs an offline migration: the store operations of one offline
migration with the journal (source record, destination reservation, durable outcome) and
without it (the definition written on the destination, removed on the source), timed on
the same disk in the same run.

    .venv/bin/python bench/bench_journal.py --n 300
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import structlog
from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.store import HostStore, JobRecord, MigrationOutcome

XML = """<domain type='kvm'><name>{n}</name><uuid>{u}</uuid><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"""


def one(src: HostStore, dst: HostStore, journal: bool) -> float:
    u = str(uuid.uuid4())
    d = parse_domain(XML.format(n=f"j{u[:8]}", u=u))
    src.define(d)
    mid = str(uuid.uuid4())
    t0 = time.perf_counter()
    if journal:
        rec = JobRecord(mid, "source", d.name, d.uuid, "begin3", 0x41A, "peer")
        src.journal_put(rec, durable=False)
        dst.reserve_incoming(JobRecord(mid, "destination", d.name, d.uuid, "prepare", 0x41A, "p",
                                       xml=d.xml))
        dst.persist_incoming(mid, d)
        dst.outcome_put(MigrationOutcome(mid, "finished", d.name, d.uuid, d.name))
        dst.release_incoming(mid)
        src.undefine(d.uuid)
        src.journal_remove(mid, durable=False)
    else:
        dst.define(d)
        src.undefine(d.uuid)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        src, dst = HostStore(Path(tmp) / "a"), HostStore(Path(tmp) / "b")
        with_j, without = [], []
        for i in range(a.n):  # interleaved: the same disk, the same moment
            (with_j if i % 2 else without).append(one(src, dst, bool(i % 2)))
    mw, mo = statistics.median(with_j), statistics.median(without)
    print(f"store ops per offline migration, median of {len(with_j)}: with journal {mw:.2f} ms, "
          f"without {mo:.2f} ms, journal overhead {mw - mo:.2f} ms ({mw / mo:.2f}x)")


if __name__ == "__main__":
    main()
