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
     +-- NoDomain                       NOT_FOUND
     +-- DomainExists                   ALREADY_EXISTS     name / UUID conflicts
     +-- JobActive                      ABORTED            another job holds the domain
     +-- OperationAborted               CANCELLED          aborted by a client
     +-- HostBusy                       RESOURCE_EXHAUSTED migration limits reached
     +-- StorageError                   INTERNAL           a durable write failed
     |    +-- StorageFull               RESOURCE_EXHAUSTED ENOSPC / EDQUOT
     +-- PeerUnavailable                UNAVAILABLE        the peer cannot be reached
     +-- Timeout                        DEADLINE_EXCEEDED  the deadline passed
     +-- OperationFailed                INTERNAL           a phase failed on the peer
     +-- Unauthenticated                UNAUTHENTICATED    no usable peer certificate
     +-- PermissionDenied               PERMISSION_DENIED  the peer's role does not allow it

Messages follow libvirt's word for word where libvirt has them (docs/ARCHITECTURE.md section 4).
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


class NoDomain(VmmigrateError):
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


class Timeout(VmmigrateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class OperationFailed(VmmigrateError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(VmmigrateError):
    """libvirt's VIR_ERR_AUTH_FAILED: the peer's certificate does not say who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


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
