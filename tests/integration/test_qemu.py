"""Live migration of real QEMU guests (TCG, SeaBIOS with no boot disk), when installed."""

from __future__ import annotations

import shutil
import uuid as uuidlib

import pytest
from helpers import domains
from helpers.hosts import Host
from helpers.qmp import qmp_for, runtime_record

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="QEMU not installed (qemu-system-x86)")


def qemu_domain_xml(name: str, u: str, memory_mib: int = 128) -> str:
    return domains.qemu_domain_xml(
        name, u, domain_type="qemu", memory_mib=memory_mib, emulator=QEMU
    )


@pytest.mark.parametrize("mode", [["--p2p"], ["--p2p", "--tunnelled"], []],
                         ids=["p2p", "tunnelled", "managed"])
def test_qemu_live_migration(hosts: tuple[Host, Host], domname: str, mode: list[str]) -> None:
    a, b = hosts
    u = str(uuidlib.uuid4())
    a.define(qemu_domain_xml(domname, u), f"{domname}.xml")
    a.migctl("start", domname)
    rec = runtime_record(a.state_dir, u)
    assert rec is not None and rec["emulator"] == "qemu"
    with qmp_for(a.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
    a.migctl("migrate", "--live", "--persistent", "--undefinesource", *mode, domname, b.dst,
             timeout=180)
    assert b.migctl("domstate", domname).stdout.strip() == "running"
    with qmp_for(b.state_dir, u) as q:
        assert q.cmd("query-status")["status"] == "running"
        assert q.cmd("query-uuid")["UUID"] == u
    assert runtime_record(a.state_dir, u) is None
    assert domname not in a.names()
    info = a.migctl("domjobinfo", domname, check=False)
    assert info.returncode == 1  # the source no longer knows the domain
    b.migctl("destroy", domname)
    assert b.migctl("domstate", domname).stdout.strip() == "shut off"
    b.migctl("undefine", domname)
