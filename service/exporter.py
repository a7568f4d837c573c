"""Prometheus exporter: the sidecar's counters as a frozen snapshot, and the collector over it.

STYLE.md rules 2 and 8: the server calls ``StatsAccumulator.inc_*`` / ``observe_*``; the accumulator
hands out frozen :class:`SidecarStats`; :class:`ResidueCollector` alone turns a snapshot into samples,
at scrape time, on an injected registry (never the global ``REGISTRY``: tests and several sidecars in
one process must not share state).

Label sets are closed (rule 9): phases, layer bands and drop reasons are fixed here, fingerprints are
the names the sidecar started with. An unknown phase or band (our own bug) is rejected; an unknown
reason or fingerprint (from the wire: a newer plugin or catalogue) folds into ``"other"``. Request
ids are never labels; the latest one rides as an OpenMetrics exemplar on flag counters and scores.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from residue_monitor.detectors.exceptions import InvalidInput

logger = logging.getLogger(__name__)

Phase = Literal["prompt_last", "decode", "final"]
LayerBand = Literal["early", "middle", "late"]
DropReason = Literal[
    "queue_full", "hook_error", "send_error", "invalid_frame", "unknown_request", "late", "duplicate",
    "over_limit", "other",
]  # fmt: skip
"""Plugin side: queue_full, hook_error, send_error. Sidecar side: invalid_frame, unknown_request (no
RequestStart), late (the request was already finalized), duplicate (a repeat of an ingested frame: nothing
is lost), over_limit (RESIDUE_MAX_FRAMES_PER_REQUEST reached)."""
TraceCode = Literal[
    "ok", "cancelled", "invalid_argument", "not_found", "failed_precondition", "resource_exhausted",
    "deadline_exceeded", "unavailable", "internal", "other",
]  # fmt: skip
"""How a Trace call ended: its gRPC status code in lower case; ``cancelled``: the client's deadline passed
or it hung up first."""
# get_args keeps each Literal the single source of its label values.
PHASES = cast("tuple[Phase, ...]", get_args(Phase))
LAYER_BANDS = cast("tuple[LayerBand, ...]", get_args(LayerBand))
DROP_REASONS = cast("tuple[DropReason, ...]", get_args(DropReason))
TRACE_CODES = cast("tuple[TraceCode, ...]", get_args(TraceCode))
OTHER = "other"

# Upper bounds (+Inf implicit). Scores sit in ~[0, 1]; 2 and 5 keep an uncalibrated one out of +Inf.
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 2.0, 5.0)
RISK_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# ‖mlp_out − recon‖/‖mlp_out‖: FVU 0.3–0.4 (FACTS-clt.md) puts ratios near 0.6; a broken CLT goes past 1.
ERROR_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0)
# Attention entropy in nats; ln(8192) ≈ 9 bounds any context we serve.
ENTROPY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
INGEST_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CAPTURE_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

# HELP text per family; the keys are also every residue_* family the collector emits.
HELP: Mapping[str, str] = {
    "residue_requests": "Requests the sidecar saw start.",
    "residue_frames": "Residue frames ingested, by phase (dropped frames are not counted here).",
    "residue_frames_dropped": "Residue frames lost before ingest, by reason.",
    "residue_flags": "Requests a fingerprint flagged; the exemplar is the latest request.",
    "residue_store_errors": "Store operations that failed.",
    "residue_prefill_flags": "Requests the prefill failure forecast flagged before generating.",
    "residue_store_backlog": "Records held in memory while the store is unavailable.",
    "residue_fingerprint_score": "Per-request fingerprint match score.",
    "residue_error_ratio": "CLT reconstruction error ratio ||mlp_out - recon|| / ||mlp_out|| per layer.",
    "residue_attention_entropy": "Per-head attention entropy at sampled rows, in nats.",
    "residue_ingest_latency_seconds": "Time the sidecar took to ingest one frame.",
    "residue_capture_overhead_seconds": "Forward-pass time the plugin's capture added, per step.",
    "residue_prefill_risk": "Failure forecast at the last prompt token, in [0, 1].",
    "residue_trace_calls": "Trace calls (attribution graphs) answered, by status code.",
}

# OpenMetrics caps an exemplar's label names + values at 128 UTF-8 characters, and Prometheus fails
# the *whole scrape* on a longer one, so long vLLM request ids are cut rather than trusted.
_EXEMPLAR_KEY = "request_id"
_EXEMPLAR_MAX_VALUE = 128 - len(_EXEMPLAR_KEY)


@dataclass(frozen=True, slots=True)
class RequestExemplar:
    """The most recent observation worth pointing at: which request, what value, when (unix s)."""

    request_id: str
    value: float
    timestamp: float

    def to_prometheus(self) -> Exemplar:
        return Exemplar({_EXEMPLAR_KEY: self.request_id[:_EXEMPLAR_MAX_VALUE]}, self.value, self.timestamp)


@dataclass(frozen=True, slots=True)
class HistogramData:
    """One histogram series: ``counts[i]`` observations fell in ``(bounds[i-1], bounds[i]]``.

    ``counts`` has ``len(bounds) + 1`` entries, the last one being the +Inf overflow; ``exemplars``
    is parallel to ``counts`` (or empty) and holds the latest exemplar seen in each bucket.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float = 0.0
    exemplars: tuple[RequestExemplar | None, ...] = ()

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative_buckets(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        """Buckets as the ``(le, cumulative count[, exemplar])`` rows Prometheus families take."""
        rows: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        running = 0
        for i, n in enumerate(self.counts):
            running += n
            le = "+Inf" if i == len(self.bounds) else floatToGoString(self.bounds[i])
            ex = self.exemplars[i] if self.exemplars else None
            rows.append((le, float(running)) if ex is None else (le, float(running), ex.to_prometheus()))
        return rows


@dataclass(frozen=True, slots=True)
class SidecarStats:
    """Everything the sidecar has counted since it started: a frozen, self-consistent snapshot."""

    requests: int
    frames: Mapping[str, int]  # by phase
    frames_dropped: Mapping[str, int]  # by drop reason
    flags: Mapping[str, int]  # by fingerprint
    flag_exemplars: Mapping[str, RequestExemplar]  # by fingerprint; value = the flagging score
    fingerprint_score: Mapping[str, HistogramData]  # by fingerprint
    error_ratio: Mapping[str, HistogramData]  # by layer band
    attention_entropy: HistogramData
    ingest_latency_seconds: HistogramData
    store_errors: int
    store_backlog: int
    capture_overhead_seconds: HistogramData
    prefill_risk: HistogramData
    prefill_flags: int
    trace_calls: Mapping[str, int]  # by status code (TraceCode)
    prefill_flag_exemplar: RequestExemplar | None = None


@dataclass(slots=True)
class _Histogram:
    """Mutable twin of :class:`HistogramData`, only ever touched under the accumulator's lock."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    exemplars: list[RequestExemplar | None] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.exemplars = [None] * (len(self.bounds) + 1)

    def observe(self, value: float, exemplar: RequestExemplar | None) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' le is inclusive).
        i = bisect.bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.total += value
        if exemplar is not None:
            self.exemplars[i] = exemplar

    def freeze(self) -> HistogramData:
        return HistogramData(self.bounds, tuple(self.counts), self.total, tuple(self.exemplars))


def layer_band(layer: int, n_layers: int) -> LayerBand:
    """The ``layer_band`` label of a layer: the model's layers cut into thirds."""
    if not 0 <= layer < n_layers:
        raise InvalidInput(f"layer must be in [0, {n_layers}), got {layer}")
    return LAYER_BANDS[min(3 * layer // n_layers, 2)]


def _finite(name: str, value: float) -> float:
    # One NaN in a histogram's sum poisons every rate() over it for the rest of the process.
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}")
    return value


def _closed(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidInput(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


class StatsAccumulator:
    """Thread-safe counters the server updates; :meth:`snapshot` freezes them for a scrape.

    ``fingerprints`` is the closed set of fingerprint label values (the registry keys, rule 4);
    anything else is counted under ``"other"``.
    """

    def __init__(self, fingerprints: Iterable[str] = (), *, clock: Callable[[], float] = time.time) -> None:
        names = (*dict.fromkeys(fingerprints), OTHER)
        if OTHER in names[:-1] or "" in names:  # "" would read as "label absent" in PromQL
            raise InvalidInput(f"fingerprint names must be non-empty and not {OTHER!r}, got {names[:-1]}")
        self._clock = clock
        self._lock = threading.Lock()
        self._requests = 0
        self._frames: dict[str, int] = dict.fromkeys(PHASES, 0)
        self._dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._flags = dict.fromkeys(names, 0)
        self._flag_exemplars: dict[str, RequestExemplar] = {}
        self._scores = {fp: _Histogram(SCORE_BUCKETS) for fp in names}
        self._errors: dict[str, _Histogram] = {b: _Histogram(ERROR_RATIO_BUCKETS) for b in LAYER_BANDS}
        self._entropy = _Histogram(ENTROPY_BUCKETS)
        self._ingest = _Histogram(INGEST_LATENCY_BUCKETS)
        self._store_errors = 0
        self._store_backlog = 0
        self._overhead = _Histogram(CAPTURE_OVERHEAD_BUCKETS)
        self._prefill_risk = _Histogram(RISK_BUCKETS)
        self._prefill_flags = 0
        self._prefill_flag_exemplar: RequestExemplar | None = None
        self._trace_calls: dict[str, int] = dict.fromkeys(TRACE_CODES, 0)

    def _fingerprint(self, name: str) -> str:
        return name if name in self._flags else OTHER

    def _exemplar(self, request_id: str | None, value: float) -> RequestExemplar | None:
        return None if not request_id else RequestExemplar(request_id, value, self._clock())

    def inc_requests(self, n: int = 1) -> None:
        with self._lock:
            self._requests += _count(n)

    def inc_frames(self, phase: str, n: int = 1) -> None:
        key = _closed("phase", phase, PHASES)
        with self._lock:
            self._frames[key] += _count(n)

    def inc_frames_dropped(self, reason: str, n: int = 1) -> None:
        key = reason if reason in self._dropped else OTHER
        with self._lock:
            self._dropped[key] += _count(n)

    def observe_fingerprint_score(
        self, fingerprint: str, score: float, request_id: str | None = None, *, flagged: bool = False
    ) -> None:
        """One request scored against one fingerprint; ``flagged`` also counts it in the flag counter."""
        key, ex = self._fingerprint(fingerprint), self._exemplar(request_id, _finite("score", score))
        with self._lock:
            self._scores[key].observe(score, ex)
            self._flags[key] += flagged
            if flagged and ex is not None:
                self._flag_exemplars[key] = ex

    def observe_error_ratio(self, band: str, ratio: float) -> None:
        key = _closed("layer_band", band, LAYER_BANDS)
        with self._lock:
            self._errors[key].observe(_finite("error_ratio", ratio), None)

    def observe_attention_entropy(self, nats: float) -> None:
        with self._lock:
            self._entropy.observe(_finite("attention_entropy", nats), None)

    def observe_ingest_latency(self, seconds: float) -> None:
        with self._lock:
            self._ingest.observe(_finite("ingest_latency_seconds", seconds), None)

    def inc_store_errors(self, n: int = 1) -> None:
        with self._lock:
            self._store_errors += _count(n)

    def set_store_backlog(self, size: int) -> None:
        with self._lock:
            self._store_backlog = _count(size)

    def observe_capture_overhead(self, seconds: float) -> None:
        with self._lock:
            self._overhead.observe(_finite("capture_overhead_seconds", seconds), None)

    def observe_prefill_risk(
        self, risk: float, request_id: str | None = None, *, flagged: bool = False
    ) -> None:
        """The prefill failure forecast for one request; ``flagged`` when it crossed its threshold."""
        ex = self._exemplar(request_id, _finite("prefill_risk", risk))
        with self._lock:
            self._prefill_risk.observe(risk, ex)
            self._prefill_flags += flagged
            if flagged and ex is not None:
                self._prefill_flag_exemplar = ex

    def inc_trace_calls(self, code: str) -> None:
        """One Trace call ended with ``code`` (a ``TraceCode``; anything else counts as ``other``)."""
        key = code if code in self._trace_calls else OTHER
        with self._lock:
            self._trace_calls[key] += 1

    def snapshot(self) -> SidecarStats:
        """A frozen copy; taken under the lock so counters and histograms agree with each other."""
        with self._lock:
            return SidecarStats(
                requests=self._requests,
                frames=MappingProxyType(dict(self._frames)),
                frames_dropped=MappingProxyType(dict(self._dropped)),
                flags=MappingProxyType(dict(self._flags)),
                flag_exemplars=MappingProxyType(dict(self._flag_exemplars)),
                fingerprint_score=MappingProxyType({k: h.freeze() for k, h in self._scores.items()}),
                error_ratio=MappingProxyType({k: h.freeze() for k, h in self._errors.items()}),
                attention_entropy=self._entropy.freeze(),
                ingest_latency_seconds=self._ingest.freeze(),
                store_errors=self._store_errors,
                store_backlog=self._store_backlog,
                capture_overhead_seconds=self._overhead.freeze(),
                prefill_risk=self._prefill_risk.freeze(),
                prefill_flags=self._prefill_flags,
                prefill_flag_exemplar=self._prefill_flag_exemplar,
                trace_calls=MappingProxyType(dict(self._trace_calls)),
            )


def _count(n: int) -> int:
    if n < 0:
        raise InvalidInput(f"counter increments and sizes must be >= 0, got {n}")
    return n


def _counter(
    name: str,
    doc: str,
    values: Mapping[str, int] | int,
    label: str = "",
    exemplars: Mapping[str, RequestExemplar | None] | None = None,
) -> CounterMetricFamily:
    """A counter family; an int ``values`` is one unlabelled series (its exemplar under ``""``)."""
    family = CounterMetricFamily(name, doc, labels=[label] if label else None)
    series = {"": values} if isinstance(values, int) else values
    for value, n in series.items():
        ex = (exemplars or {}).get(value)
        family.add_metric([value] if label else [], n, exemplar=ex.to_prometheus() if ex else None)
    return family


def _histogram(
    name: str, doc: str, series: Mapping[str, HistogramData] | HistogramData, label: str = "", unit: str = ""
) -> HistogramMetricFamily:
    """A histogram family; a bare :class:`HistogramData` is one unlabelled series."""
    family = HistogramMetricFamily(name, doc, labels=[label] if label else None, unit=unit)
    for value, data in ({"": series} if isinstance(series, HistogramData) else series).items():
        family.add_metric([value] if label else [], data.cumulative_buckets(), data.total)
    return family


class ResidueCollector(Collector):
    """Turns one :class:`SidecarStats` per scrape into the ``residue_*`` metric families (DESIGN §7)."""

    def __init__(self, snapshot_fn: Callable[[], SidecarStats]) -> None:
        self._snapshot_fn = snapshot_fn

    def describe(self) -> Iterable[Metric]:
        # Lets the registry refuse a second collector with the same names; a snapshot is cheap.
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        s, h = self._snapshot_fn(), HELP
        yield _counter("residue_requests", h["residue_requests"], s.requests)
        yield _counter("residue_frames", h["residue_frames"], s.frames, "phase")
        yield _counter("residue_frames_dropped", h["residue_frames_dropped"], s.frames_dropped, "reason")
        yield _counter("residue_flags", h["residue_flags"], s.flags, "fingerprint", s.flag_exemplars)
        yield _counter("residue_store_errors", h["residue_store_errors"], s.store_errors)
        pex = {"": s.prefill_flag_exemplar}
        yield _counter("residue_prefill_flags", h["residue_prefill_flags"], s.prefill_flags, "", pex)
        yield _counter("residue_trace_calls", h["residue_trace_calls"], s.trace_calls, "code")
        yield GaugeMetricFamily("residue_store_backlog", h["residue_store_backlog"], value=s.store_backlog)
        score, ratio = s.fingerprint_score, s.error_ratio
        yield _histogram("residue_fingerprint_score", h["residue_fingerprint_score"], score, "fingerprint")
        yield _histogram("residue_error_ratio", h["residue_error_ratio"], ratio, "layer_band", "ratio")
        for name, data, unit in (
            ("residue_attention_entropy", s.attention_entropy, ""),
            ("residue_ingest_latency_seconds", s.ingest_latency_seconds, "seconds"),
            ("residue_capture_overhead_seconds", s.capture_overhead_seconds, "seconds"),
            ("residue_prefill_risk", s.prefill_risk, ""),
        ):
            yield _histogram(name, h[name], data, unit=unit)


def register_collectors(registry: CollectorRegistry, snapshot_fn: Callable[[], SidecarStats]) -> None:
    """Put the residue collector and process metrics (CPU, RSS, fds) on ``registry``."""
    registry.register(ResidueCollector(snapshot_fn))
    ProcessCollector(registry=registry)


@dataclass(slots=True)
class MetricsServer:
    """A running /metrics endpoint; ``port`` is the bound one (useful after asking for port 0)."""

    host: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Its own port, apart from gRPC, so a scrape never competes with ingest for the servicer's threads.
    Content negotiation (text 0.0.4 vs OpenMetrics with exemplars) and IPv6 binds are prometheus_client's.
    """
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(httpd.server_address[1])
    logger.info("serving metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(host, bound, httpd, thread)
