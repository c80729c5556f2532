"""migctl pki (migctl/certs.py, migctl/pki.py) and peer_identity (common/pki_identity.py).

Certificates are made through migctl's real command line, checked with cryptography's own
path validation (and openssl's when it is installed), and used in a real mutual-TLS gRPC
handshake on loopback.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from vmmigrate.common.errors import InvalidArgument, Unauthenticated, error_from_status
from vmmigrate.common.pki_identity import (
    Identity,
    identity_from_auth_context,
    peer_identity,
)
from vmmigrate.migctl import certs
from vmmigrate.migctl.main import main

NOW = datetime.datetime.now(datetime.UTC)


def migctl(*argv: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0


def migctl_fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    """A CA, a host certificate (hosta, 127.0.0.1) and two clients (admin, readonly)."""
    ca = tmp_path / "ca"
    migctl("pki", "init", str(ca))
    migctl(
        "pki",
        "issue",
        str(ca),
        "--host",
        "hosta",
        "--ip",
        "127.0.0.1",
        "--ip",
        "::1",
        "--out",
        str(tmp_path / "hosta"),
    )
    migctl(
        "pki",
        "issue",
        str(ca),
        "--client",
        "alice",
        "--role",
        "admin",
        "--out",
        str(tmp_path / "alice"),
    )
    migctl(
        "pki",
        "issue",
        str(ca),
        "--client",
        "bob",
        "--role",
        "readonly",
        "--out",
        str(tmp_path / "bob"),
    )
    return tmp_path


# -- the files --------------------------------------------------------------------------


def test_init_writes_a_ten_year_p256_ca_with_a_private_key(tmp_path: Path) -> None:
    ca_dir = tmp_path / "new" / "ca"
    migctl("pki", "init", str(ca_dir), "--name", "Cluster One")
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca-key.pem") == 0o600
    assert mode(ca_dir / "ca.pem") == 0o644
    ca = load(ca_dir / "ca.pem")
    assert ca.subject.rfc4514_string() == "CN=Cluster One"
    assert ca.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3650, hours=1)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-key.pem", "ca.pem"]


def test_default_ca_name(tmp_path: Path) -> None:
    migctl("pki", "init", str(tmp_path / "ca"))
    assert load(tmp_path / "ca" / "ca.pem").subject.rfc4514_string() == "CN=vmmigrate CA"


def test_issue_writes_three_files_key_private_dir_private(cluster: Path) -> None:
    for who in ("hosta", "alice", "bob"):
        out = cluster / who
        assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
        assert mode(out) == 0o700
        assert mode(out / "key.pem") == 0o600
        assert (out / "ca.pem").read_bytes() == (cluster / "ca" / "ca.pem").read_bytes()
        key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
        cert = load(out / "cert.pem")
        assert key.public_key() == cert.public_key()


def test_host_certificate_fields(cluster: Path) -> None:
    cert = load(cluster / "hosta" / "cert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hosta"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hosta"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert peer_identity((cluster / "hosta" / "cert.pem").read_bytes()) == Identity(
        kind="host", name="hosta", role=None
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=825) <= lifetime <= datetime.timedelta(days=825, hours=1)


def test_client_certificate_fields(cluster: Path) -> None:
    for who, role in (("alice", "admin"), ("bob", "readonly")):
        cert = load(cluster / who / "cert.pem")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        pem = (cluster / who / "cert.pem").read_bytes()
        assert peer_identity(pem) == Identity(kind="client", name=who, role=role)


def test_host_named_by_ip_gets_an_ip_san(tmp_path: Path) -> None:
    migctl("pki", "init", str(tmp_path / "ca"))
    migctl(
        "pki",
        "issue",
        str(tmp_path / "ca"),
        "--host",
        "10.0.0.5",
        "--ip",
        "10.0.0.5",
        "--out",
        str(tmp_path / "h"),
    )
    cert = load(tmp_path / "h" / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


def test_days_sets_the_leaf_lifetime(tmp_path: Path) -> None:
    migctl("pki", "init", str(tmp_path / "ca"))
    migctl(
        "pki",
        "issue",
        str(tmp_path / "ca"),
        "--client",
        "c",
        "--role",
        "admin",
        "--days",
        "30",
        "--out",
        str(tmp_path / "c"),
    )
    cert = load(tmp_path / "c" / "cert.pem")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, hours=1)


def test_reissue_replaces_the_files_atomically(cluster: Path) -> None:
    before = (cluster / "alice" / "cert.pem").read_bytes()
    migctl(
        "pki",
        "issue",
        str(cluster / "ca"),
        "--client",
        "alice",
        "--role",
        "readonly",
        "--out",
        str(cluster / "alice"),
    )
    assert (cluster / "alice" / "cert.pem").read_bytes() != before
    assert peer_identity((cluster / "alice" / "cert.pem").read_bytes()).role == "readonly"
    assert sorted(p.name for p in (cluster / "alice").iterdir()) == [
        "ca.pem",
        "cert.pem",
        "key.pem",
    ]


# -- the certificates verify against the CA -----------------------------------------------


def _store(ca_pem: Path) -> verification.Store:
    return verification.Store([load(ca_pem)])


def _client_verifier(store: verification.Store) -> verification.ClientVerifier:
    # The Web PKI profile wants a SubjectAltName in every leaf; a client certificate has none
    # (its holder is no network name), and TLS stacks (BoringSSL, OpenSSL) do not ask for it.
    ee = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    ca = verification.ExtensionPolicy.webpki_defaults_ca()
    builder = (
        verification.PolicyBuilder().store(store).extension_policies(ca_policy=ca, ee_policy=ee)
    )
    return builder.build_client_verifier()


def test_certificates_verify_against_their_ca(cluster: Path) -> None:
    store = _store(cluster / "ca" / "ca.pem")
    host = load(cluster / "hosta" / "cert.pem")
    server = (
        verification.PolicyBuilder()
        .store(store)
        .build_server_verifier(verification.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    server.verify(host, [])
    by_name = (
        verification.PolicyBuilder()
        .store(store)
        .build_server_verifier(verification.DNSName("hosta"))
    )
    by_name.verify(host, [])
    client = _client_verifier(store)
    # a host is also a client (srcd calls dstd in p2p), and clients verify as clients
    for who in ("hosta", "alice", "bob"):
        client.verify(load(cluster / who / "cert.pem"), [])


def test_another_ca_does_not_verify(cluster: Path, tmp_path: Path) -> None:
    migctl("pki", "init", str(tmp_path / "other"))
    client = _client_verifier(_store(tmp_path / "other" / "ca.pem"))
    with pytest.raises(verification.VerificationError):
        client.verify(load(cluster / "alice" / "cert.pem"), [])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_verifies_with_the_right_purpose(cluster: Path) -> None:
    def verify(who: str, purpose: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                str(cluster / who / "ca.pem"),
                str(cluster / who / "cert.pem"),
            ],
            capture_output=True,
            text=True,
        )

    assert verify("hosta", "sslserver").returncode == 0
    assert verify("hosta", "sslclient").returncode == 0
    assert verify("alice", "sslclient").returncode == 0
    assert verify("alice", "sslserver").returncode != 0


# -- refusals -----------------------------------------------------------------------------


def test_init_refuses_to_overwrite_a_ca_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    migctl("pki", "init", str(ca))
    first = (ca / "ca.pem").read_bytes()
    err = migctl_fails(capsys, "pki", "init", str(ca))
    assert "a CA already exists" in err and "--force" in err
    assert (ca / "ca.pem").read_bytes() == first
    # half a CA (a lone key) is refused as well: it may be the only copy of that key
    (ca / "ca.pem").unlink()
    assert "ca-key.pem" in migctl_fails(capsys, "pki", "init", str(ca))
    migctl("pki", "init", str(ca), "--force")
    assert (ca / "ca.pem").read_bytes() != first
    assert mode(ca / "ca-key.pem") == 0o600


def test_issue_without_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = migctl_fails(
        capsys, "pki", "issue", str(tmp_path / "none"), "--host", "h", "--out", str(tmp_path / "o")
    )
    assert "no CA in" in err and "migctl pki init" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--host", "h", "--client", "c"], "not allowed with"),
        ([], "one of the arguments --host --client is required"),
        (["--client", "c"], "--client needs --role admin|readonly"),
        (["--client", "c", "--role", "root"], "role must be one of admin, readonly"),
        (["--host", "h", "--role", "admin"], "--role applies to --client"),
        (["--client", "c", "--role", "admin", "--ip", "10.0.0.1"], "--ip applies to --host"),
        (["--host", "h", "--ip", "10.0.0.300"], "'10.0.0.300' is not an IP address"),
        (["--host", "h", "--ip", "hostb"], "'hostb' is not an IP address"),
        (["--host", "bad host!"], "is not a valid host name"),
        (["--host", ""], "host name must be 1 to 64"),
        (["--client", "x" * 65, "--role", "admin"], "client name must be 1 to 64"),
        (["--host", "h", "--days", "0"], "--days must be at least 1"),
        (["--host", "h", "--days", "4000"], "would outlive the CA"),
        (["--host", "h", "--days", "many"], "invalid int value"),
    ],
)
def test_issue_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    migctl("pki", "init", str(tmp_path / "ca"))
    out = tmp_path / "out"
    err = migctl_fails(capsys, "pki", "issue", str(tmp_path / "ca"), "--out", str(out), *args)
    assert expected in err
    assert not out.exists()


def test_pki_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert "init|issue" in migctl_fails(capsys, "pki")


def test_issue_refuses_a_ca_whose_key_does_not_match(tmp_path: Path) -> None:
    migctl("pki", "init", str(tmp_path / "a"))
    migctl("pki", "init", str(tmp_path / "b"))
    shutil.copy(tmp_path / "b" / "ca-key.pem", tmp_path / "a" / "ca-key.pem")
    with pytest.raises(InvalidArgument, match="is not the key of"):
        certs.issue_host(tmp_path / "a", name="h", out=tmp_path / "o")


def test_issue_refuses_an_expired_ca(tmp_path: Path) -> None:
    certs.init_ca(tmp_path / "ca", days=1, now=NOW - datetime.timedelta(days=3))
    with pytest.raises(InvalidArgument, match="expired on"):
        certs.issue_client(tmp_path / "ca", name="c", role="admin", out=tmp_path / "o")


# -- peer_identity ------------------------------------------------------------------------


def _self_signed(attributes: list[x509.NameAttribute]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(attributes)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _ou(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, value)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        (
            [_cn("x")],
            "exactly one vmmigrate kind (OU=vmmigrate:host or OU=vmmigrate:client) (found none)",
        ),
        ([_cn("x"), _ou("Engineering")], "exactly one vmmigrate kind"),
        ([_ou("vmmigrate:host")], "exactly one common name (found none)"),
        ([_cn("x"), _ou("vmmigrate:client")], "exactly one vmmigrate role"),
        (
            [
                _cn("x"),
                _ou("vmmigrate:client"),
                _ou("vmmigrate:role=admin"),
                _ou("vmmigrate:role=readonly"),
            ],
            "exactly one vmmigrate role",
        ),
        ([_cn("x"), _ou("vmmigrate:host"), _ou("vmmigrate:client")], "exactly one vmmigrate kind"),
        ([_cn("x"), _ou("vmmigrate:host"), _ou("vmmigrate:role=admin")], "must not carry a role"),
        (
            [_cn("x"), _ou("vmmigrate:client"), _ou("vmmigrate:role=root")],
            "unknown vmmigrate fields: vmmigrate:role=root",
        ),
    ],
)
def test_peer_identity_refuses_a_certificate_without_the_fields(
    attributes: list[x509.NameAttribute], expected: str
) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        peer_identity(_self_signed(attributes))
    assert expected in str(exc_info.value)
    assert str(exc_info.value).startswith("authentication failed: ")
    assert exc_info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_peer_identity_ignores_foreign_units() -> None:
    pem = _self_signed(
        [_cn("x"), _ou("Engineering"), _ou("vmmigrate:client"), _ou("vmmigrate:role=readonly")]
    )
    assert peer_identity(pem) == Identity(kind="client", name="x", role="readonly")


def test_peer_identity_refuses_garbage_and_an_empty_auth_context() -> None:
    with pytest.raises(Unauthenticated, match="cannot be parsed"):
        peer_identity(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(Unauthenticated, match="presented no certificate"):
        identity_from_auth_context({"transport_security_type": [b"ssl"]})


def test_unauthenticated_crosses_the_wire_as_itself() -> None:
    err = error_from_status(grpc.StatusCode.UNAUTHENTICATED, "authentication failed: x", None)
    assert isinstance(err, Unauthenticated)


# -- a real mutual-TLS handshake ----------------------------------------------------------


class _RecordingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, noting who called it (as a daemon's handler will)."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[Identity] = []

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.callers.append(identity_from_auth_context(context.auth_context()))
        return await super().Check(request, context)


def _files(out: Path) -> tuple[bytes, bytes, bytes]:
    return tuple((out / name).read_bytes() for name in ("ca.pem", "key.pem", "cert.pem"))  # type: ignore[return-value]


async def _check(port: int, client: Path | None, ca: bytes) -> grpc.StatusCode:
    if client is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        _, key, cert = _files(client)
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
    # the address is an IP: the server is verified against the host certificate's IP SAN
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def test_mutual_tls_handshake_with_grpc(cluster: Path, tmp_path: Path) -> None:
    migctl("pki", "init", str(tmp_path / "other"))
    migctl(
        "pki",
        "issue",
        str(tmp_path / "other"),
        "--client",
        "mallory",
        "--role",
        "admin",
        "--out",
        str(tmp_path / "mallory"),
    )
    certs.issue_client(
        cluster / "ca",
        name="late",
        role="admin",
        out=tmp_path / "expired",
        days=1,
        now=NOW - datetime.timedelta(days=3),
    )
    ca, host_key, host_cert = _files(cluster / "hosta")

    async def scenario() -> None:
        server = grpc.aio.server()
        servicer = _RecordingHealth()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        creds = grpc.ssl_server_credentials(
            [(host_key, host_cert)], root_certificates=ca, require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            assert await _check(port, cluster / "alice", ca) == grpc.StatusCode.OK
            assert await _check(port, cluster / "bob", ca) == grpc.StatusCode.OK
            # a host calling another host (srcd -> dstd in p2p) with the same kind of cert
            assert await _check(port, cluster / "hosta", ca) == grpc.StatusCode.OK
            # refused in the handshake, before any handler runs
            assert await _check(port, tmp_path / "mallory", ca) == grpc.StatusCode.UNAVAILABLE
            assert await _check(port, tmp_path / "expired", ca) == grpc.StatusCode.UNAVAILABLE
            assert await _check(port, None, ca) == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)
        assert servicer.callers == [
            Identity(kind="client", name="alice", role="admin"),
            Identity(kind="client", name="bob", role="readonly"),
            Identity(kind="host", name="hosta", role=None),
        ]

    asyncio.run(scenario())
