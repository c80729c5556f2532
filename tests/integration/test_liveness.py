"""Health checking, parked jobs that expire, and a destination whose disk is full."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.hosts import Host, sample_domain_xml
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OPTS = [("grpc.enable_http_proxy", 0)]
OFFLINE = int(MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST)


@pytest.mark.parametrize(("daemon", "service"), [
    ("srcd", "vmmigrate.v1.DomainService"), ("srcd", "vmmigrate.v1.MigrationSourceService"),
    ("dstd", "vmmigrate.v1.MigrationDestinationService"), ("srcd", ""), ("dstd", "")])
def test_health_checking(hosts: tuple[Host, Host], daemon: str, service: str) -> None:
    a, _ = hosts
    address = a.src if daemon == "srcd" else a.dst
    with grpc.insecure_channel(address, options=OPTS) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                 timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_parked_jobs_expire_on_both_sides(tmp_path: Path) -> None:
    """A client that runs Begin and Prepare and then vanishes: the source job and the
    destination reservation both go once the idle time passes."""
    a = Host("A", "127.0.0.2", tmp_path / "A")
    b = Host("B", "127.0.0.3", tmp_path / "B")
    cfg = tmp_path / "short.toml"
    cfg.write_text("job_idle_timeout = 1.0\n")
    try:
        a.start(srcd_args=["--config", str(cfg)])
        b.start(dstd_args=["--config", str(cfg)])
        a.define(sample_domain_xml("parked"), "parked.xml")
        flags = OFFLINE | int(MigrateFlag.CHANGE_PROTECTION)
        with grpc.insecure_channel(a.src, options=OPTS) as sch, \
                grpc.insecure_channel(b.dst, options=OPTS) as dch:
            begun = pb_grpc.MigrationSourceServiceStub(sch).Begin(pb.BeginRequest(
                header=pb.PhaseHeader(migration_id="parked-1", flags=flags), domain="parked"),
                timeout=5)
            pb_grpc.MigrationDestinationServiceStub(dch).Prepare(pb.PrepareRequest(
                header=pb.PhaseHeader(migration_id="parked-1", flags=OFFLINE,
                                      cookie=begun.cookie),
                domain_xml=begun.domain_xml), timeout=5)
        assert len(a.journal()) == 1 and len(b.journal()) == 1
        deadline = time.monotonic() + 10
        while (a.journal() or b.journal()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert a.journal() == [] and b.journal() == []
        assert b.names() == [] and a.names() == ["parked"]
        a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "parked",
                 b.dst)
        assert b.names() == ["parked"] and a.names() == []
    finally:
        a.stop()
        b.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_destination_disk_full_during_finish(tmp_path: Path) -> None:
    """dstd's state dir on a tiny tmpfs that is full by Finish: a clear error, the source is
    untouched, the destination holds no half-written config and no reservation."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    # room, once the filler is gone, for the retry's reservation, definition and outcome (a
    # record and its atomic rewrite of 120 kB each) and the store lock's pages
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    a = Host("A", "127.0.0.2", tmp_path / "A")
    b = Host("B", "127.0.0.3", tmp_path / "B")
    b.state_dir = mnt / "state"
    try:
        a.start()
        b.start()
        # a definition big enough not to fit in what is left once the disk is filled
        big = sample_domain_xml("bulky").replace(
            "test domain", "x" * 120_000)
        a.define(big, "bulky.xml")
        filler = mnt / "filler"
        with filler.open("wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        r = a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource",
                     "bulky", b.dst, check=False)
        assert r.returncode == 1
        assert "No space left on device" in r.stderr, r.stderr
        assert a.names() == ["bulky"] and a.journal() == []
        assert list((b.state_dir / "domains").iterdir()) == []  # not even a temp file
        filler.unlink()
        assert b.journal() == [] and b.names() == []
        a.migctl("migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "bulky",
                 b.dst)
        assert b.names() == ["bulky"]
    finally:
        a.stop()
        b.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
