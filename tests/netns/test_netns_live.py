"""Live migration between two hosts in two network namespaces (root only).

The simvm scenarios of tests/integration/test_live.py, but every daemon, every emulator and
every migctl runs inside its host's namespace, so the memory stream crosses the veth/bridge
link, which a test can cut: during Perform (the stream itself), during Prepare and during
Finish (failpoints hold the destination in the phase while the link goes down).

After every scenario the invariant is checked: the domain runs on exactly one host, with its
memory intact (dirty rate 0: the source's checksum is unchanged; after a move, the
destination holds what the source declared at switchover), no journal entry is left on
either host once the destination's incoming job has expired, and nothing was defined on the
destination by a failed migration.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers.hosts import Host
from helpers.live import (
    alive,
    checksum,
    running_on,
    runs_on_exactly_one,
    set_dirty_rate,
    start_domain,
    state,
)
from helpers.qmp import qmp_for, runtime_record

from .netlab import INSECURE, Network

pytestmark = [pytest.mark.netns, pytest.mark.slow]

LIVE = ("migrate", "--live", "--persistent")
MOVE = (*LIVE, "--p2p", "--undefinesource")
# dstd of the hosts whose link is cut: an incoming job whose Finish never comes is dropped
# when the migration's deadline passes, and dstd caps that deadline at its own
# migration_timeout (the source sends 600 s by default).
DSTD_MIGRATION_TIMEOUT = 20.0
# srcd of the source host whose link is cut: deadline of one RPC to B
RPC_TIMEOUT = 3.0
# what a migctl run may take on top of a deadline (interpreter start-up, a loaded machine)
SLACK = 8.0
# after the link comes back, the kernel may still hold B's neighbour entry as FAILED for a
# moment: a migration started then fails at once (EHOSTUNREACH), changing nothing
RECONNECT_GRACE = 5.0
# how long a live migration may go on after the link to its destination went down, before
# it must have failed: the daemons' own gRPC keepalive declares a silent peer dead after
# 15 s (10 s + 5 s), and A's RPC deadline is 3 s. (TCP alone gives up on the emulator's
# stream only after net.ipv4.tcp_retries2 retransmissions: about 15 minutes.)
STALL_BOUND = 20.0
# The link goes down while B's dstd is held in a phase by a failpoint: B finishes the phase,
# but its answer never reaches A. A's srcd gets an RPC deadline above the failpoint's delay,
# so that without the cut the same migration succeeds (it does, once the link is back).
PHASE_DELAY_MS = 3000
PHASE_RPC_TIMEOUT = 5.0
# those migrations are small (16 MiB, unthrottled): B may drop an abandoned job sooner
PHASE_DSTD_MIGRATION_TIMEOUT = 10.0


# -- helpers ----------------------------------------------------------------------------


def kill_emulators(*hosts: Host) -> None:
    """Kill (by pid) every emulator a host's runtime records name: they outlive their
    daemons, and a namespace is deleted only once nothing of ours runs in it."""
    for h in hosts:
        run = h.state_dir / "run"
        for path in sorted(run.glob("*.json")) if run.exists() else []:
            try:
                pid = int(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def popen_migctl(h: Host, *args: str) -> subprocess.Popen[str]:
    """migctl in the host's namespace, in the background."""
    cmd = [*h.prefix, sys.executable, "-m", "vmmigrate.migctl", "-c", h.src, *h.migctl_args, *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )


def wait_for(what: str, cond: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Poll until ``cond()``; returns how long it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f}s")
        time.sleep(interval)
    return time.monotonic() - t0


def wait_flowing(a: Host, name: str, timeout: float = 15) -> None:
    """Wait until the memory stream is flowing (not only the job taken in Begin)."""

    def flowing() -> bool:
        info = a.migctl("domjobinfo", name).stdout
        return "Unbounded" in info and "Data processed:   0.000 MiB" not in info

    wait_for("the migration job never showed data flowing", flowing, timeout, 0.05)


def qmp_status(h: Host, u: str) -> str:
    """The emulator's run state (query-status), or "absent"."""
    rec = runtime_record(h.state_dir, u)
    if rec is None or not alive(rec["pid"]):
        return "absent"
    try:
        with qmp_for(h.state_dir, u) as q:
            return str(q.cmd("query-status")["status"])
    except OSError:
        return "absent"  # quit meanwhile


