"""Client side of the wire: channels, deadlines, and gRPC errors translated back to ours.

This is the one place where a foreign error (grpc.aio.AioRpcError) becomes a VmmigrateError
on the calling side. An error the peer raised on purpose arrives with its class name in the
trailing metadata and is rebuilt as the same class; an error of the transport itself (peer
down, deadline passed) becomes PeerUnavailable or Timeout with the peer's address in it.

Servers are not built here (each daemon owns its server); only the pure mapping from our
errors to a status (:func:`status_of`) is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from vmmigrate.common.errors import (
    ERROR_CLASS_KEY,
    HostBusy,
    JobActive,
    PeerUnavailable,
    Timeout,
    Unauthenticated,
    VmmigrateError,
    error_from_status,
)

from vmmigrate.v1 import vmmigrate_pb2 as pb

if TYPE_CHECKING:  # migctl's start-up need not import the TLS module for plaintext
    from vmmigrate.common.tls import TlsFiles

T = TypeVar("T")

# Never route loopback / namespace traffic through an HTTP proxy from the environment.
BASE_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A channel of its own connections: a fresh channel (PeerPool.reconnect) must really
    # connect afresh, not share a subchannel still backing off from a peer that was down.
    ("grpc.use_local_subchannel_pool", 1),
    # Reconnect quickly after a peer restarts (default backoff grows to minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

SERVER_OPTIONS_BASE: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
)


def message_size_options(max_bytes: int) -> tuple[tuple[str, Any], ...]:
    return (
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    )


def open_channel(
    address: str, *, max_message_bytes: int = 16 * 1024 * 1024, tls: TlsFiles | None = None
) -> grpc.aio.Channel:
    """A channel to HOST:PORT: mutual TLS with ``tls`` (the server's certificate must name
    HOST, a DNS name or an IP address, in its SANs), else plaintext."""
    options = BASE_CHANNEL_OPTIONS + message_size_options(max_message_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


# The status message travels percent-encoded in a trailer; past gRPC's metadata limit (8 KiB
# soft, 16 KiB hard) the client gets "Stream removed" instead of the error. Messages quote
# what they refuse (names, ids), which can be megabytes long: they are cut to fit.
MAX_STATUS_MESSAGE_BYTES = 6000


def bounded_message(message: str) -> str:
    """``message``, cut so that its percent-encoded form fits in a gRPC trailer."""
    if len(message) * 12 <= MAX_STATUS_MESSAGE_BYTES:  # 4 UTF-8 bytes, each as %XX
        return message
    budget = MAX_STATUS_MESSAGE_BYTES - 64
    size = 0
    for i, ch in enumerate(message):
        size += sum(
            1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in ch.encode("utf-8", "replace")
        )
        if size > budget:
            return f"{message[:i]}... ({len(message)} characters, cut)"
    return message


def item_status(exc: BaseException) -> pb.ItemStatus:
    """The status a single RPC would have ended with for ``exc`` (code, message, error
    class), as one item of a batch's answer or one domain of an evacuation's results."""
    code, message, metadata = status_of(exc)
    error_class = next((v for k, v in metadata if k == ERROR_CLASS_KEY), "")
    return pb.ItemStatus(code=code.value[0], message=message, error_class=error_class)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """A status code carried as its number (a batch item's, an evacuation result's)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, Sequence[tuple[str, str]]]:
    """The gRPC status a server answers with for ``exc`` (pure: no server objects)."""
    if isinstance(exc, VmmigrateError):
        return exc.code, bounded_message(exc.message), ((ERROR_CLASS_KEY, type(exc).__name__),)
    return (
        grpc.StatusCode.INTERNAL,
        bounded_message(f"internal error: {type(exc).__name__}: {exc}"),
        (),
    )


def _class_name(err: grpc.aio.AioRpcError) -> str | None:
    md = err.trailing_metadata()
    if not md:
        return None
    for item in tuple(md):  # grpc's stubs type metadata loosely
        key, value = item[0], item[1]  # type: ignore[index]
        if key == ERROR_CLASS_KEY:
            return value if isinstance(value, str) else bytes(value).decode()
    return None


# What gRPC's transport says when the TLS handshake failed (grpc core's and BoringSSL's
# words): the peer is there, but it and we do not agree on who may talk.
_HANDSHAKE_WORDS = ("ssl", "handshake", "certificate", "tls", "peer name")


def _handshake_failed(details: str) -> bool:
    lower = details.lower()
    return any(word in lower for word in _HANDSHAKE_WORDS)


def translate(err: grpc.aio.AioRpcError, peer: str, what: str) -> VmmigrateError:
    """Our error for a failed call to ``peer`` (``what`` names the peer in messages)."""
    code = err.code()
    return translate_status(code, err.details() or code.name, _class_name(err), peer, what)


