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

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError
from vmmigrate.common.errors import InvalidArgument
from vmmigrate.common.interceptor import HandlerInterceptor, OnRefused, refuse


def _decode(deserializer: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    try:
        return deserializer(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed request message for {method}: {exc}") from None


class DecodeGuard(HandlerInterceptor):
    def __init__(self, on_refused: OnRefused | None = None) -> None:
        self.on_refused = on_refused  # the daemon's refusal count (metrics)

    def wrap(self, handler: Any, method: str) -> Any:
        deserializer = getattr(handler, "request_deserializer", None)
        if deserializer is None or handler.unary_unary is None:
            return handler  # the tunnel (raw bytes) has no deserializer
        name = method.rpartition("/")[2]
        inner = handler.unary_unary

        async def unary(raw: bytes, context: Any) -> Any:
            try:
                request = _decode(deserializer, raw, name)
            except InvalidArgument as exc:
                await refuse(context, exc, self.on_refused)
                raise  # refuse() raises; never reached
            return await inner(request, context)

        return handler._replace(request_deserializer=None, unary_unary=unary)