def wait_failpoint(h: Host, failpoint: str, timeout: float = 30) -> None:
    """Wait until the host's daemon (the failpoint's prefix: srcd or dstd) logs that it is
    at ``failpoint``."""
    daemon = h.srcd if failpoint.startswith("srcd.") else h.dstd

    def hit() -> bool:
        assert daemon is not None
        return any(
            e.get("event") == "failpoint_hit" and e.get("failpoint") == failpoint
            for e in daemon.events()
        )

    wait_for(f"{failpoint} on {h.name}", hit, timeout, 0.02)


def incoming_dropped(b: Host, u: str) -> bool:
    return b.journal() == [] and runtime_record(b.state_dir, u) is None


def assert_nothing_on(b: Host, name: str, u: str) -> None:
    """A failed migration left nothing on the destination: no definition, no emulator, no
    reservation."""
    assert name not in b.names()
    assert b.domain_files() == []
    assert b.journal() == []
    assert runtime_record(b.state_dir, u) is None


def move_until_ok(a: Host, b: Host, name: str, within: float = RECONNECT_GRACE) -> list[str]:
    """p2p live --undefinesource A -> B, retried while the link settles; the errors of the
    failed tries (each must have changed nothing)."""
    failures: list[str] = []
    deadline = time.monotonic() + within
    while True:
        r = a.migctl(*MOVE, name, b.dst, check=False, timeout=60)
        if r.returncode == 0:
            assert (r.stdout, r.stderr) == ("", "")
            return failures
        failures.append(r.stderr.strip())
        assert state(a, name) == "running" and name not in b.names(), failures
        if time.monotonic() > deadline:
            raise AssertionError(f"no success {within}s after the link came back: {failures}")
        time.sleep(0.1)


def assert_moved(a: Host, b: Host, name: str, u: str, before_sha: str | None) -> None:
    """The domain now runs on B only, persistent there and gone from A, with the memory A
    declared at switchover."""
    assert state(b, name) == "running"
    assert "Persistent:     yes" in b.migctl("dominfo", name).stdout
    assert state(a, name) == "absent"  # neither defined nor running
    assert runs_on_exactly_one(a, b, u) == "B"
    sums = checksum(b, u)
    assert sums["source-sha256"] == sums["sha256"]
    if before_sha is not None:
        assert sums["sha256"] == before_sha
    assert a.journal() == [] and b.journal() == []


def start_hosts(
    net: Network,
    base: Path,
    *,
    srcd_a: Sequence[str] = (),
    dstd_b: Sequence[str] = (),
    env_a: dict[str, str] | None = None,
    env_b: dict[str, str] | None = None,
) -> tuple[Host, Host]:
    """netlab.start_hosts, with options for B's dstd too."""
    a = Host("A", net.ip_a, base / "A", prefix=net.prefix(net.ns_a), migctl_args=INSECURE)
    b = Host("B", net.ip_b, base / "B", prefix=net.prefix(net.ns_b), migctl_args=INSECURE)
    try:
        a.start(srcd_args=(*INSECURE, *srcd_a), dstd_args=INSECURE, env=env_a)
        b.start(srcd_args=INSECURE, dstd_args=(*INSECURE, *dstd_b), env=env_b)
    except BaseException:
        a.stop()
        b.stop()
        raise
    return a, b


def stop_hosts(*hosts: Host) -> None:
    kill_emulators(*hosts)
    for h in hosts:
        h.stop()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_hosts(
    network: Network, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Host, Host]]:
    """Two hosts in two namespaces with default settings, shared by the happy paths."""
    a, b = start_hosts(network, tmp_path_factory.mktemp("netns-live"))
    yield a, b
    stop_hosts(a, b)


