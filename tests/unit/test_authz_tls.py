"""The role table (common/authz.py) and the TLS material and plaintext rules (common/tls.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from vmmigrate.common.authz import DSTD_POLICY, READONLY_METHODS, SRCD_POLICY, authorize
from vmmigrate.common.errors import InvalidArgument, PermissionDenied
from vmmigrate.common.pki_identity import Identity
from vmmigrate.common.tls import TlsFiles, daemon_tls, load_material
from vmmigrate.migctl import certs

ADMIN = Identity(kind="client", name="op", role="admin")
READONLY = Identity(kind="client", name="viewer", role="readonly")
HOST = Identity(kind="host", name="hosta", role=None)
DOM = "/vmmigrate.v1.DomainService/"


def test_readonly_may_query_only() -> None:
    for method in READONLY_METHODS:
        authorize(SRCD_POLICY, READONLY, method)
    for name in ("Define", "Start", "Migrate", "AbortJob", "SetMaxSpeed"):
        with pytest.raises(PermissionDenied) as err:
            authorize(SRCD_POLICY, READONLY, DOM + name)
        assert str(err.value).startswith("operation forbidden: read-only access prevents")
    with pytest.raises(PermissionDenied):
        authorize(SRCD_POLICY, READONLY, "/vmmigrate.v1.MigrationSourceService/DestinationPrepare")


def test_admin_and_hosts_may_call_srcd() -> None:
    for who in (ADMIN, HOST):
        authorize(SRCD_POLICY, who, DOM + "Define")
        authorize(SRCD_POLICY, who, "/vmmigrate.v1.MigrationSourceService/Begin")


def test_dstd_takes_hosts_only_but_health_is_open() -> None:
    authorize(DSTD_POLICY, HOST, "/vmmigrate.v1.MigrationDestinationService/Prepare")
    for who in (ADMIN, READONLY):
        with pytest.raises(PermissionDenied) as err:
            authorize(DSTD_POLICY, who, "/vmmigrate.v1.MigrationDestinationService/Prepare")
        assert "accepts host certificates only" in str(err.value)
        authorize(DSTD_POLICY, who, "/grpc.health.v1.Health/Check")


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    certs.init_ca(tmp_path / "ca")
    certs.issue_host(tmp_path / "ca", name="hosta", ips=["10.0.0.1"], out=tmp_path / "h")
    return tmp_path / "h"


def test_material_must_be_whole_and_matching(tls_dir: Path, tmp_path: Path) -> None:
    assert load_material(tls_dir).serial > 0
    certs.issue_host(tmp_path / "ca", name="hostb", out=tmp_path / "other")
    shutil.copy(tmp_path / "other" / "key.pem", tls_dir / "key.pem")
    with pytest.raises(InvalidArgument, match=r"is not the key of cert\.pem"):
        load_material(tls_dir)
    (tls_dir / "key.pem").unlink()
    with pytest.raises(InvalidArgument, match="cannot read TLS material"):
        load_material(tls_dir)


def test_reload_keeps_what_works(tls_dir: Path, tmp_path: Path) -> None:
    files = TlsFiles(tls_dir)
    first = files.current()
    (tls_dir / "cert.pem").write_text("garbage")
    files.request_reload()
    assert files.current() == first and files.generation == 0
    certs.issue_host(tmp_path / "ca", name="hosta", out=tls_dir)
    files.request_reload()
    assert files.current().serial != first.serial and files.generation == 1


def test_plaintext_only_on_loopback_or_when_asked(tls_dir: Path) -> None:
    assert daemon_tls("127.0.0.2:7301", None, False) is None
    assert daemon_tls("[::1]:7301", None, False) is None
    assert daemon_tls("10.0.0.1:7301", None, True) is None
    with pytest.raises(InvalidArgument, match=r"refusing to listen in plaintext on 0\.0\.0\.0:7301"):
        daemon_tls("0.0.0.0:7301", None, False)
    assert daemon_tls("10.0.0.1:7301", tls_dir, False) is not None
