"""The vmmigrate error tree.

Every error a daemon or the client raises on purpose derives from :class:`VmmigrateError`
and declares, as class data, the gRPC status code it travels with. Handlers raise; each
server translates to gRPC in exactly one place, and the client library translates back
(:func:`error_from_status`), so the same class is seen on both sides of the wire.

    VmmigrateError                      INTERNAL
     +-- InvalidArgument                INVALID_ARGUMENT   bad flags, names, parameters
     |    +-- XMLError                  INVALID_ARGUMENT   malformed / hostile domain XML
     |    +-- CookieError               INVALID_ARGUMENT   malformed migration cookie
     |    +-- UnsupportedFlags          INVALID_ARGUMENT   unknown flag bits
     +-- OperationInvalid               FAILED_PRECONDITION wrong state or flag combination
     |    +-- SameHost                  FAILED_PRECONDITION migrating to one's own host
     +-- ArgumentUnsupported            FAILED_PRECONDITION the peer lacks a feature
     +-- ConfigUnsupported              FAILED_PRECONDITION this host's policy refuses it
     +-- MigrateUnsafe                  FAILED_PRECONDITION disks a live migration may corrupt
     +-- HostResourceMissing            FAILED_PRECONDITION this host lacks a disk, bridge, binary
     +-- NoDomain                       NOT_FOUND
     +-- NoNetwork                      NOT_FOUND          <interface type='network'> names none
     +-- DomainExists                   ALREADY_EXISTS     name / UUID conflicts
     +-- JobActive                      ABORTED            another job holds the domain
     +-- OperationAborted               CANCELLED          aborted by a client
     +-- HostBusy                       RESOURCE_EXHAUSTED migration limits reached
     +-- StorageError                   INTERNAL           a durable write failed
     |    +-- StorageFull               RESOURCE_EXHAUSTED ENOSPC / EDQUOT
     +-- PeerUnavailable                UNAVAILABLE        the peer cannot be reached
     |    +-- ShuttingDown              UNAVAILABLE        the daemon drains on SIGTERM
     +-- Timeout                        DEADLINE_EXCEEDED  the deadline passed
     +-- OperationFailed                INTERNAL           a phase failed on the peer
     +-- Unauthenticated                UNAUTHENTICATED    no usable peer certificate
     +-- PermissionDenied               PERMISSION_DENIED  the peer's role does not allow it

Messages follow libvirt's word for word where libvirt has them (docs/ARCHITECTURE.md section 4).
They carry the bare text: libvirt's category prefix (its virErrorNumber's text, e.g.
``Requested operation is not valid: ``) is added once, by the client that prints the error
(:func:`libvirt_text`).
"""

from __future__ import annotations

from typing import ClassVar

import grpc

# gRPC metadata key that carries the error class name, so the receiving side can rebuild
# the same class (the status code alone is ambiguous).
ERROR_CLASS_KEY = "vmmigrate-error-class"


class VmmigrateError(Exception):
    """Root of every error vmmigrate raises on purpose."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(VmmigrateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class XMLError(InvalidArgument):
    """Domain XML that is malformed, hostile, too large or not a domain."""


class CookieError(InvalidArgument):
    """A <qemu-migration> cookie that cannot be accepted."""


class UnsupportedFlags(InvalidArgument):
    """Flag bits this build does not know."""


class OperationInvalid(VmmigrateError):
    """libvirt's VIR_ERR_OPERATION_INVALID: wrong state or flag combination."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SameHost(OperationInvalid):
    """The cookie's host UUID is the receiver's own."""