def translate_status(
    code: grpc.StatusCode, details: str, cls: str | None, peer: str, what: str
) -> VmmigrateError:
    """:func:`translate` from a status's parts (also an item of a batch call's answer)."""
    if cls is not None:
        return error_from_status(code, details, cls)
    if code == grpc.StatusCode.UNAVAILABLE and _handshake_failed(details):
        return Unauthenticated(
            f"authentication failed: TLS handshake with {what} '{peer}' failed: check "
            "--tls-dir (a certificate from the cluster's CA, not expired, and a server "
            f"certificate naming '{peer.rpartition(':')[0]}'), or --insecure for a "
            f"plaintext daemon ({details})"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailable(f"unable to connect to {what} '{peer}': {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"{what} '{peer}' did not answer before the deadline")
    return error_from_status(code, f"{what} '{peer}': {details}", None)


def cancelled_by_others() -> bool:
    """Whether a CancelledError just caught was not meant for the running task: grpc
    raises it in whoever awaits a call that its channel cancelled (the channel closed
    under the call), while a cancellation of the task itself counts in ``cancelling()``."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def channel_gone(peer: str, what: str) -> PeerUnavailable:
    return PeerUnavailable(
        f"unable to connect to {what} '{peer}': the connection was closed during the call"
    )


@contextlib.asynccontextmanager
async def translated(peer: str, what: str) -> AsyncIterator[None]:
    """Translate gRPC errors raised inside the block (the one place on the client side).
    A call its channel cancelled, or one made on a channel closed meanwhile (another
    migration reconnected to the peer), is the peer's unavailability, never the calling
    task's cancellation: a CancelledError there would end a migration (or a whole
    evacuation stream) without an answer."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise translate(err, peer, what) from err
    except grpc.aio.UsageError as err:
        raise channel_gone(peer, what) from err
    except asyncio.CancelledError:
        if cancelled_by_others():
            raise channel_gone(peer, what) from None
        raise


class Deadline:
    """An absolute deadline (monotonic clock) with a wall-clock twin for the wire."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self.unix_ms = int((time.time() + seconds) * 1000)

    @classmethod
    def from_unix_ms(cls, unix_ms: int, default: float, cap: float | None = None) -> Deadline:
        """A deadline received on the wire (0 = none given: use ``default``)."""
        if unix_ms <= 0:
            return cls(default)
        left = unix_ms / 1000 - time.time()
        if cap is not None:
            left = min(left, cap)
        return cls(max(left, 0.0))

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def rpc_timeout(self, cap: float) -> float:
        """Timeout for one RPC: what is left, capped, and never zero (gRPC needs > 0)."""
        return max(min(self.remaining(), cap), 0.001)


async def call(method: Any, request: Any, *, timeout: float, peer: str, what: str) -> Any:
    """One unary call with a deadline, gRPC errors translated."""
    async with translated(peer, what):
        return await method(request, timeout=timeout)


# How long an idempotent call whose answer was lost (UNAVAILABLE, no answer) is asked again
# before the caller gives up on it, seconds.
LOST_ANSWER_RETRY = 3.0


async def call_retrying(
    method: Any,
    request: Any,
    *,
    timeout: float,
    peer: str,
    what: str,
    until: float,
    while_active: bool = False,
) -> Any:
    """call(), retried with backoff while the peer is unreachable (UNAVAILABLE or no answer
    before the deadline), until the monotonic time ``until``. Only for RPCs that are
    idempotent by migration id: a retry returns the first answer. ``while_active``: also
    while the peer says an earlier call for the migration still runs (JobActive; Finish);
    past ``until`` that is a Timeout: an outcome not known yet, never a failure."""
    delay = 0.1
    while True:
        try:
            return await call(method, request, timeout=timeout, peer=peer, what=what)
        except (PeerUnavailable, Timeout):
            if time.monotonic() + delay >= until:
                raise
        except JobActive as exc:
            # an earlier call for this migration (whose answer was lost) still runs there:
            # its outcome is not known yet, so it is not this call's failure; asked again,
            # the peer answers with that call's answer once it ends
            if not while_active:
                raise
            if time.monotonic() + delay >= until:
                raise Timeout(
                    f"{what} '{peer}' is still running an earlier call for this migration"
                ) from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def retry_busy(attempt: Callable[[], Awaitable[T]], deadline: Deadline) -> T:
    """``attempt()``, again with backoff (and jitter) while the peer answers that it is
    busy (RESOURCE_EXHAUSTED: a host limit), until ``deadline``."""
    delay = 0.05
    while True:
        try:
            return await attempt()
        except HostBusy:
            if deadline.remaining() <= delay:
                raise
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
