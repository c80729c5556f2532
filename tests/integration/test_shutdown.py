"""Operating the daemons: readiness to systemd over $NOTIFY_SOCKET, and SIGTERM's graceful
stop (new migrations refused, the one in flight finishes, the domain has one owner)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers.hosts import Host, sample_domain_xml
from helpers.live import runs_on_exactly_one, start_domain, state


def test_readiness_and_stopping_sent_to_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(20)
        a = Host("A", "127.0.0.2", tmp_path / "A")
        try:
            srcd = a.start_srcd(env={"NOTIFY_SOCKET": path})
            ready = rx.recv(4096).decode()
            assert ready.splitlines() == ["READY=1", f"STATUS=srcd serving on {a.src}"]
            srcd.proc.send_signal(signal.SIGTERM)
            assert rx.recv(4096).decode().startswith("STOPPING=1\n")
            assert srcd.proc.wait(timeout=20) == 0
        finally:
            a.stop()


def _events(h: Host, kind: str) -> list[str]:
    d = h.srcd if kind == "srcd" else h.dstd
    assert d is not None
    return [str(e.get("event")) for e in d.events()]


def test_sigterm_during_live_migration(fresh_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    u = start_domain(a, domname, memory_mib=64)
    other = f"{domname}-other"
    a.define(sample_domain_xml(other), f"{other}.xml")
    cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", a.src, "migrate", "--live",
           "--persistent", "--p2p", "--bandwidth", "8", domname, b.dst]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while "Unbounded" not in a.migctl("domjobinfo", domname).stdout:
        assert time.monotonic() < deadline, "the migration never started"
        time.sleep(0.05)
    assert a.srcd is not None
    a.srcd.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "daemon_stopping" not in _events(a, "srcd"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # during the grace period: a new migration is refused, queries still answer
    r = a.migctl("migrate", "--offline", "--persistent", "--p2p", other, b.dst, check=False)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: Failed to migrate domain '{other}'",
        "error: daemon is shutting down",
    ]
    assert state(a, domname) == "running"
    # the migration in flight finishes, then srcd exits (0: a clean stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert a.srcd.proc.wait(timeout=30) == 0
    assert "daemon_drained" in _events(a, "srcd")
    assert runs_on_exactly_one(a, b, u) == "B"
    assert state(b, domname) == "running"
    # the refused domain stayed where it was; a restarted srcd migrates it
    a.start_srcd()
    assert other in a.names() and other not in b.names()
    a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", other, b.dst)
    assert other in b.names()
    b.migctl("destroy", domname)
