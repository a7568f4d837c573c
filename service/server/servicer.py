"""``residue.v1.ResidueService``: thin handlers, validate → domain call → convert (STYLE.md rule 11).

Errors are raised, never turned into statuses here: ``errors.ErrorInterceptor`` maps them.

Ingest semantics (DESIGN.md §5): one long-lived client stream per plugin worker, carrying many requests.
The first invalid message ends the stream with INVALID_ARGUMENT (its detail says which message and what
to fix) and a RESOURCE_EXHAUSTED ends it when a bound is hit; everything accepted before stays assembled,
because requests live in the sidecar, not in the stream, so a plugin that reconnects continues where it
was. The ``IngestSummary`` of a failed stream rides in the trailing metadata ``residue-ingest-summary-bin``.
While the sidecar drains, a stream returns its summary after the message in hand, so the plugin can
reconnect to another replica. An ``IngestBatch`` is handled message by message, as if they had come one
after another (an invalid one ends the stream; those before it stay accepted).

Trace builds an attribution graph in ``TraceService``'s worker processes (``service.server.trace``): the
handler only converts and awaits, so ingest keeps being served while a graph is built.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from residue_monitor.detectors.exceptions import InvalidInput, NotFound, ResidueError
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.server.auth import TenantTokens
from residue_monitor.service.server.convert import (
    fingerprint_protos,
    record_filter,
    trace_call,
    trace_result,
    watch_filter,
)
from residue_monitor.service.server.flags import FlagHub, watch
from residue_monitor.service.server.pipeline import IngestPipeline, StreamCounts
from residue_monitor.service.server.scoring import Registry, Scorer
from residue_monitor.service.server.trace import TraceService
from residue_monitor.service.server.validate import unbatched
from residue_monitor.service.server.waiters import MAX_WAIT_MS, RECHECK_S
from residue_monitor.service.store import MemoryStore, Store

SUMMARY_METADATA_KEY = "residue-ingest-summary-bin"
Context = aio.ServicerContext[Any, Any]


class ResidueServicer(pb_grpc.ResidueServiceServicer):
    """The sidecar's API over the pipeline, the store, the scorers, the flag hub and the trace workers."""

    def __init__(
        self,
        pipeline: IngestPipeline,
        store: Store,
        scorers: Registry[Scorer],
        hub: FlagHub,
        draining: asyncio.Event,
        tracer: TraceService,
        tenants: TenantTokens | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._store = store
        self._scorers = scorers
        self._hub = hub
        self._draining = draining
        self._tracer = tracer
        self._tenants = tenants
        self._tail_store = not isinstance(store, MemoryStore)
        """A store other replicas may share: WatchFlags also tails its flag stream (flags.watch)."""

    def _require(self, context: Context, tenant: str) -> None:
        """PERMISSION_DENIED for a tenant token outside its tenants (auth.TenantTokens)."""
        if self._tenants is not None:
            self._tenants.require(context, tenant)

    async def Ingest(
        self, request_iterator: AsyncIterator[pb.IngestMessage], context: Context
    ) -> pb.IngestSummary:
        counts = StreamCounts()
        try:
            async for msg in request_iterator:
                for inner in unbatched(msg):  # a batch inside it is rejected by handle()
                    await self._pipeline.handle(inner, counts)
                if self._draining.is_set():
                    break
        except ResidueError:
            await self._pipeline.settle(counts)
            context.set_trailing_metadata(((SUMMARY_METADATA_KEY, counts.summary().SerializeToString()),))
            raise
        await self._pipeline.settle(counts)  # the stream answers once its records are stored
        return counts.summary()

    async def GetResidue(self, request: pb.GetResidueRequest, context: Context) -> pb.ResidueRecord:
        self._require(context, request.tenant)
        if not request.wait_ms:
            return await self._store.get_record(request.request_id, request.tenant)
        if request.wait_ms > MAX_WAIT_MS:
            raise InvalidInput(f"wait_ms must be at most {MAX_WAIT_MS}, got {request.wait_ms}")
        loop = asyncio.get_running_loop()
        wait_s = request.wait_ms / 1e3
        remaining = context.time_remaining()
        if remaining is not None:  # answer (NOT_FOUND) a little before the caller's deadline
            wait_s = min(wait_s, max(0.0, remaining - 0.05))
        deadline = loop.time() + wait_s
        with self._pipeline.waiters.watch(request.tenant, request.request_id) as stored:
            while True:
                try:
                    return await self._store.get_record(request.request_id, request.tenant)
                except NotFound:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, RECHECK_S)):
                        await stored.wait()
                stored.clear()

    async def QueryResidues(
        self, request: pb.QueryResiduesRequest, context: Context
    ) -> pb.QueryResiduesResponse:
        self._require(context, request.tenant)
        records, token = await self._store.query(
            record_filter(request), request.page_size, request.page_token
        )
        return pb.QueryResiduesResponse(records=records, next_page_token=token)

    async def WatchFlags(
        self, request: pb.WatchFlagsRequest, context: Context
    ) -> AsyncIterator[pb.FlagEvent]:
        self._require(context, request.tenant)
        events = watch(self._hub, self._store, watch_filter(request), tail_store=self._tail_store)

        def rpc_done(_ctx: object) -> None:
            # The RPC ended (client hung up, deadline, shutdown) while this generator may sit at a yield
            # that is never resumed: close the inner generator now, so its subscription and store tail are
            # freed at once rather than whenever it is garbage-collected (seen as a leaked watcher).
            closing = asyncio.ensure_future(events.aclose())
            closing.add_done_callback(lambda t: t.cancelled() or t.exception())

        context.add_done_callback(rpc_done)  # pyright: ignore[reportArgumentType]
        async with contextlib.aclosing(events):
            async for ev in events:
                yield ev

    async def ListFingerprints(
        self, request: pb.ListFingerprintsRequest, context: Context
    ) -> pb.ListFingerprintsResponse:
        return fingerprint_protos(self._scorers, request.model)

    async def Trace(self, request: pb.TraceRequest, context: Context) -> pb.TraceResult:
        if request.WhichOneof("source") == "request_id":  # a stored request: its tenant's data
            self._require(context, request.tenant)
        outcome = await self._tracer.trace(trace_call(request), context.time_remaining())
        return trace_result(outcome)