class ArgumentUnsupported(VmmigrateError):
    """libvirt's VIR_ERR_ARGUMENT_UNSUPPORTED: a side lacks a feature."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigUnsupported(VmmigrateError):
    """libvirt's VIR_ERR_CONFIG_UNSUPPORTED: a definition this host's configuration refuses
    (an emulator outside its allowlist, <qemu:commandline> where it is not allowed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class MigrateUnsafe(VmmigrateError):
    """libvirt's VIR_ERR_MIGRATE_UNSAFE: a live migration that may corrupt disks (--unsafe
    overrides it)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class HostResourceMissing(VmmigrateError):
    """libvirt's VIR_ERR_SYSTEM_ERROR when a domain cannot run here: what it needs from this
    host is not there (a disk file or device, a bridge, the emulator binary). The message is
    libvirt's, ending in the system error's text (``Cannot access storage file 'P': No such
    file or directory``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NoDomain(VmmigrateError):
    code = grpc.StatusCode.NOT_FOUND


class NoNetwork(VmmigrateError):
    """libvirt's VIR_ERR_NO_NETWORK: an ``<interface type='network'>`` names a network this
    host does not have."""

    code = grpc.StatusCode.NOT_FOUND


class DomainExists(VmmigrateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class JobActive(VmmigrateError):
    code = grpc.StatusCode.ABORTED


class OperationAborted(VmmigrateError):
    code = grpc.StatusCode.CANCELLED


class HostBusy(VmmigrateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StorageError(VmmigrateError):
    code = grpc.StatusCode.INTERNAL


class StorageFull(StorageError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PeerUnavailable(VmmigrateError):
    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(PeerUnavailable):
    """The daemon got SIGTERM: it finishes the migrations in flight and starts no new one."""


class Timeout(VmmigrateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class OperationFailed(VmmigrateError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(VmmigrateError):
    """libvirt's VIR_ERR_AUTH_FAILED: the peer's certificate does not say who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


# libvirt's category text (the virErrorNumber's message prefix) for each class, by class name
# so that a class added elsewhere (PermissionDenied) is covered without importing it. The
# nearest class in the MRO that is listed wins; "" prints the message alone, as libvirt does
# for system errors (VIR_ERR_SYSTEM_ERROR: a failed connect, a failed write).
CATEGORIES: dict[str, str] = {
    "VmmigrateError": "internal error: ",  # VIR_ERR_INTERNAL_ERROR
    "InvalidArgument": "invalid argument: ",  # VIR_ERR_INVALID_ARG
    "XMLError": "XML error: ",  # VIR_ERR_XML_ERROR
    "CookieError": "internal error: ",  # libvirt reports cookie faults as internal errors
    "OperationInvalid": "Requested operation is not valid: ",  # VIR_ERR_OPERATION_INVALID
    "SameHost": "internal error: ",  # libvirt's "Attempt to migrate guest to the same host"
    "ArgumentUnsupported": "argument unsupported: ",  # VIR_ERR_ARGUMENT_UNSUPPORTED
    "ConfigUnsupported": "unsupported configuration: ",  # VIR_ERR_CONFIG_UNSUPPORTED
    "MigrateUnsafe": "Unsafe migration: ",  # VIR_ERR_MIGRATE_UNSAFE
    "HostResourceMissing": "",  # VIR_ERR_SYSTEM_ERROR ("Cannot access storage file ...")
    "NoDomain": "Domain not found: ",  # VIR_ERR_NO_DOMAIN
    "NoNetwork": "Network not found: ",  # VIR_ERR_NO_NETWORK
    "DomainExists": "operation failed: ",  # libvirt's "domain '%s' already exists ..."
    "JobActive": "Requested operation is not valid: ",  # "another migration job is ..."
    "OperationAborted": "operation aborted: ",  # VIR_ERR_OPERATION_ABORTED
    "HostBusy": "operation failed: ",  # VIR_ERR_OPERATION_FAILED
    "StorageError": "",  # VIR_ERR_SYSTEM_ERROR
    "PeerUnavailable": "",  # VIR_ERR_SYSTEM_ERROR ("unable to connect to ...")
    "Timeout": "Timed out during operation: ",  # VIR_ERR_OPERATION_TIMEOUT
    "OperationFailed": "operation failed: ",  # VIR_ERR_OPERATION_FAILED
    "Unauthenticated": "authentication failed: ",  # VIR_ERR_AUTH_FAILED
    "PermissionDenied": "operation forbidden: ",  # VIR_ERR_OPERATION_DENIED
}


_PREFIXES = tuple(sorted({p for p in CATEGORIES.values() if p}))


def category_of(exc: VmmigrateError) -> str:
    """libvirt's category prefix for ``exc``'s class."""
    for cls in type(exc).__mro__:
        # a class may say it itself (a client-only class: migctl's unreadable file)
        found = cls.__dict__.get("libvirt_category", CATEGORIES.get(cls.__name__))
        if found is not None:
            return str(found)
    return CATEGORIES["VmmigrateError"]


def libvirt_text(exc: VmmigrateError) -> str:
    """The message as libvirt prints it: category prefix, then the text. A message that
    already starts with a category (some wire messages carry libvirt's whole text, and a
    crash is answered as ``internal error: ...``) is printed as it is: never two prefixes."""
    prefix = category_of(exc)
    message = exc.message
    if not prefix or any(message.startswith(p) for p in _PREFIXES):
        return message
    return prefix + message


class PermissionDenied(VmmigrateError):
    """libvirt's VIR_ERR_OPERATION_DENIED ("operation forbidden: ..."): the peer is known
    but its certificate's kind or role does not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


def _all_classes() -> dict[str, type[VmmigrateError]]:
    found: dict[str, type[VmmigrateError]] = {}
    todo: list[type[VmmigrateError]] = [VmmigrateError]
    while todo:
        cls = todo.pop()
        # Only this module's classes are rebuilt from the wire: others (QMP errors...) may
        # take other constructor arguments, and fall back on their status code.
        if cls.__module__ == __name__:
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def error_from_status(
    code: grpc.StatusCode, message: str, class_name: str | None
) -> VmmigrateError:
    """Rebuild the error a peer raised from its status code, message and class name.

    An unknown or missing class name falls back to the class that owns the status code.
    """
    classes = _all_classes()
    cls = classes.get(class_name or "")
    if cls is not None and cls.code == code:
        return cls(message)
    for candidate in (
        PeerUnavailable,
        Timeout,
        NoDomain,
        DomainExists,
        JobActive,
        OperationAborted,
        HostBusy,
        InvalidArgument,
        OperationInvalid,
        Unauthenticated,
        PermissionDenied,
    ):
        if candidate.code == code:
            return candidate(message)
    return OperationFailed(message)