@pytest.fixture
def cut_hosts(
    make_network: Callable[[], Network], tmp_path: Path
) -> Iterator[Callable[..., tuple[Network, Host, Host]]]:
    """A network of its own (the test cuts it) and two hosts: A's srcd with a short RPC
    deadline, B's dstd dropping an abandoned incoming job after DSTD_MIGRATION_TIMEOUT.
    Called with optional srcd options for A and an environment for B's dstd."""
    made: list[tuple[Network, Host, Host]] = []

    def make(
        rpc_timeout: float = RPC_TIMEOUT,
        dstd_migration_timeout: float = DSTD_MIGRATION_TIMEOUT,
        env_b: dict[str, str] | None = None,
        env_a: dict[str, str] | None = None,
    ) -> tuple[Network, Host, Host]:
        net = make_network()
        config = tmp_path / "dstd.toml"
        config.write_text(f"job_idle_timeout = 2\nmigration_timeout = {dstd_migration_timeout}\n")
        try:
            a, b = start_hosts(
                net,
                tmp_path,
                srcd_a=("--rpc-timeout", str(rpc_timeout)),
                dstd_b=("--config", str(config)),
                env_a=env_a,
                env_b=env_b,
            )
        except BaseException:
            net.destroy()
            raise
        made.append((net, a, b))
        return net, a, b

    yield make
    for net, a, b in made:
        try:
            net.link(net.ns_b, up=True)
        finally:
            stop_hosts(a, b)
            net.destroy()


# -- the happy paths --------------------------------------------------------------------


