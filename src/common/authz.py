"""Who may call what: the role table both daemons enforce, in one server interceptor.

As libvirt's read-only and read-write connections: a ``readonly`` client may list and
query; every other call needs an ``admin`` client or a host. dstd's RPCs take host
certificates only: a client drives a client-driven migration through srcd, which relays
the destination's phases with its own host certificate. The standard health checking
(and reflection) services answer every authenticated peer.

The TLS handshake has already refused peers without a valid certificate from the cluster's
CA; this layer reads who the peer is (common/pki_identity.py), refuses what its kind or
role does not allow (PERMISSION_DENIED, libvirt's ``operation forbidden:`` prefix), and binds
the peer into the log context of the call. A plaintext server has no identities: it checks
nothing (loopback or --insecure, common/tls.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator
from typing import Any, Final

import structlog
from vmmigrate.common.errors import PermissionDenied, VmmigrateError
from vmmigrate.common.interceptor import HandlerInterceptor, OnRefused, refuse
from vmmigrate.common.pki_identity import Identity, identity_from_auth_context

_DOMAIN: Final = "/vmmigrate.v1.DomainService/"

# The calls a readonly client may make (virsh's list, dominfo, domstate, dumpxml,
# domjobinfo, migrate-getspeed, event and jobs), by full method name.
READONLY_METHODS: Final = frozenset(
    _DOMAIN + name
    for name in (
        "List",
        "GetInfo",
        "GetState",
        "DumpXML",
        "GetJobInfo",
        "GetMaxSpeed",
        "Events",
        "ListJobs",
    )
)

# Services any authenticated peer may call: they say whether the daemon serves and what it
# serves, nothing about domains.
OPEN_SERVICES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# What a refused call would have done, for the message (virsh's words where it has them).
_WHAT: Final = {
    "Define": "defining a domain",
    "Undefine": "undefining a domain",
    "Start": "starting a domain",
    "Destroy": "destroying a domain",
    "Shutdown": "shutting down a domain",
    "Suspend": "suspending a domain",
    "Resume": "resuming a domain",
    "Migrate": "migrating a domain",
    "MigrateMany": "migrating domains",
    "AbortJob": "aborting a job",
    "SetMaxSpeed": "setting the migration speed",
    "SetMaxDowntime": "setting the migration downtime",
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """One daemon's rules. ``hosts_only``: only host certificates (dstd)."""

    daemon: str
    hosts_only: bool


SRCD_POLICY: Final = Policy(daemon="srcd", hosts_only=False)
DSTD_POLICY: Final = Policy(daemon="dstd", hosts_only=True)


def _short(method: str) -> str:
    return method.rpartition("/")[2] or method


def authorize(policy: Policy, identity: Identity, method: str) -> None:
    """Raise PermissionDenied unless ``identity`` may call ``method`` (a full method name)."""
    if method.startswith(OPEN_SERVICES):
        return
    name = _short(method)
    if identity.kind == "host":
        return  # a host already drives every dstd's phases: it acts with full rights
    if policy.hosts_only:
        raise PermissionDenied(
            f"operation forbidden: {policy.daemon} accepts host certificates only, and "
            f"client '{identity.name}' called {name}; a client migrates through the source "
            "host's srcd (migctl does so by itself)"
        )
    if identity.role == "admin" or method in READONLY_METHODS:
        return
    what = _WHAT.get(name, name)
    raise PermissionDenied(
        f"operation forbidden: read-only access prevents {what} ({name}): client "
        f"'{identity.name}' has role {identity.role}, this needs role admin"
    )


def _bound(identity: Identity) -> dict[str, Any]:
    return {"peer_kind": identity.kind, "peer_name": identity.name, "peer_role": identity.role}


class AuthInterceptor(HandlerInterceptor):
    """Checks every call of a TLS server against ``policy`` before its handler (and before
    its request is decoded), and binds the peer into the call's log context."""

    def __init__(self, policy: Policy, on_refused: OnRefused | None = None) -> None:
        self.policy = policy
        self.on_refused = on_refused  # the daemon's refusal count (metrics)
        self.log = structlog.get_logger(f"vmmigrate.{policy.daemon}")

    async def _identity(self, context: Any, method: str) -> Identity:
        try:
            identity = identity_from_auth_context(context.auth_context())
            authorize(self.policy, identity, method)
        except VmmigrateError as exc:
            self.log.warning("rpc_refused", method=method, code=exc.code.name, error=str(exc))
            await refuse(context, exc, self.on_refused)
            raise  # refuse() raises; never reached
        return identity

    def wrap(self, handler: Any, method: str) -> Any:
        for field in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, field)
            if inner is not None:
                return handler._replace(**{field: self._wrap(inner, method)})
        return handler

    def _wrap(self, inner: Any, method: str) -> Any:
        if inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                identity = await self._identity(context, method)
                with structlog.contextvars.bound_contextvars(**_bound(identity)):
                    async for item in inner(request, context):
                        yield item

            return stream

        async def call(request: Any, context: Any) -> Any:
            identity = await self._identity(context, method)
            with structlog.contextvars.bound_contextvars(**_bound(identity)):
                return await inner(request, context)

        return call
