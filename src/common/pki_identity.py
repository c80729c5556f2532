"""Who a peer is, read from its certificate: kind (host or client), name, and role.

``migctl pki`` (src/migctl/certs.py) writes the identity into the certificate's subject, and
the daemons read it back from the certificate gRPC hands them after the TLS handshake
(``context.auth_context()["x509_pem_cert"]``):

    CN=NAME, OU=vmmigrate:host                              a host (srcd and dstd)
    CN=NAME, OU=vmmigrate:client, OU=vmmigrate:role=ROLE    a client, ROLE admin|readonly

The subject rather than a private extension: it needs no OID of our own, and an operator
sees it with any tool (``openssl x509 -noout -subject``). The OU values carry a
``vmmigrate:`` prefix so that a certificate from some other CA that happens to have an OU is
never mistaken for one of ours (the TLS layer checks the CA; this module only reads).

Every refusal is :class:`~vmmigrate.common.errors.Unauthenticated`: a certificate this
module cannot read says nothing about who the peer is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeVar, get_args

from vmmigrate.common.errors import Unauthenticated

if TYPE_CHECKING:
    from cryptography import x509

Kind = Literal["host", "client"]
Role = Literal["admin", "readonly"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
ROLES: Final[tuple[Role, ...]] = get_args(Role)

OU_PREFIX: Final = "vmmigrate:"
_ROLE_PREFIX: Final = f"{OU_PREFIX}role="
# The auth_context property under which gRPC puts the peer's certificate, as PEM.
AUTH_PEM_CERT: Final = "x509_pem_cert"

_T = TypeVar("_T", bound=str)


@dataclass(frozen=True)
class Identity:
    """A verified peer. ``role`` is None for a host: hosts act under their own kind."""

    kind: Kind
    name: str
    role: Role | None


def kind_unit(kind: Kind) -> str:
    """The OU value that marks a certificate's kind."""
    return f"{OU_PREFIX}{kind}"


def role_unit(role: Role) -> str:
    """The OU value that carries a client certificate's role."""
    return f"{_ROLE_PREFIX}{role}"


def _refuse(reason: str) -> Unauthenticated:
    return Unauthenticated(f"authentication failed: {reason}")


def _one(values: list[_T], what: str) -> _T:
    if len(values) != 1:
        found = "none" if not values else ", ".join(repr(v) for v in values)
        raise _refuse(f"peer certificate must carry exactly one {what} (found {found})")
    return values[0]


def _attributes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity in a parsed certificate's subject."""
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 (see peer_identity)

    name = _one(_attributes(cert, NameOID.COMMON_NAME), "common name")
    units = _attributes(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    by_kind = {kind_unit(k): k for k in KINDS}
    by_role = {role_unit(r): r for r in ROLES}
    # A field with our prefix that we do not know is refused rather than skipped: it may be
    # a role from a newer release that this daemon cannot honour.
    unknown = [u for u in units if u.startswith(OU_PREFIX) and u not in by_kind | by_role]
    if unknown:
        raise _refuse(f"peer certificate has unknown vmmigrate fields: {', '.join(unknown)}")
    kinds = [by_kind[u] for u in units if u in by_kind]
    roles = [by_role[u] for u in units if u in by_role]
    kind = _one(kinds, "vmmigrate kind (OU=vmmigrate:host or OU=vmmigrate:client)")
    if kind == "host":
        if roles:
            raise _refuse(f"host certificate '{name}' must not carry a role")
        return Identity(kind="host", name=name, role=None)
    role = _one(roles, "vmmigrate role (OU=vmmigrate:role=admin or readonly)")
    return Identity(kind="client", name=name, role=role)


def peer_identity(pem: bytes) -> Identity:
    """The identity in a PEM certificate (the first one if ``pem`` holds a chain)."""
    # imported at the first TLS call, not with this module: cryptography costs a daemon
    # ~9 MiB of memory, which a plaintext daemon never needs
    from cryptography import x509  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise _refuse(f"peer certificate cannot be parsed: {exc}") from exc
    return identity_of(cert)


def identity_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> Identity:
    """The identity of an RPC's peer, from ``context.auth_context()`` of a TLS server."""
    pems = list(auth.get(AUTH_PEM_CERT, ()))
    if not pems:
        raise _refuse("the peer presented no certificate")
    return peer_identity(pems[0])