def test_live_p2p_there_and_client_driven_back(live_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = live_hosts
    name = domname
    u = start_domain(a, name, memory_mib=64)
    before_xml = a.migctl("dumpxml", name, "--inactive").stdout
    before_sha = checksum(a, u)["sha256"]

    r = a.migctl(*MOVE, name, b.dst)
    assert (r.stdout, r.stderr) == ("", "")
    assert_moved(a, b, name, u, before_sha)  # dirty rate 0: memory exactly as it was
    assert b.migctl("dumpxml", name, "--inactive").stdout.strip() == before_xml.strip()

    # back, client-driven: migctl in vmB drives B's srcd and A's dstd across the link
    r = b.migctl(*LIVE, "--undefinesource", name, a.dst)
    assert (r.stdout, r.stderr) == ("", "")
    assert state(a, name) == "running" and state(b, name) == "absent"
    assert runs_on_exactly_one(a, b, u) == "A"
    sums = checksum(a, u)
    assert sums["source-sha256"] == sums["sha256"] == before_sha
    assert a.migctl("dumpxml", name, "--inactive").stdout.strip() == before_xml.strip()
    assert a.journal() == [] and b.journal() == []
    assert b.domain_files() == []
    a.migctl("destroy", name)
    assert runtime_record(a.state_dir, u) is None


def test_live_tunnelled_across_namespaces(live_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = live_hosts
    name = domname
    u = start_domain(a, name, memory_mib=32)
    set_dirty_rate(a, u, 2000)  # pages written during the copy: more than one pass
    r = a.migctl(*MOVE, "--tunnelled", name, b.dst)
    assert (r.stdout, r.stderr) == ("", "")
    assert_moved(a, b, name, u, None)
    # the stream came through B's dstd (its emulator listened on a unix socket in B's
    # state, reachable from no network)
    assert b.dstd is not None
    prepared = [
        e
        for e in b.dstd.events()
        if e.get("event") == "incoming_prepared" and e.get("domain") == name
    ]
    assert len(prepared) == 1 and prepared[0]["tunnelled"] is True, prepared
    assert str(prepared[0]["uri"]).startswith(f"unix:{b.state_dir}/"), prepared
    b.migctl("destroy", name)
    assert running_on(a, b, u) == []


# -- the link breaks --------------------------------------------------------------------


class MigrationStalled(AssertionError):
    """A live migration went on past STALL_BOUND with its destination unreachable."""


def test_link_breaks_during_perform(
    cut_hosts: Callable[..., tuple[Network, Host, Host]], domname: str
) -> None:
    """B's link goes down while the memory stream flows: the migration fails with a clear
    error within STALL_BOUND, the source keeps running with its memory untouched; once B's
    dstd has dropped its incoming job and the link is back, the same migration succeeds."""
    net, a, b = cut_hosts()
    name = domname
    u = start_domain(a, name, memory_mib=64)
    before_sha = checksum(a, u)["sha256"]
    # 64 MiB at 4 MiB/s: about 16 s, cut after the first MiB
    proc = popen_migctl(a, *MOVE, "--bandwidth", "4", name, b.dst)
    stalled = ""
    try:
        wait_flowing(a, name)
        net.link(net.ns_b, up=False)
        cut = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STALL_BOUND)
        if proc.returncode is None:
            # still going: what the job looks like, then abort it as an operator would
            info = a.migctl("domjobinfo", name).stdout
            stalled = " ".join(
                " ".join(line.split(":", 1)[1].split())
                for line in info.splitlines()
                if line.startswith(("Time elapsed", "Data processed"))
            )
            aborted = time.monotonic()
            a.migctl("domjobabort", name)
            out, err = proc.communicate(timeout=RPC_TIMEOUT + SLACK)
            took = time.monotonic() - aborted
            assert err.strip().splitlines()[-1] == (
                "error: operation aborted: job 'migration out' canceled by client")
        else:
            out, err = proc.communicate()
            took = time.monotonic() - cut
        assert proc.returncode == 1 and out == "", (out, err)
        # virsh's two lines: the verb's, then the cause (never an internal error)
        first, cause = err.strip().splitlines()
        assert first == f"error: Failed to migrate domain '{name}'", err
        assert cause.startswith("error: ") and "internal error" not in cause, err
        assert took < STALL_BOUND, f"took {took:.1f}s: {err}"
        # the source runs, its memory untouched; B has at most its paused incoming emulator
        assert state(a, name) == "running"
        assert running_on(a, b, u) in (["A"], ["A", "B"])
        assert qmp_status(b, u) in ("absent", "inmigrate", "paused"), qmp_status(b, u)
        assert checksum(a, u)["sha256"] == before_sha
        assert a.journal() == []
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
        net.link(net.ns_b, up=True)

    # B drops its incoming job (emulator, port, reservation) at the migration's deadline
    wait_for(
        "B's dstd dropping its incoming job",
        lambda: incoming_dropped(b, u),
        DSTD_MIGRATION_TIMEOUT + SLACK,
    )
    assert_nothing_on(b, name, u)
    assert a.journal() == []

    failures = move_until_ok(a, b, name)
    for f in failures:
        assert f.startswith(f"error: unable to connect to destination host '{b.dst}': "), f
    assert_moved(a, b, name, u, before_sha)
    b.migctl("destroy", name)

    if stalled:
        raise MigrationStalled(
            f"the migration had not failed {STALL_BOUND:.0f}s after B's link went down "
            f"(domjobinfo: {stalled}); domjobabort ended it in {took:.1f}s"
        )


def test_link_breaks_during_prepare(
    cut_hosts: Callable[..., tuple[Network, Host, Host]], domname: str
) -> None:
    """B has reserved the name and started its incoming emulator when the link goes down:
    A's Prepare call fails at its deadline, and the source keeps running untouched; B drops
    the job (emulator, port, reservation) at the migration's deadline."""
    failpoint = "dstd.prepare.after_start"
    net, a, b = cut_hosts(
        rpc_timeout=PHASE_RPC_TIMEOUT,
        dstd_migration_timeout=PHASE_DSTD_MIGRATION_TIMEOUT,
        env_b={"VMMIGRATE_FAILPOINTS": f"{failpoint}=delay({PHASE_DELAY_MS})"},
    )
    name = domname
    u = start_domain(a, name, memory_mib=16)
    before_sha = checksum(a, u)["sha256"]
    proc = popen_migctl(a, *MOVE, name, b.dst)
    try:
        wait_failpoint(b, failpoint)
        net.link(net.ns_b, up=False)
        cut = time.monotonic()
        out, err = proc.communicate(timeout=PHASE_RPC_TIMEOUT + SLACK)
        took = time.monotonic() - cut
        assert proc.returncode == 1 and out == "", (out, err)
        assert err.strip().splitlines()[-1] == (
            f"error: Timed out during operation: destination host '{b.dst}' did not answer "
            "before the deadline"
        )
        assert took < PHASE_RPC_TIMEOUT + SLACK, f"took {took:.1f}s"
        assert state(a, name) == "running"
        assert qmp_status(b, u) in ("absent", "inmigrate"), qmp_status(b, u)
        assert checksum(a, u)["sha256"] == before_sha
        assert a.journal() == []
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
        net.link(net.ns_b, up=True)

    wait_for(
        "B's dstd dropping its incoming job",
        lambda: incoming_dropped(b, u),
        PHASE_DSTD_MIGRATION_TIMEOUT + SLACK,
    )
    assert_nothing_on(b, name, u)
    assert runs_on_exactly_one(a, b, u) == "A"
    assert a.journal() == []

    move_until_ok(a, b, name)
    assert_moved(a, b, name, u, before_sha)
    b.migctl("destroy", name)


class SplitBrain(AssertionError):
    """The domain runs on both hosts."""


def test_link_breaks_during_finish(
    cut_hosts: Callable[..., tuple[Network, Host, Host]], domname: str
) -> None:
    """The memory has arrived and B's dstd is in Finish when the link goes down: A's Finish
    call fails at its deadline with a clear error, and afterwards the domain must run on
    exactly one host (with its memory intact), defined on that host only."""
    failpoint = "dstd.finish.before"
    net, a, b = cut_hosts(
        rpc_timeout=PHASE_RPC_TIMEOUT,
        dstd_migration_timeout=PHASE_DSTD_MIGRATION_TIMEOUT,
        env_b={"VMMIGRATE_FAILPOINTS": f"{failpoint}=delay({PHASE_DELAY_MS})"},
    )
    name = domname
    u = start_domain(a, name, memory_mib=16)
    before_sha = checksum(a, u)["sha256"]
    proc = popen_migctl(a, *MOVE, name, b.dst)
    try:
        wait_failpoint(b, failpoint)
        net.link(net.ns_b, up=False)
        cut = time.monotonic()
        out, err = proc.communicate(timeout=PHASE_RPC_TIMEOUT + SLACK)
        took = time.monotonic() - cut
        assert proc.returncode == 1 and out == "", (out, err)
        # the answer of B's Finish is lost: A does not guess, it keeps the source paused
        assert err.strip().splitlines()[-1].startswith(
            "error: operation failed: Lost connection to destination host during Finish"
        ), err
        assert took < 2 * PHASE_RPC_TIMEOUT + SLACK, f"took {took:.1f}s"
        assert state(a, name) == "paused"
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
        net.link(net.ns_b, up=True)

    # once B answers again, A learns that B runs the domain and stops (undefines) its own
    wait_for(
        "A's srcd settling the migration",
        lambda: a.journal() == [] and runtime_record(a.state_dir, u) is None,
        PHASE_DSTD_MIGRATION_TIMEOUT + SLACK,
    )
    # B's Finish has run to its end by now (it was shielded, and its delay is shorter than
    # A's RPC deadline); and B keeps no incoming job after a Finish
    wait_for(
        "B's dstd ending its incoming job",
        lambda: b.journal() == [],
        PHASE_DSTD_MIGRATION_TIMEOUT + SLACK,
    )
    assert a.journal() == []
    where = running_on(a, b, u)
    if where == ["A", "B"]:
        states = f"A: {state(a, name)}, B: {state(b, name)}"
        defined = [h.name for h in (a, b) if h.domain_files()]
        raise SplitBrain(
            f"after {err.strip()!r}, the domain runs on both hosts ({states}; defined on {defined})"
        )
    assert len(where) == 1, f"domain runs on {where}"
    if where == ["A"]:  # rolled back: the source runs, untouched; B holds nothing
        assert state(a, name) == "running"
        assert checksum(a, u)["sha256"] == before_sha
        assert_nothing_on(b, name, u)
        move_until_ok(a, b, name)
    assert_moved(a, b, name, u, before_sha)
    b.migctl("destroy", name)


@pytest.mark.parametrize("mode", [("--p2p",), ()], ids=["p2p", "managed"])
def test_link_breaks_during_confirm(
    cut_hosts: Callable[..., tuple[Network, Host, Host]], domname: str, mode: tuple[str, ...]
) -> None:
    """B runs the domain and A is in Confirm when the link goes down: Confirm needs only
    A, so the migration completes; the domain runs on B only, defined on B only."""
    failpoint = "srcd.confirm.before"
    net, a, b = cut_hosts(
        rpc_timeout=PHASE_RPC_TIMEOUT,
        dstd_migration_timeout=PHASE_DSTD_MIGRATION_TIMEOUT,
        env_a={"VMMIGRATE_FAILPOINTS": f"{failpoint}=delay({PHASE_DELAY_MS})"},
    )
    name = domname
    u = start_domain(a, name, memory_mib=16)
    before_sha = checksum(a, u)["sha256"]
    proc = popen_migctl(a, *LIVE, *mode, "--undefinesource", name, b.dst)
    try:
        wait_failpoint(a, failpoint)
        net.link(net.ns_b, up=False)
        out, err = proc.communicate(timeout=PHASE_RPC_TIMEOUT + SLACK)
        assert proc.returncode == 0, (out, err)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
        net.link(net.ns_b, up=True)
    wait_for("A's job ending", lambda: a.journal() == [], SLACK)
    assert_moved(a, b, name, u, before_sha)
    b.migctl("destroy", name)
