"""What vmmigrate's server interceptors share: the handler lookup, and refusing a call.

Each interceptor (common/authz.py, common/shutdown.py, common/decodeguard.py) only says how
it wraps a method's handler; the base class asks gRPC for the handler and hands it over.
A call is refused with the status of a :class:`VmmigrateError` (its code, message and error
class in the trailing metadata), as the handlers' own errors are.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from vmmigrate.common.errors import VmmigrateError
from vmmigrate.common.rpc import status_of

# the daemon's refusal count (common/metrics.py): it reads the reason off the error's class
OnRefused = Callable[[VmmigrateError], None]


class HandlerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each method's handler with :meth:`wrap`; a method with no handler stays so."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap(handler, str(handler_call_details.method))

    @abc.abstractmethod
    def wrap(self, handler: Any, method: str) -> Any:
        """``handler`` is grpc's RpcMethodHandler, a namedtuple (its stubs do not say so):
        ``_replace`` swaps its fields. ``method`` is the full name, /package.Service/Method.
        Each interceptor says how (an interceptor without it cannot be made)."""


async def refuse(context: Any, exc: VmmigrateError, on_refused: OnRefused | None = None) -> None:
    """End the call with ``exc``'s status, counted through ``on_refused`` (the metrics);
    ``context.abort`` raises, so this never returns normally."""
    code, message, metadata = status_of(exc)
    if on_refused is not None:
        on_refused(exc)
    await context.abort(code, message, trailing_metadata=tuple(metadata))
