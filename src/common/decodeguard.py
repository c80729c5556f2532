"""Requests that are not valid protobuf are refused with INVALID_ARGUMENT, not UNKNOWN.

gRPC decodes a request before any handler runs; a message that does not decode (corrupt
wire format, a string field that is not UTF-8) makes grpc.aio answer UNKNOWN with the
protobuf exception's repr, as if the daemon had crashed. This interceptor moves decoding
into the handler call, so the daemon answers INVALID_ARGUMENT with a clear message and the
error class (InvalidArgument) in the trailing metadata, like any other bad input. The
tunnel's stream has no deserializer (its messages are raw bytes, validated by its handler),
so it passes through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from vmmigrate.common.errors import InvalidArgument
from vmmigrate.common.rpc import status_of


def _decode(deserializer: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    try:
        return deserializer(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed request message for {method}: {exc}") from None


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # grpc's handler is a namedtuple (its stubs do not say so): _replace swaps fields
        handler: Any = await continuation(handler_call_details)
        deserializer = getattr(handler, "request_deserializer", None)
        if handler is None or deserializer is None:
            return handler
        method = str(handler_call_details.method).rpartition("/")[2]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(raw: bytes, context: Any) -> Any:
                try:
                    request = _decode(deserializer, raw, method)
                except InvalidArgument as exc:
                    code, message, metadata = status_of(exc)
                    await context.abort(code, message, trailing_metadata=tuple(metadata))
                return await inner(request, context)

            return handler._replace(request_deserializer=None, unary_unary=unary)
        return handler  # the tunnel (raw bytes) has no deserializer: handled above
