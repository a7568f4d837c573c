"""One interceptor turns the ``ResidueError`` hierarchy into gRPC status codes (STYLE.md rule 10).

Servicers and the domain raise typed errors whose messages say what to fix; this module alone decides
the status code. Anything else a handler raises is a bug: it is logged with a short reference and the
client gets INTERNAL with that reference only, never a traceback or an internal message. Deadlines of
unary and client-streaming calls are enforced here too, so a handler stuck on a slow store is cancelled
at the client's deadline instead of working for nobody.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from residue_monitor.detectors.exceptions import (
    ArtifactMismatch,
    CLTFormatError,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    ResidueError,
    StoreUnavailable,
)
from residue_monitor.service._proto import residue_pb2 as pb

logger = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 1000
"""Longest status detail sent (HTTP/2 headers are small; the first sentence is what matters)."""


class Unauthenticated(ResidueError):
    """The call carried no bearer token, or the wrong one."""


class PermissionDenied(ResidueError):
    """The caller is authenticated but its token does not reach this tenant or this method."""


class LimitExceeded(ResidueError):
    """A configured bound (open requests, watcher backlog, …) would be exceeded; the message names it."""


class FailedPrecondition(ResidueError):
    """A valid call this sidecar cannot serve as configured, or for the stored data it names (Trace turned
    off, a request stored without its token ids); the message says what to change."""


class WorkerUnavailable(ResidueError):
    """A worker process (Trace's) died or could not start; it is restarted, and retrying may succeed."""


class DeadlineExceeded(ResidueError):
    """A server-side time limit (not the client's deadline) ran out; the message names the setting."""


class Rejected(InvalidInput):
    """An ingest message failed validation; ``reason`` is its ``RejectReason`` (also a metric label)."""

    def __init__(self, reason: pb.RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# Most specific first: the first matching class decides.
STATUS_OF: tuple[tuple[type[ResidueError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ArtifactMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CLTFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_of(e: ResidueError) -> grpc.StatusCode:
    """The status code a ``ResidueError`` maps to (INTERNAL for a subclass nobody mapped yet)."""
    for cls, code in STATUS_OF:
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _detail(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


async def _abort_for(e: Exception, context: aio.ServicerContext[Any, Any], method: str) -> NoReturn:
    """Abort the call with the status ``e`` maps to; always raises (``AbortError``)."""
    if isinstance(e, ResidueError):
        code = status_of(e)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("%s: unmapped %s: %s", method, type(e).__name__, e)
        await context.abort(code, _detail(e), context.trailing_metadata() or ())
    ref = uuid.uuid4().hex[:12]
    logger.error("%s failed (ref %s)", method, ref, exc_info=e)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in the residue sidecar (ref {ref}); see its log"
    )


async def _with_deadline(call: Awaitable[Any], context: aio.ServicerContext[Any, Any], method: str) -> Any:
    remaining: float | None = context.time_remaining()  # None: the client set no deadline
    if remaining is None:
        return await call
    cm = asyncio.timeout(max(remaining, 0.0))
    try:
        async with cm:
            return await call
    except TimeoutError:
        if not cm.expired():
            raise
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{method} did not finish within the client's deadline ({remaining:.3g} s); retry with a longer "
            "deadline",
        )


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps exceptions from every handler it wraps to status codes (see the module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, handler_call_details.method)


def _parsing(handler: Any, method: str) -> tuple[Any, Callable[[Any], Any]]:
    """(handler that receives raw bytes, parse): request bytes are parsed inside the handler, so a malformed
    message becomes INVALID_ARGUMENT with a message instead of grpc's own UNKNOWN / INTERNAL (a
    deserializer that raises inside grpc cannot choose its status)."""
    deser = handler.request_deserializer
    if deser is None:
        return handler, lambda raw: raw

    def parse(raw: Any) -> Any:
        try:
            return deser(raw)
        except DecodeError as e:
            raise InvalidInput(f"{method}: malformed request message ({e}); send a valid protobuf") from e

    return handler._replace(request_deserializer=None), parse


async def _parsed(raw: AsyncIterator[Any], parse: Callable[[Any], Any]) -> AsyncIterator[Any]:
    async for r in raw:
        yield parse(r)


def wrap_handler(handler: Any, method: str) -> Any:
    """``handler`` (grpc's RpcMethodHandler namedtuple) with its behaviour wrapped in the error mapping."""
    handler, parse = _parsing(handler, method)
    if handler.unary_unary is not None or handler.stream_unary is not None:
        field = "unary_unary" if handler.unary_unary is not None else "stream_unary"
        inner = getattr(handler, field)
        streamed = field == "stream_unary"

        async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            try:
                request = _parsed(request, parse) if streamed else parse(request)
                return await _with_deadline(inner(request, context), context, method)
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as e:
                await _abort_for(e, context, method)

        return handler._replace(**{field: unary})

    field = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    inner = getattr(handler, field)
    if inspect.isasyncgenfunction(inner):

        async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                request = _parsed(request, parse) if field == "stream_stream" else parse(request)
                async for response in inner(request, context):
                    yield response
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as e:
                await _abort_for(e, context, method)

        return handler._replace(**{field: streaming})

    async def writing(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        # Handlers that write with context.write() (grpc's own health Watch) return None.
        try:
            request = _parsed(request, parse) if field == "stream_stream" else parse(request)
            await inner(request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort_for(e, context, method)

    return handler._replace(**{field: writing})
