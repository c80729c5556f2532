"""Mutual TLS end to end: real daemons with certificates from vmmigrate.migctl.certs.

Accepted: an admin client defines, starts and migrates (offline and live, p2p, client-driven
through srcd's relay, tunnelled). Refused in the handshake: no certificate, another CA's,
an expired one. Refused by role: a readonly client that defines, starts, migrates or aborts
(nothing changes), a client certificate calling dstd directly. Rotation: SIGHUP re-reads the
certificates; a new connection sees the new one, clients already issued keep working.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from helpers.hosts import Host, sample_domain_xml, wait_until
from helpers.live import runs_on_exactly_one, start_domain, state
from vmmigrate.migctl import certs

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

NOW = datetime.datetime.now(datetime.UTC)


class Pki:
    """A cluster CA and the certificates the tests use, in a tmp dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ca = base / "ca"
        # made a while ago, so that a certificate it signed can already have expired
        certs.init_ca(self.ca, now=NOW - datetime.timedelta(days=60))
        self.admin = self.client("admin", "admin")
        self.readonly = self.client("viewer", "readonly")
        self.expired = base / "expired"
        certs.issue_client(self.ca, name="old", role="admin", out=self.expired, days=1,
                           now=NOW - datetime.timedelta(days=30))
        certs.init_ca(base / "other-ca")
        self.other = base / "other"
        certs.issue_client(base / "other-ca", name="admin", role="admin", out=self.other)

    def client(self, name: str, role: str) -> Path:
        out = self.base / f"client-{name}"
        certs.issue_client(self.ca, name=name, role=role, out=out)
        return out

    def host(self, name: str, ip: str, out: Path | None = None) -> Path:
        out = out or self.base / f"host-{name}"
        certs.issue_host(self.ca, name=name, ips=[ip], out=out)
        return out


