"""The fault matrix: every failpoint `--list-failpoints` prints, armed with `crash`, for
offline and live migration, peer-to-peer and client-driven.

Each case: a migration A -> B with the failpoint armed on its daemon; if that daemon
crashes, it is restarted at once (as systemd would, on the same address) with nothing
armed, and recovery runs. Then the invariant:

* no journal entry is left on either host (recovery has settled everything);
* the domain is defined on exactly one host (the migrations use --undefinesource), with
  exactly the definition it had;
* live: it runs on exactly that host, and runs (is not left paused);
* the same migration, run again from wherever the domain is now, succeeds.

A table of the results is printed at the end of the session (and written to
$VMMIGRATE_FAULT_TABLE if set).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from helpers.hosts import Host, sample_domain_xml, settled, wait_until
from helpers.live import runs_on_exactly_one, state

pytestmark = pytest.mark.slow


def _list_failpoints(daemon: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", f"vmmigrate.{daemon}", "--list-failpoints"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [line for line in out.splitlines() if line]


FAILPOINTS = _list_failpoints("srcd") + _list_failpoints("dstd")
KINDS = ["offline-p2p", "offline-managed", "live-p2p", "live-managed"]

# (kind, failpoint) -> result row, printed by the session's terminal summary
RESULTS: dict[tuple[str, str], dict[str, str]] = {}


def _migrate_args(kind: str, name: str, dest: Host) -> list[str]:
    args = ["migrate", "--persistent", "--undefinesource"]
    args.append("--offline" if kind.startswith("offline") else "--live")
    if kind.endswith("p2p"):
        args.append("--p2p")
    return [*args, name, dest.dst]


def _daemon_of(h: Host, failpoint: str) -> str:
    return failpoint.split(".", 1)[0]


def _restart(h: Host, which: str, env: dict[str, str] | None = None) -> None:
    if which == "srcd":
        h.start_srcd(env=env)
    else:
        h.start_dstd(env=env)


def _process(h: Host, which: str) -> subprocess.Popen[bytes]:
    d = h.srcd if which == "srcd" else h.dstd
    assert d is not None
    return d.proc


def _check_invariant(a: Host, b: Host, name: str, u: str, xml: str, live: bool) -> Host:
    """The invariant; returns the host that owns the domain."""
    settled(a, b, timeout=60)
    where = [h for h in (a, b) if name in h.names()]
    assert len(where) == 1, f"domain defined on {[h.name for h in where]}"
    owner = where[0]
    other = b if owner is a else a
    assert other.domain_files() == [] or all(
        u not in p.name for p in other.domain_files()
    ), "a definition file was left on the other host"
    assert owner.migctl("dumpxml", "--inactive", name).stdout == xml
    if live:
        assert runs_on_exactly_one(a, b, u) == owner.name
        wait_until(lambda: state(owner, name) == "running", 30, f"{name} running on {owner.name}")
    return owner


@pytest.mark.parametrize("failpoint", FAILPOINTS)
@pytest.mark.parametrize("kind", KINDS)
def test_fault_matrix(hosts: tuple[Host, Host], kind: str, failpoint: str) -> None:
    a, b = hosts
    live = kind.startswith("live")
    name = f"fm-{kind}-{failpoint.replace('.', '-')}"[:60]
    u = str(uuidlib.uuid4())
    a.define(sample_domain_xml(name, u), f"{name}.xml")
    xml = a.migctl("dumpxml", "--inactive", name).stdout
    if live:
        a.migctl("start", name)

    which = _daemon_of(a, failpoint)
    armed = a if which == "srcd" else b  # srcd runs on the source, dstd on the destination
    _restart(armed, which, env={"VMMIGRATE_FAILPOINTS": f"{failpoint}=crash"})
    victim = _process(armed, which)
    started = time.monotonic()
    client = subprocess.Popen(
        [sys.executable, "-m", "vmmigrate.migctl", "-c", a.src, *_migrate_args(kind, name, b)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    crashed = False
    try:
        while client.poll() is None:
            if victim.poll() is not None:
                break
            time.sleep(0.02)
        if victim.poll() is None:
            # the client finished first; a crash may still come (e.g. in a background task)
            with contextlib.suppress(subprocess.TimeoutExpired):
                victim.wait(timeout=0.5)
        if victim.poll() is not None:
            assert victim.returncode == 137, f"{which} exited with {victim.returncode}"
            crashed = True
        _restart(armed, which)  # nothing armed: recovery runs at start
        _, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert "Traceback" not in err, err
    first_rc = client.returncode
    owner = _check_invariant(a, b, name, u, xml, live)
    recovered_s = time.monotonic() - started
    moved = owner is b

    # the same migration again, from wherever the domain is now
    other = a if owner is b else b
    owner.migctl(*_migrate_args(kind, name, other))
    assert _check_invariant(a, b, name, u, xml, live) is other

    # leave the pair as found: nothing defined or running from this case
    if live:
        other.migctl("destroy", name)
    other.migctl("undefine", name)
    RESULTS[(kind, failpoint)] = {
        "crashed": "crash" if crashed else "not reached",
        "first": "migrated" if moved else "stayed on source",
        "migctl": str(first_rc),
        "settled_s": f"{recovered_s:.1f}",
    }


def fault_table() -> str:
    if not RESULTS:
        return ""
    lines = [
        "fault matrix (action crash; invariant: settled, defined on one host with its exact "
        "definition, runs on at most one host, rerun succeeds)",
        f"{'failpoint':32} " + " ".join(f"{k:26}" for k in KINDS),
    ]
    for fp in FAILPOINTS:
        cells = []
        for k in KINDS:
            r = RESULTS.get((k, fp))
            cells.append(
                f"{'ok ' + r['crashed'] + ', ' + r['first'].split()[0]:26}" if r else f"{'-':26}"
            )
        lines.append(f"{fp:32} " + " ".join(cells))
    return "\n".join(lines)


def write_table(path: Path) -> None:
    path.write_text(fault_table() + "\n")
