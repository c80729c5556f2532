"""A cluster's certificate authority, and the host and client certificates it issues.

The files, as libvirt lays out /etc/pki (one CA per cluster, one key pair per host):

    DIR/ca.pem, DIR/ca-key.pem         the CA (``init``); the key never leaves DIR
    OUT/ca.pem, OUT/cert.pem, OUT/key.pem   what one host or one client needs (``issue``)

Keys are ECDSA P-256: gRPC's TLS (BoringSSL) accepts them for both server and client
authentication, and it refuses Ed25519 certificates (the handshake fails with
NO_COMMON_SIGNATURE_ALGORITHMS, checked with grpcio 1.85). Keys are written unencrypted,
mode 0600, in directories mode 0700: the daemons must start unattended, as libvirtd does
with /etc/pki/libvirt/private/serverkey.pem.

A host certificate serves both ways (serverAuth and clientAuth): srcd is dstd's client in a
peer-to-peer migration. A client certificate is clientAuth only. Who the holder is (kind,
name, role) is in the subject, as src/common/pki_identity.py reads it back.

Every function takes the directories and options as arguments and ``now`` for tests
(certificates already expired, or not yet valid); nothing here reads the environment.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from vmmigrate.common.durable import atomic_write, storage_error
from vmmigrate.common.errors import InvalidArgument, OperationInvalid
from vmmigrate.common.pki_identity import ROLES, Kind, Role, kind_unit, role_unit
from vmmigrate.migctl.pki import DEFAULT_CA_NAME, DEFAULT_LEAF_DAYS

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca-key.pem"
CERT: Final = "cert.pem"
KEY: Final = "key.pem"
CA_DAYS: Final = 3650
# Backdate every certificate a little, so that a peer whose clock is a few minutes behind
# the issuer's does not refuse a certificate issued moments ago.
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
# X.520's upper bound for a common name.
MAX_NAME: Final = 64
# A DNS name as a SAN may carry it: labels of letters, digits, '-' and '_' (the last is
# common in internal names, and BoringSSL matches it literally).
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


@dataclass(frozen=True)
class Authority:
    """A loaded CA: the certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _utcnow(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_private_dir(path: Path) -> None:
    """Create ``path`` mode 0700 if it is missing; an existing directory keeps its mode."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error("create", path, exc) from exc
    if not path.is_dir():
        raise InvalidArgument(f"invalid argument: '{path}' is not a directory")


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    # atomic_write creates files 0600; certificates are public, so they are opened up after
    # the rename (the file is only ever more private than its final mode, never less).
    atomic_write(path, data)
    if not secret:
        try:
            os.chmod(path, 0o644)
        except OSError as exc:
            raise storage_error("chmod", path, exc) from exc


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidArgument(
            f"invalid argument: {what} must be 1 to {MAX_NAME} printable characters: {name!r}"
        )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(
    directory: Path,
    *,
    name: str = DEFAULT_CA_NAME,
    force: bool = False,
    days: int = CA_DAYS,
    now: datetime.datetime | None = None,
) -> Authority:
    """Create a new CA in ``directory``; refuses to replace one unless ``force``."""
    _check_name(name, "CA name")
    present = [p for p in (directory / CA_CERT, directory / CA_KEY) if p.exists()]
    if present and not force:
        raise OperationInvalid(
            f"Requested operation is not valid: a CA already exists in '{directory}' "
            f"({', '.join(p.name for p in present)}); use --force to replace it"
        )
    _make_private_dir(directory)
    start = _utcnow(now)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + datetime.timedelta(days=days))
        # path_length=0: this CA signs leaves only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a CA certificate without its key would be unusable, whereas a lone new
    # key is still refused as "a CA already exists" and replaced by the next --force.
    _write(directory / CA_KEY, _key_pem(key), secret=True)
    _write(directory / CA_CERT, _cert_pem(cert), secret=False)
    return Authority(cert=cert, key=key)


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path, directory: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidArgument(
            f"invalid argument: no CA in '{directory}': {path.name} not found "
            f"(create one with 'migctl pki init {directory}')"
        ) from exc
    except OSError as exc:
        raise storage_error("read", path, exc) from exc


def load_ca(directory: Path, *, now: datetime.datetime | None = None) -> Authority:
    """The CA in ``directory``, checked: a CA certificate, its key, and still valid."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    cert_pem, key_pem = _read(cert_path, directory), _read(key_path, directory)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"invalid argument: unreadable CA in '{directory}': {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(
        cert.public_key()
    ):
        raise InvalidArgument(
            f"invalid argument: {key_path} is not the key of {cert_path} (re-run 'migctl pki init')"
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InvalidArgument(f"invalid argument: {cert_path} is not a CA certificate")
    expiry = cert.not_valid_after_utc
    if _utcnow(now) >= expiry:
        raise InvalidArgument(
            f"invalid argument: the CA in '{directory}' expired on {expiry:%Y-%m-%d}"
        )
    return Authority(cert=cert, key=key)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress:
    """An --ip value, or InvalidArgument."""
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid argument: '{text}' is not an IP address") from exc


def _host_names(name: str, ips: list[str]) -> list[x509.GeneralName]:
    """The SubjectAltName entries of a host: its name (DNS, or IP if it is one) and --ip."""
    _check_name(name, "host name")
    entries: list[x509.GeneralName] = []
    try:
        entries.append(x509.IPAddress(ipaddress.ip_address(name)))
    except ValueError:
        if not _HOSTNAME.match(name):
            raise InvalidArgument(f"invalid argument: '{name}' is not a valid host name") from None
        entries.append(x509.DNSName(name))
    for text in ips:
        entry = x509.IPAddress(parse_ip(text))
        if entry not in entries:
            entries.append(entry)
    return entries


def _validity(
    ca: Authority, days: int, now: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise InvalidArgument(f"invalid argument: --days must be at least 1, not {days}")
    start = _utcnow(now)
    end = start + datetime.timedelta(days=days)
    # A certificate that outlives its CA would stop working on a day nobody expects; say so
    # now rather than clamp it silently.
    if end > ca.cert.not_valid_after_utc:
        raise InvalidArgument(
            f"invalid argument: a certificate valid {days} days would outlive the CA "
            f"(it expires on {ca.cert.not_valid_after_utc:%Y-%m-%d}); use a smaller --days"
        )
    return start - CLOCK_SKEW, end


@dataclass(frozen=True)
class _Leaf:
    name: str
    kind: Kind
    role: Role | None
    usages: list[x509.ObjectIdentifier]
    alt_names: list[x509.GeneralName]


def _sign_leaf(
    ca: Authority, leaf: _Leaf, days: int, now: datetime.datetime | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    not_before, not_after = _validity(ca, days, now)
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, leaf.name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind_unit(leaf.kind)),
    ]
    if leaf.role is not None:
        attributes.append(
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role_unit(leaf.role))
        )
    key = _new_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(leaf.usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
    )
    if leaf.alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(leaf.alt_names), False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _write_bundle(
    out: Path, ca: Authority, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    _make_private_dir(out)
    # The key first, the certificate after it: a reader that finds a new cert.pem also finds
    # its key. A reader between the two writes still sees an old pair whose halves differ;
    # whoever reloads on rotation must check that the key matches the certificate.
    _write(out / KEY, _key_pem(key), secret=True)
    _write(out / CERT, _cert_pem(cert), secret=False)
    _write(out / CA_CERT, _cert_pem(ca.cert), secret=False)


def issue_host(
    directory: Path,
    *,
    name: str,
    out: Path,
    ips: list[str] | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A host certificate for srcd and dstd: TLS server and client, SAN = name and ``ips``."""
    leaf = _Leaf(
        name=name,
        kind="host",
        role=None,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        alt_names=_host_names(name, ips or []),
    )
    ca = load_ca(directory, now=now)
    cert, key = _sign_leaf(ca, leaf, days, now)
    _write_bundle(out, ca, cert, key)
    return cert


def issue_client(
    directory: Path,
    *,
    name: str,
    role: str,
    out: Path,
    days: int = DEFAULT_LEAF_DAYS,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A client certificate (migctl): TLS client only, with its role."""
    _check_name(name, "client name")
    checked = next((r for r in ROLES if r == role), None)
    if checked is None:
        raise InvalidArgument(
            f"invalid argument: role must be one of {', '.join(ROLES)}, not {role!r}"
        )
    leaf = _Leaf(
        name=name,
        kind="client",
        role=checked,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        alt_names=[],
    )
    ca = load_ca(directory, now=now)
    cert, key = _sign_leaf(ca, leaf, days, now)
    _write_bundle(out, ca, cert, key)
    return cert