def tls_host(pki: Pki, name: str, ip: str, workdir: Path) -> Host:
    tls = pki.host(name.lower(), ip, workdir.parent / f"tls-{name}")
    h = Host(name, ip, workdir, migctl_args=["--tls-dir", str(pki.admin)])
    flags = ["--tls-dir", str(tls)]
    return h.start(srcd_args=flags, dstd_args=flags)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_hosts(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    base = tmp_path_factory.mktemp("tls-hosts")
    a = tls_host(pki, "A", "127.0.0.2", base / "A")
    b = tls_host(pki, "B", "127.0.0.3", base / "B")
    yield a, b
    a.stop()
    b.stop()


def migctl_as(h: Host, tls: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """migctl against ``h`` with another identity (None: no certificate, --insecure)."""
    ident = ["--insecure"] if tls is None else ["--tls-dir", str(tls)]
    return subprocess.run(
        [sys.executable, "-m", "vmmigrate.migctl", "-c", h.src, *ident, *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def secure_channel(address: str, tls: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(), (tls / "key.pem").read_bytes(),
        (tls / "cert.pem").read_bytes(),
    )
    return grpc.secure_channel(address, creds, options=[("grpc.enable_http_proxy", 0)])


def served_serial(address: str, tls: Path) -> int:
    """The serial of the certificate the daemon at ``address`` shows in a new handshake."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    ctx.load_cert_chain(str(tls / "cert.pem"), str(tls / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def define(h: Host, name: str) -> str:
    u = str(uuidlib.uuid4())
    h.define(sample_domain_xml(name, u), f"{name}.xml")
    return u


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("mode", ["p2p", "managed"])
def test_offline_migration_over_mtls(tls_hosts: tuple[Host, Host], domname: str, mode: str) -> None:
    a, b = tls_hosts
    define(a, domname)
    before = a.migctl("dumpxml", domname).stdout
    p2p = ["--p2p"] if mode == "p2p" else []
    a.migctl("migrate", "--offline", "--persistent", "--undefinesource", *p2p, domname, b.dst)
    assert domname in b.names() and domname not in a.names()
    assert b.migctl("dumpxml", domname).stdout == before
    b.migctl("migrate", "--offline", "--persistent", "--undefinesource", *p2p, domname, a.dst)
    assert domname in a.names() and domname not in b.names()


def test_live_migrations_over_mtls(tls_hosts: tuple[Host, Host], domname: str) -> None:
    """p2p, client-driven (through srcd's relay) and tunnelled, there and back."""
    a, b = tls_hosts
    u = start_domain(a, domname)
    a.migctl("migrate", "--live", "--persistent", "--undefinesource", "--p2p", domname, b.dst)
    assert runs_on_exactly_one(a, b, u) == "B" and state(b, domname) == "running"
    b.migctl("migrate", "--live", "--persistent", "--undefinesource", domname, a.dst)
    assert runs_on_exactly_one(a, b, u) == "A" and state(a, domname) == "running"
    a.migctl("migrate", "--live", "--persistent", "--undefinesource", "--p2p", "--tunnelled",
             domname, b.dst)
    assert runs_on_exactly_one(a, b, u) == "B" and state(b, domname) == "running"
    b.migctl("destroy", domname)


def test_health_answers_any_certificate_of_the_cluster(tls_hosts: tuple[Host, Host],
                                                       pki: Pki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    a, b = tls_hosts
    for address in (a.src, b.dst):
        with secure_channel(address, pki.readonly) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- refused


def test_no_certificate_is_refused(tls_hosts: tuple[Host, Host]) -> None:
    a, _ = tls_hosts
    r = migctl_as(a, None, "list", "--all")
    assert r.returncode == 1
    assert "error: " in r.stderr and "does the daemon require TLS" in r.stderr


def test_another_cas_certificate_is_refused(tls_hosts: tuple[Host, Host], pki: Pki) -> None:
    a, _ = tls_hosts
    r = migctl_as(a, pki.other, "list", "--all")
    assert r.returncode == 1
    assert r.stderr.startswith("error: authentication failed: TLS handshake")
    assert "check --tls-dir" in r.stderr


def test_expired_certificate_is_refused(tls_hosts: tuple[Host, Host], pki: Pki) -> None:
    a, _ = tls_hosts
    r = migctl_as(a, pki.expired, "list", "--all")
    assert r.returncode == 1
    assert "error: authentication failed: the certificate in" in r.stderr
    assert "expired on" in r.stderr
    # and the daemon refuses it in the handshake too, before any handler, when a client
    # does not check its own certificate first
    with secure_channel(a.src, pki.expired) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.DomainServiceStub(ch).List(pb.ListRequest(all=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert a.srcd is not None
    assert "rpc_refused" not in a.srcd.output()  # refused before the role check, in TLS


def test_readonly_client_may_query_not_change(tls_hosts: tuple[Host, Host], pki: Pki,
                                              domname: str) -> None:
    a, b = tls_hosts
    u = start_domain(a, domname)
    files_a, files_b = a.domain_files(), b.domain_files()
    assert domname in migctl_as(a, pki.readonly, "list", "--all", "--name").stdout
    for query in (("dominfo", domname), ("domstate", domname), ("dumpxml", domname),
                  ("domjobinfo", domname), ("migrate-getspeed", domname)):
        assert migctl_as(a, pki.readonly, *query).returncode == 0, query
    xml = a.workdir / "ro.xml"
    xml.write_text(sample_domain_xml(f"{domname}-ro"))
    for change in (("define", str(xml)), ("start", domname), ("destroy", domname),
                   ("migrate", "--live", "--p2p", domname, b.dst),
                   ("migrate", "--live", domname, b.dst),
                   ("domjobabort", domname)):
        r = migctl_as(a, pki.readonly, *change)
        assert r.returncode == 1, change
        assert "error: operation forbidden: read-only access prevents" in r.stderr, r.stderr
    assert a.domain_files() == files_a and b.domain_files() == files_b
    assert f"{domname}-ro" not in a.names()
    assert runs_on_exactly_one(a, b, u) == "A" and state(a, domname) == "running"
    a.migctl("destroy", domname)


def test_client_certificate_cannot_call_dstd(tls_hosts: tuple[Host, Host], pki: Pki,
                                             domname: str) -> None:
    a, b = tls_hosts
    define(a, domname)
    xml = a.migctl("dumpxml", domname).stdout
    with secure_channel(b.dst, pki.admin) as ch:
        stub = pb_grpc.MigrationDestinationServiceStub(ch)
        request = pb.PrepareRequest(
            header=pb.PhaseHeader(migration_id=str(uuidlib.uuid4()), flags=0), domain_xml=xml)
        for call in (stub.Prepare, stub.PrepareTunnel):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "accepts host certificates only" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.GetCapabilities(pb.CapabilitiesRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert domname not in b.names() and b.journal() == []


def test_plaintext_refused_on_a_non_loopback_address(tmp_path: Path) -> None:
    """Refused before it binds (0.0.0.0 is never bound here: the check comes first)."""
    for kind in ("srcd", "dstd"):
        r = subprocess.run(
            [sys.executable, "-m", f"vmmigrate.{kind}", "--listen", "0.0.0.0:0",
             "--state-dir", str(tmp_path / kind)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 1
        assert "refusing to listen in plaintext on 0.0.0.0:0" in r.stderr
        assert "--tls-dir" in r.stderr and "--insecure" in r.stderr


# --------------------------------------------------------------------------- rotation


def test_sighup_rotates_certificates(pki: Pki, tmp_path: Path, domname: str) -> None:
    a = tls_host(pki, "A", "127.0.0.4", tmp_path / "A")
    b = tls_host(pki, "B", "127.0.0.5", tmp_path / "B")
    try:
        assert a.srcd is not None and b.dstd is not None
        tls_a = tmp_path / "tls-A"
        old = served_serial(a.src, pki.admin)
        assert old == x509.load_pem_x509_certificate((tls_a / "cert.pem").read_bytes()).serial_number
        define(a, domname)  # a connection opened before the rotation
        new_cert = certs.issue_host(pki.ca, name="a", ips=["127.0.0.4"], out=tls_a)
        os.kill(a.srcd.proc.pid, signal.SIGHUP)
        wait_until(lambda: "tls_reloaded" in a.srcd.output(), 10, "srcd re-reads its certificates")  # type: ignore[union-attr]
        assert served_serial(a.src, pki.admin) == new_cert.serial_number != old
        # clients issued before go on working; srcd's channel to dstd now shows the new
        # certificate as its client certificate
        a.migctl("migrate", "--offline", "--persistent", "--p2p", domname, b.dst)
        assert domname in b.names()
        # a rotation that leaves a key of another certificate keeps what is in use
        shutil.copy(pki.admin / "key.pem", tls_a / "key.pem")
        os.kill(a.srcd.proc.pid, signal.SIGHUP)
        wait_until(lambda: "tls_reload_failed" in a.srcd.output(), 10, "a refused re-read")  # type: ignore[union-attr]
        assert served_serial(a.src, pki.admin) == new_cert.serial_number
        assert domname in a.names()
    finally:
        a.stop()
        b.stop()
