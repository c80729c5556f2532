"""Mutual TLS with grpcio's own TLS: the material of a --tls-dir, server and channel
credentials, re-reading the certificates on SIGHUP, and when plaintext is allowed.

A TLS directory holds what ``migctl pki issue`` writes: ca.pem (the cluster's CA), cert.pem
and key.pem (this host's or client's certificate and key). The cluster's CA verifies peers
in both directions; the handshake refuses a peer without a certificate from it, or with an
expired one, before any handler runs. Who the peer is (host or client, role) is read
afterwards from its certificate (common/pki_identity.py, common/authz.py).

Plaintext is for loopback (the demo, tests) or on request (``--insecure``): a daemon with no
TLS material refuses to listen in plaintext on any other address.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
from pathlib import Path
from typing import Any, Final

import grpc
import structlog
from vmmigrate.common.address import DEFAULT_TLS_DIR, is_loopback, parse_hostport
from vmmigrate.common.errors import InvalidArgument

CA_FILE: Final = "ca.pem"
CERT_FILE: Final = "cert.pem"
KEY_FILE: Final = "key.pem"

log = structlog.get_logger("vmmigrate.tls")


@dataclasses.dataclass(frozen=True)
class Material:
    """One consistent set of PEM files: the CA, a certificate and its key."""

    directory: Path
    ca: bytes
    cert: bytes
    key: bytes
    serial: int
    not_after: datetime.datetime


def _public_der(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 (see load_material)

    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def load_material(directory: Path) -> Material:
    """Read and check a TLS directory; InvalidArgument says what is wrong with it."""
    # cryptography is imported when TLS material is read, not with this module: it costs a
    # daemon ~9 MiB of memory, which a plaintext daemon never needs
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    data: dict[str, bytes] = {}
    for name in (CA_FILE, CERT_FILE, KEY_FILE):
        try:
            data[name] = (directory / name).read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read TLS material {directory / name}: {exc.strerror or exc}; "
                "make it with 'migctl pki issue CA_DIR ... --out DIR' and pass --tls-dir DIR"
            ) from exc
    try:
        x509.load_pem_x509_certificates(data[CA_FILE])
        cert = x509.load_pem_x509_certificate(data[CERT_FILE])
        key = serialization.load_pem_private_key(data[KEY_FILE], password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"invalid TLS material in {directory}: {exc}") from exc
    # ``migctl pki issue`` writes the key before the certificate: a reader between the two
    # writes sees halves of two pairs, which must not be handed to the TLS layer.
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise InvalidArgument(
            f"invalid TLS material in {directory}: {KEY_FILE} is not the key of {CERT_FILE}"
        )
    return Material(
        directory,
        data[CA_FILE],
        data[CERT_FILE],
        data[KEY_FILE],
        cert.serial_number,
        cert.not_valid_after_utc,
    )


class TlsFiles:
    """The TLS material of a process, re-read when asked (SIGHUP) and kept otherwise.

    A failed re-read keeps the material in use (logged): a half-written rotation must not
    take a running daemon off the network. ``generation`` counts successful re-reads so
    that holders of channels know when to open new ones.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._material = load_material(directory)
        self._reload = False
        self._lock = threading.Lock()  # the server's fetcher runs on gRPC's threads
        self.generation = 0

    def request_reload(self) -> None:
        self._reload = True

    def current(self) -> Material:
        with self._lock:
            if self._reload:
                self._reload = False
                self._reread()
            return self._material

    def _reread(self) -> None:
        try:
            fresh = load_material(self.directory)
        except InvalidArgument as exc:
            log.warning("tls_reload_failed", tls_dir=str(self.directory), error=str(exc))
            return
        changed = fresh != self._material
        self._material = fresh
        if changed:
            self.generation += 1
        log.info("tls_reloaded", tls_dir=str(self.directory), serial=f"{fresh.serial:x}")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate from the CA and pick up the files
        re-read after a SIGHUP on the next handshake (no restart, no dropped connection)."""
        first = self.current()
        served = [first]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            material = self.current()
            if material == served[0]:
                return None  # unchanged: gRPC keeps the configuration it has
            served[0] = material
            return _server_config(material)

        # grpc's stubs say the fetcher always returns a configuration; gRPC itself takes
        # None as "unchanged" (its documented contract)
        fetcher: Any = fetch
        return grpc.dynamic_ssl_server_credentials(
            _server_config(first), fetcher, require_client_authentication=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """This process's certificate as client certificate; the CA checks the server."""
        material = self.current()
        return grpc.ssl_channel_credentials(
            root_certificates=material.ca,
            private_key=material.key,
            certificate_chain=material.cert,
        )


def _server_config(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.ca
    )


def _tls_dir(tls_dir: Path | None) -> Path | None:
    if tls_dir is not None:
        return tls_dir
    return DEFAULT_TLS_DIR if DEFAULT_TLS_DIR.is_dir() else None


def daemon_tls(listen: str, tls_dir: Path | None, insecure: bool) -> TlsFiles | None:
    """A daemon's TLS files, or None for plaintext (``--insecure``, or loopback without TLS
    material). Refuses plaintext on any other address, saying what to do."""
    if insecure:
        log.warning("plaintext_insecure", listen=listen, reason="--insecure: no TLS, no roles")
        return None
    directory = _tls_dir(tls_dir)
    if directory is not None:
        return TlsFiles(directory)
    host, _ = parse_hostport(listen, 0)
    if is_loopback(host):
        return None
    raise InvalidArgument(
        f"refusing to listen in plaintext on {listen}: no TLS material "
        f"(no --tls-dir, no {DEFAULT_TLS_DIR}). Make this host's certificates with "
        "'migctl pki issue CA_DIR --host NAME --ip ADDR --out DIR' and pass --tls-dir DIR, "
        "or pass --insecure to accept unauthenticated plaintext"
    )
