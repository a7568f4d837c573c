"""Optional bearer-token authentication for the sidecar's gRPC port (DESIGN.md §8).

When a token is configured every call must carry ``authorization: Bearer <token>`` metadata, except the
standard health service (load balancers and kubelet probes carry no credentials). The comparison is
constant-time so response timing does not reveal how much of a guessed token was right. A refused call
raises ``Unauthenticated`` inside its handler, so the error interceptor (installed outside this one)
turns it into UNAUTHENTICATED like every other error.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from residue_monitor.service.server.errors import Unauthenticated

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without a token."""
_SCHEME = "bearer "


def _deny(reason: str) -> Callable[..., Any]:
    async def deny(_request: Any, _context: aio.ServicerContext[Any, Any]) -> Any:
        raise Unauthenticated(
            f"{reason}: send metadata 'authorization: Bearer <token>' with the sidecar's RESIDUE_TOKEN"
        )

    return deny


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Lets a call through only when its bearer token equals the configured one."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode()

    def check(self, metadata: Any) -> str | None:
        """None when ``metadata`` carries the right token, else why not (without echoing what was sent)."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return "missing bearer token"
        raw = values[0]
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        if len(values) > 1 or text[: len(_SCHEME)].lower() != _SCHEME:
            return "malformed authorization metadata"
        # compare_digest takes time independent of where the first difference is.
        if not hmac.compare_digest(text[len(_SCHEME) :].strip().encode(), self._token):
            return "invalid bearer token"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        field = next(
            f for f in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, f)
        )
        return handler._replace(**{field: _deny(problem)})
