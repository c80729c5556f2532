"""Helpers for tests of running domains (simvm): start one, read its state, its memory
checksum, where its emulator is alive."""

from __future__ import annotations

import os
import uuid as uuidlib

from .hosts import Host, sample_domain_xml
from .qmp import qmp_for, runtime_record


def start_domain(h: Host, name: str, memory_mib: int = 32) -> str:
    u = str(uuidlib.uuid4())
    h.define(sample_domain_xml(name, u, memory_mib=memory_mib), f"{name}.xml")
    assert h.migctl("start", name).stdout.strip() == f"Domain '{name}' started"
    return u


def state(h: Host, name: str) -> str:
    r = h.migctl("domstate", name, check=False)
    return r.stdout.strip() if r.returncode == 0 else "absent"


def checksum(h: Host, u: str) -> dict[str, object]:
    with qmp_for(h.state_dir, u) as q:
        result: dict[str, object] = q.cmd("x-simvm-checksum")
        return result


def set_dirty_rate(h: Host, u: str, pages: int) -> None:
    with qmp_for(h.state_dir, u) as q:
        q.cmd("x-simvm-set-dirty-rate", **{"pages-per-second": pages})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    return stat[stat.rindex(")") + 2] != "Z"


def running_on(a: Host, b: Host, u: str) -> list[str]:
    """The hosts whose emulator for ``u`` is alive (paused or running)."""
    out = []
    for h in (a, b):
        rec = runtime_record(h.state_dir, u)
        if rec is not None and alive(rec["pid"]):
            out.append(h.name)
    return out


def runs_on_exactly_one(a: Host, b: Host, u: str) -> str:
    where = running_on(a, b, u)
    assert len(where) == 1, f"domain runs on {where}"
    return where[0]
