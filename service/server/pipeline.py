"""The ingest pipeline: validate → assemble (``step``) → score → store, flag, count.

This is the sidecar's domain side, between the thin Ingest servicer and the store. Pure steps
(``validate.to_event``, ``assembler.step``, ``record.score_request``, ``convert``) do the thinking; this
class only sequences them and performs the effects: store writes, flag publication, and the
``StatsAccumulator`` updates that become Prometheus samples (STYLE.md rule 2).

Everything runs on the event loop thread. Store writes of a finished request are shielded from
cancellation (a client hanging up, or the drain's grace period ending, must not lose a record that was
already assembled) and tracked, so ``flush()`` can wait for them before the store closes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from residue_monitor.detectors.exceptions import ResidueError
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.exporter import StatsAccumulator, layer_band
from residue_monitor.service.server.assembler import (
    Accepted,
    AssemblerLimits,
    AssemblerState,
    Dropped,
    Finalized,
    Refused,
    step,
)
from residue_monitor.service.server.convert import (
    flag_protos,
    forecast_flag,
    provisional_record,
    record_proto,
)
from residue_monitor.service.server.errors import LimitExceeded, Rejected
from residue_monitor.service.server.events import End, Event, Flush, Frame, Start, Tick
from residue_monitor.service.server.flags import FlagHub
from residue_monitor.service.server.forecasting import Forecaster, ForecastResult, forecast_request
from residue_monitor.service.server.record import Outcome, score_request
from residue_monitor.service.server.scoring import Registry, Scorer
from residue_monitor.service.server.validate import FrameLimits, to_event
from residue_monitor.service.server.waiters import RecordWaiters
from residue_monitor.service.store import Store

logger = logging.getLogger(__name__)

R = pb.RejectReason
MAX_INSTANCE_ID = 128
MAX_PLUGINS = 4096
"""Plugin instances whose last counters are remembered (the oldest report is forgotten first)."""
_DROP_LABEL = {"unknown_request": "unknown_request", "late": "late", "duplicate": "duplicate",
               "over_limit": "over_limit"}  # fmt: skip
"""Assembler drop reasons → exporter label (the same names; anything new folds into 'other' there)."""
_KIND = {"start": Start, "end": End, "frame": Frame}
MAX_STREAM_WRITES = 64
"""Store writes one Ingest stream may have in flight before it waits (bounds memory under a slow store)."""


@dataclass(slots=True)
class StreamCounts:
    """What one Ingest stream did; becomes its ``IngestSummary``."""

    started: int = 0
    accepted: int = 0
    duplicate: int = 0
    ended: int = 0
    rejected: dict[int, tuple[int, str]] = field(default_factory=dict)  # reason → (count, first detail)
    writes: set[asyncio.Task[None]] = field(default_factory=set)
    """Store writes of the requests this stream finished, not yet done (``IngestPipeline.settle``)."""

    def reject(self, reason: int, detail: str) -> None:
        n, first = self.rejected.get(reason, (0, detail))
        self.rejected[reason] = (n + 1, first)

    def summary(self) -> pb.IngestSummary:
        out = pb.IngestSummary(
            requests_started=self.started,
            frames_accepted=self.accepted,
            frames_duplicate=self.duplicate,
            requests_ended=self.ended,
            rejected=sum(n for n, _ in self.rejected.values()),
        )
        for reason, (n, detail) in sorted(self.rejected.items()):
            out.rejected_by_reason.add(reason=reason, count=n, first_detail=detail)  # type: ignore[arg-type]
        return out


class IngestPipeline:
    """Owns the assembler state; ``handle`` one message, ``tick`` for expiry, ``flush`` on shutdown."""

    def __init__(
        self,
        store: Store,
        scorers: Registry[Scorer],
        stats: StatsAccumulator,
        hub: FlagHub,
        limits: FrameLimits,
        assembler_limits: AssemblerLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        forecaster: Forecaster | None = None,
    ) -> None:
        self.state = AssemblerState()
        self.waiters = RecordWaiters()
        """GetResidue calls waiting for a record: woken when one is stored."""
        self._forecaster = forecaster
        self._forecasts: dict[str, ForecastResult] = {}
        """Prefill forecasts of open requests (made when the PROMPT_LAST frame arrived; bounded by the
        open requests: removed when the request is finalized)."""
        self._early: dict[str, asyncio.Task[None]] = {}
        """Provisional-record writes of open requests; the final write waits for its request's one."""
        self._store = store
        self._scorers = scorers
        self._stats = stats
        self._hub = hub
        self._limits = limits
        self._alimits = assembler_limits
        self._clock = clock
        self._wall = wall_clock
        self._writes: set[asyncio.Task[None]] = set()
        self._store_errors_seen = store.stats().errors
        self._bands: dict[int, list[str]] = {}  # n_layers → layer_band label of each layer
        self._plugins: dict[str, tuple[float, ...]] = {}  # plugin instance → its last counters

    async def handle(self, msg: pb.IngestMessage, counts: StreamCounts) -> None:
        """Ingest one message; raises ``Rejected`` (invalid) or ``LimitExceeded`` (over a bound)."""
        t0 = time.perf_counter()
        if msg.WhichOneof("kind") == "plugin_stats":
            self.plugin_stats(msg.plugin_stats, counts)
            return
        try:
            event = to_event(msg, self._limits)
        except Rejected as e:
            counts.reject(e.reason, str(e))
            if msg.WhichOneof("kind") == "frame":
                self._stats.inc_frames_dropped("invalid_frame")
            raise
        await self._apply(event, counts)
        if isinstance(event, Frame):
            self._stats.observe_ingest_latency(time.perf_counter() - t0)

    def plugin_stats(self, ps: pb.PluginStats, counts: StreamCounts) -> None:
        """Add what a plugin lost since its previous report to the dropped-frames counters."""
        if not 1 <= len(ps.instance_id) <= MAX_INSTANCE_ID:
            counts.reject(R.REJECT_REASON_MALFORMED, "PluginStats.instance_id must be 1..128 characters")
            raise Rejected(R.REJECT_REASON_MALFORMED, "PluginStats.instance_id must be 1..128 characters")
        if not (math.isfinite(ps.capture_seconds) and ps.capture_seconds >= 0):
            counts.reject(R.REJECT_REASON_MALFORMED, "PluginStats.capture_seconds must be finite and >= 0")
            raise Rejected(R.REJECT_REASON_MALFORMED, "PluginStats.capture_seconds must be finite and >= 0")
        now = (ps.queue_full, ps.hook_errors, ps.send_errors, ps.captured_steps, ps.capture_seconds)
        before = self._plugins.pop(ps.instance_id, (0, 0, 0, 0, 0.0))
        if any(n < b for n, b in zip(now, before, strict=True)):
            before = (0, 0, 0, 0, 0.0)  # the counters went down: a new process under the same id
        for reason, n, b in zip(("queue_full", "hook_error", "send_error"), now, before, strict=False):
            if n > b:
                self._stats.inc_frames_dropped(reason, int(n - b))
        if now[3] > before[3]:
            self._stats.observe_capture_overhead((now[4] - before[4]) / (now[3] - before[3]))
        self._plugins[ps.instance_id] = now  # re-inserted last: the dict is oldest-first
        while len(self._plugins) > MAX_PLUGINS:
            del self._plugins[next(iter(self._plugins))]

    async def tick(self) -> None:
        """Expire idle requests and orphans; refresh the store gauges."""
        await self._apply(Tick(), None)
        self.sync_store_stats()

    async def flush(self) -> None:
        """Finalize every open request as incomplete and wait for all pending store writes."""
        await self._apply(Flush(), None)
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self.sync_store_stats()

    def sync_store_stats(self) -> None:
        """Feed the store's error count (as a delta) and backlog size to the metrics."""
        s = self._store.stats()
        if s.errors > self._store_errors_seen:
            self._stats.inc_store_errors(s.errors - self._store_errors_seen)
        self._store_errors_seen = s.errors
        self._stats.set_store_backlog(s.backlog_records)

    async def run_ticker(self, interval_s: float) -> None:
        """Call ``tick`` every ``interval_s`` until cancelled; a failing tick is logged, not fatal."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:
                logger.exception("assembler tick failed")

    # ---- effects of one step ---------------------------------------------------------------------

    async def _apply(self, event: Event, counts: StreamCounts | None) -> None:
        self.state, outputs = step(self.state, event, self._clock(), self._alimits)
        refused: Refused | None = None
        own = getattr(event, "request_id", None)
        for o in outputs:
            if isinstance(o, Accepted):
                # Orphans replayed by a start were counted by the stream that sent them (as Held).
                mine = o.frame is event if o.frame is not None else isinstance(event, _KIND[o.kind])
                self._accepted(o, counts if mine else None)
                if o.frame is not None and o.frame.phase == "prompt_last" and self._forecaster is not None:
                    self._forecast_live(o.frame)
            elif isinstance(o, Dropped):
                self._dropped(o, counts if o.request_id == own else None)
            elif isinstance(o, Finalized):
                await self._finalized(o, counts)
            elif isinstance(o, Refused):
                refused = o
            elif counts is not None:  # Held: accepted for now, assembled when its start arrives
                counts.accepted += 1
        if refused is not None:
            if refused.why == "limit":
                raise LimitExceeded(refused.detail)
            if counts is not None:
                counts.reject(R.REJECT_REASON_MALFORMED, refused.detail)
            raise Rejected(R.REJECT_REASON_MALFORMED, refused.detail)

    def _accepted(self, o: Accepted, counts: StreamCounts | None) -> None:
        if o.kind == "start":
            self._stats.inc_requests()
            if counts is not None:
                counts.started += 1
            return
        if o.kind == "end":
            if counts is not None:
                counts.ended += 1
            return
        frame = o.frame
        assert frame is not None
        if counts is not None:
            counts.accepted += 1
        self._stats.inc_frames(frame.phase)

    def _dropped(self, o: Dropped, counts: StreamCounts | None) -> None:
        if o.frames:
            self._stats.inc_frames_dropped(_DROP_LABEL.get(o.reason, o.reason), o.frames)
        logger.debug("dropped (%s): %s", o.reason, o.detail)
        if counts is None:
            return
        if o.reason == "duplicate":
            counts.duplicate += o.frames
        elif o.reason in ("late", "unknown_request"):
            counts.reject(R.REJECT_REASON_UNKNOWN_REQUEST, o.detail)

    def _forecast_live(self, frame: Frame) -> None:
        """Score a request's PROMPT_LAST frame now, before the request ends: count it, write a provisional
        record (GetResidue answers with the forecast) and raise the flag on WatchFlags when it crosses
        the threshold. A second PROMPT_LAST frame of the same request changes nothing."""
        assert self._forecaster is not None
        rid = frame.request_id
        opened = self.state.open.get(rid)
        if opened is None or rid in self._forecasts:
            return
        f = replace(self._forecaster.score_frame(frame, opened.start), scored_time=self._wall())
        self._forecasts[rid] = f
        if f.probability is not None:
            self._stats.observe_prefill_risk(f.probability, rid, flagged=f.flagged)
        task = asyncio.get_running_loop().create_task(self._persist_forecast(opened.start, frame, f))
        self._early[rid] = task
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _persist_forecast(self, start: Start, frame: Frame, f: ForecastResult) -> None:
        rid = start.request_id
        try:
            await self._store.put_record(provisional_record(start, frame, f))
        except ResidueError as e:
            logger.warning("storing the prefill forecast of request %r failed: %s", rid, e)
        else:
            self.waiters.notify(start.tenant, rid)
        if f.flagged:
            ev = forecast_flag(start, f, self._wall())
            try:
                ev.event_id = await self._store.append_flag(ev)
            except ResidueError as e:
                logger.warning("storing the prefill-forecast flag of request %r failed: %s", rid, e)
            self._hub.publish(ev)

    async def _finalized(self, o: Finalized, counts: StreamCounts | None) -> None:
        rid = o.request.start.request_id
        forecast = self._forecasts.pop(rid, None)
        if forecast is None:
            forecast = forecast_request(o.request, self._forecaster)
        outcome = score_request(
            o.request, self._scorers, self._limits.n_layers if self._limits.clt_id else None, forecast
        )
        task = asyncio.get_running_loop().create_task(self._persist(outcome, self._early.pop(rid, None)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        if counts is None:
            # Expiry and shutdown: wait here. A cancelled caller stops waiting; the write goes on.
            await asyncio.shield(task)
            return
        # An Ingest stream goes on reading while the store write is in flight (its round trip overlaps
        # the next frames); ``settle`` waits for them before the stream answers. Bounded: past
        # MAX_STREAM_WRITES in flight the stream waits for the oldest to finish.
        counts.writes.add(task)
        task.add_done_callback(counts.writes.discard)
        if len(counts.writes) > MAX_STREAM_WRITES:
            await asyncio.wait(list(counts.writes), return_when=asyncio.FIRST_COMPLETED)

    async def settle(self, counts: StreamCounts) -> None:
        """Wait until every record this stream finished is stored (then GetResidue sees them all)."""
        if counts.writes:
            await asyncio.shield(asyncio.gather(*counts.writes, return_exceptions=True))

    def _observe(self, outcome: Outcome) -> None:
        """A finished request's samples: scores, and per-layer / per-head means over its frames.

        Means per request rather than a sample per frame: one request weighs the same however many
        rows were sampled, and the per-frame path stays free of ~30 (or, with heads, ~300) histogram
        updates, which cost more than validating the frame.
        """
        rid = outcome.request.start.request_id
        for m in outcome.matches:
            self._stats.observe_fingerprint_score(m.name, m.score, rid, flagged=m.matched)
        layers = outcome.overall.layers
        if layers:
            # Bands need the model's layer count: the CLT's when one is loaded, else the last layer seen.
            n = self._limits.n_layers if self._limits.n_features is not None else layers[-1].layer + 1
            bands = self._bands.get(n)
            if bands is None:
                bands = self._bands[n] = [layer_band(i, n) for i in range(n)]
            for s in layers:
                self._stats.observe_error_ratio(bands[s.layer], s.mean_error_ratio)
        for entropy in outcome.head_entropy:
            self._stats.observe_attention_entropy(entropy)

    async def _persist(self, outcome: Outcome, early: asyncio.Task[None] | None = None) -> None:
        req = outcome.request
        rid = req.start.request_id
        if early is not None:
            # The provisional record must land first, or it would replace the final one.
            await asyncio.gather(early, return_exceptions=True)
        if not req.complete:
            logger.info("request %r stored incomplete: %s", rid, req.incomplete_reason)
        self._observe(outcome)
        try:
            await self._store.put_record(record_proto(outcome))
        except ResidueError as e:
            logger.warning("storing the record of request %r failed: %s", rid, e)
        else:
            self.waiters.notify(req.start.tenant, rid)
        for ev in flag_protos(outcome, self._wall()):
            try:
                # Live watchers get the id too, so they can resume with after_event_id.
                ev.event_id = await self._store.append_flag(ev)
            except ResidueError as e:
                logger.warning("storing flag %r of request %r failed: %s", ev.flag, rid, e)
            self._hub.publish(ev)
        self.sync_store_stats()
