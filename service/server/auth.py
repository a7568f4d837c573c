"""Optional bearer-token authentication for the sidecar's gRPC port (DESIGN.md §8), and tenant scopes.

When a token is configured every call must carry ``authorization: Bearer <token>`` metadata, except the
standard health service (load balancers and kubelet probes carry no credentials). The comparison is
constant-time so response timing does not reveal how much of a guessed token was right. A refused call
raises ``Unauthenticated`` inside its handler, so the error interceptor (installed outside this one)
turns it into UNAUTHENTICATED like every other error.

Tenants: ``RESIDUE_TOKEN`` is the operator's and the plugins' token and reaches every tenant. Optional
*tenant tokens* (``RESIDUE_TENANT_TOKENS``, a JSON file) are read-only and scoped: a call with one may
read records, queries, flags and traces only of its tenants (``TenantTokens.require`` in each handler,
PERMISSION_DENIED otherwise, before the store is asked, so it cannot even learn whether another tenant's
request id exists), and may not ingest (frames carry no tenant, so a writer could otherwise overwrite
another tenant's open request).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from residue_monitor.detectors.exceptions import InvalidInput, ResidueError
from residue_monitor.service.server.errors import PermissionDenied, Unauthenticated
from residue_monitor.service.store.base import check_tenant

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without a token."""
WRITE_METHODS = ("/residue.v1.ResidueService/Ingest",)
"""Methods only ``RESIDUE_TOKEN`` may call (tenant tokens are read-only)."""
_SCHEME = "bearer "


def bearer(metadata: Any) -> tuple[bytes | None, str | None]:
    """(the bearer token in ``metadata``, None) or (None, why there is none usable)."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        return None, "missing bearer token"
    raw = values[0]
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if len(values) > 1 or text[: len(_SCHEME)].lower() != _SCHEME:
        return None, "malformed authorization metadata"
    return text[len(_SCHEME) :].strip().encode(), None


@dataclass(frozen=True)
class TenantTokens:
    """Read-only tokens, each reaching a set of tenants (``RESIDUE_TENANT_TOKENS``)."""

    scopes: Mapping[bytes, frozenset[str]]

    @classmethod
    def load(cls, path: str | Path, main_token: str) -> TenantTokens:
        """Read ``{"tokens": [{"token": "...", "tenants": ["acme", ""]}, ...]}`` ("" is the default tenant).

        Every token must be non-empty without whitespace, unique, and differ from ``RESIDUE_TOKEN``; every
        tenant a valid tenant name. Errors raise ``InvalidInput`` naming the file and the entry."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            entries = doc["tokens"]
            if not isinstance(entries, list):
                raise TypeError("'tokens' must be a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidInput(
                f"RESIDUE_TENANT_TOKENS={p}: expected {{'tokens': [{{token, tenants}}]}} ({e})"
            ) from e
        scopes: dict[bytes, frozenset[str]] = {}
        for i, entry in enumerate(entries):
            where = f"RESIDUE_TENANT_TOKENS={p}, entry {i}"
            token, tenants = (
                (entry.get("token"), entry.get("tenants")) if isinstance(entry, dict) else (None, None)
            )
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                raise InvalidInput(f"{where}: 'token' must be a non-empty string without whitespace")
            if hmac.compare_digest(token.encode(), main_token.encode()) or token.encode() in scopes:
                raise InvalidInput(
                    f"{where}: every tenant token must be unique and differ from RESIDUE_TOKEN"
                )
            if not isinstance(tenants, list) or not tenants or not all(isinstance(t, str) for t in tenants):
                raise InvalidInput(f"{where}: 'tenants' must be a non-empty list of tenant names")
            for t in tenants:
                try:
                    check_tenant(t)
                except ResidueError as e:
                    raise InvalidInput(f"{where}: {e}") from e
            scopes[token.encode()] = frozenset(tenants)
        return cls(scopes)

    def scope_of(self, token: bytes) -> frozenset[str] | None:
        """The tenants ``token`` reaches, or None when it is no tenant token (compares with every one)."""
        found: frozenset[str] | None = None
        for known, tenants in self.scopes.items():
            if hmac.compare_digest(token, known):
                found = tenants
        return found

    def require(self, context: Any, tenant: str) -> None:
        """Raise ``PermissionDenied`` when the call's token is a tenant token that does not reach ``tenant``.

        Calls with ``RESIDUE_TOKEN`` (or on a sidecar without tokens) reach every tenant."""
        token, _ = bearer(context.invocation_metadata())
        scope = None if token is None else self.scope_of(token)
        if scope is not None and tenant not in scope:
            raise PermissionDenied(
                f"this token reaches tenants {sorted(scope)}, not {tenant!r}: ask with a token of that tenant"
            )


def _deny(reason: str, error: type[ResidueError] = Unauthenticated) -> Callable[..., Any]:
    async def deny(_request: Any, _context: aio.ServicerContext[Any, Any]) -> Any:
        if error is Unauthenticated:
            raise Unauthenticated(
                f"{reason}: send metadata 'authorization: Bearer <token>' with the sidecar's RESIDUE_TOKEN"
            )
        raise error(reason)

    return deny


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Lets a call through only when its bearer token is the configured one or, for reading methods, one
    of the tenant tokens (whose tenant scope each handler then checks)."""

    def __init__(self, token: str, tenants: TenantTokens | None = None) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode()
        self._tenants = tenants

    def check(self, metadata: Any, method: str = "") -> str | None:
        """None when ``metadata`` carries a token good for ``method``, else why not (without echoing what
        was sent)."""
        token, problem = bearer(metadata)
        if token is None:
            return problem
        # compare_digest takes time independent of where the first difference is.
        if hmac.compare_digest(token, self._token):
            return None
        if self._tenants is not None and self._tenants.scope_of(token) is not None:
            return _READ_ONLY if method in WRITE_METHODS else None
        return "invalid bearer token"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        problem = self.check(handler_call_details.invocation_metadata, handler_call_details.method)
        if problem is None:
            return handler
        field = next(
            f for f in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, f)
        )
        error = PermissionDenied if problem == _READ_ONLY else Unauthenticated
        return handler._replace(**{field: _deny(problem, error)})


_READ_ONLY = "tenant tokens are read-only: only RESIDUE_TOKEN may ingest"
