"""Domain values ↔ wire messages, in one place (STYLE.md rule 11), for the servicers and the pipeline.

Ingest messages become events in ``validate.py`` (conversion and validation are one pass there); this
module covers everything else: outcome → ``ResidueRecord`` and ``FlagEvent``s, scorers → ``Fingerprint``s,
query and watch requests → store / hub filters, stream counters → ``IngestSummary``, ``TraceRequest`` →
``TraceCall`` and ``TraceOutcome`` → ``TraceResult``.
"""

from __future__ import annotations

from collections.abc import Iterable

from residue_monitor.detectors.attribution.graph import TargetKind, TargetSpec
from residue_monitor.detectors.attribution.summary import NodeInfo
from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.events import Frame, Start
from residue_monitor.service.server.flags import WatchFilter
from residue_monitor.service.server.forecasting import FLAG_NAME, IN_FLIGHT, NO_MODEL, ForecastResult
from residue_monitor.service.server.record import Outcome, Summary, summarize
from residue_monitor.service.server.scoring import Scorer
from residue_monitor.service.server.trace import TraceCall, check_fraction
from residue_monitor.service.store.base import RecordFilter, check_tenant
from residue_monitor.service.tracing import TraceOutcome, node_id


def _set_time(ts: object, unix_s: float) -> None:
    ts.FromNanoseconds(round(unix_s * 1e9))  # type: ignore[attr-defined]  # a Timestamp message


def _time(ts: object) -> float | None:
    seconds, nanos = ts.seconds, ts.nanos  # type: ignore[attr-defined]  # a Timestamp message
    return seconds + nanos / 1e9 if seconds or nanos else None


def _base_record(s: Start) -> pb.ResidueRecord:
    r = pb.ResidueRecord(
        request_id=s.request_id,
        model=s.model,
        clt_id=s.clt_id,
        tenant=s.tenant,
        prompt_tokens=s.prompt_tokens,
        num_cached_tokens=s.num_cached_tokens,
        prompt_token_ids=list(s.prompt_token_ids) if s.token_ids_opted_in else [],
    )
    if s.start_time is not None:
        _set_time(r.start_time, s.start_time)
    return r


def _summary(summary: Summary, msg: pb.SignatureSummary) -> None:
    msg.frame_count = summary.frame_count
    for layer in summary.layers:
        msg.layers.add(
            layer=layer.layer,
            mean_error_ratio=layer.mean_error_ratio,
            mean_l0=layer.mean_l0,
            mean_mass=layer.mean_mass,
        )


def set_forecast(msg: pb.PrefillForecast, f: ForecastResult | None) -> None:
    """A forecast (or its absence, with the reason) into the record's ``prefill_forecast``."""
    if f is None:
        msg.unavailable_reason = NO_MODEL
        return
    if f.probability is None:
        msg.unavailable_reason = f.reason
        return
    sc = msg.score
    sc.probability = f.probability
    sc.threshold = f.threshold
    sc.flagged = f.flagged
    sc.forecast_id = f.forecast_id
    if f.prefill_time is not None:
        _set_time(sc.prefill_time, f.prefill_time)
    if f.scored_time is not None:
        _set_time(sc.scored_time, f.scored_time)


def record_proto(o: Outcome) -> pb.ResidueRecord:
    """The stored record of an outcome (no text, DESIGN.md §8; token ids only when opted in)."""
    s, e = o.request.start, o.request.end
    r = _base_record(s)
    r.complete = e is not None
    if e is not None:
        r.finish_reason = e.finish_reason  # type: ignore[assignment]  # validated FinishReason value
        r.output_tokens = e.output_tokens
        r.empty_output = e.empty_output
        r.prompt_tokens = e.prompt_tokens or s.prompt_tokens
        if e.end_time is not None:
            _set_time(r.end_time, e.end_time)
    r.incomplete_reason = o.request.incomplete_reason
    r.frames_over_limit = o.request.frames_over_limit
    r.frames_duplicate = o.request.duplicates
    _summary(o.overall, r.signature)
    _summary(o.prefill, r.prefill_signature)
    for res in o.results:
        r.detector_scores[res.name] = res.score
    for m in o.matches:
        r.fingerprint_matches.add(fingerprint=m.name, score=m.score, threshold=m.threshold, matched=m.matched)
    r.flags.extend(m.name for m in o.flags)
    if o.forecast is not None and o.forecast.flagged:
        r.flags.append(FLAG_NAME)
    set_forecast(r.prefill_forecast, o.forecast)
    return r


def provisional_record(start: Start, frame: Frame, f: ForecastResult) -> pb.ResidueRecord:
    """The record of a request still running, written when its prefill forecast is made, so GetResidue
    answers before the request ends; the final record replaces it (``complete`` false until then)."""
    r = _base_record(start)
    r.incomplete_reason = IN_FLIGHT
    _summary(summarize([frame]), r.prefill_signature)
    if f.flagged:
        r.flags.append(FLAG_NAME)
    set_forecast(r.prefill_forecast, f)
    return r


def _flag_event(
    start: Start, flag: str, score: float, threshold: float, now: float, fingerprint: str = ""
) -> pb.FlagEvent:
    """A FlagEvent of the request ``start`` opened, stamped ``now`` (Unix seconds)."""
    ev = pb.FlagEvent(
        request_id=start.request_id,
        model=start.model,
        tenant=start.tenant,
        flag=flag,
        fingerprint=fingerprint,
        score=score,
        threshold=threshold,
        clt_id=start.clt_id,
    )
    _set_time(ev.time, now)
    return ev


def forecast_flag(start: Start, f: ForecastResult, now: float) -> pb.FlagEvent:
    """The FlagEvent of a forecast that crossed its threshold (``flag`` = "prefill_forecast")."""
    assert f.probability is not None
    return _flag_event(start, FLAG_NAME, f.probability, f.threshold, now)


def flag_protos(o: Outcome, now: float) -> list[pb.FlagEvent]:
    """One FlagEvent per matched fingerprint, stamped ``now`` (Unix seconds). The prefill forecast's flag
    is not among them: it was raised live, when the forecast was made (``forecast_flag``)."""
    s = o.request.start
    return [_flag_event(s, m.name, m.score, m.threshold, now, fingerprint=m.name) for m in o.flags]


def fingerprint_protos(scorers: Iterable[Scorer], model: str = "") -> pb.ListFingerprintsResponse:
    """The thresholded scorers (fingerprints), by name; ``model`` keeps those that apply to it."""
    out = pb.ListFingerprintsResponse()
    for info in sorted((s.info for s in scorers), key=lambda i: i.name):
        if info.threshold is None or (model and info.model and info.model != model):
            continue
        out.fingerprints.add(
            name=info.name,
            version=info.version,
            model=info.model,
            clt_id=info.clt_id,
            threshold=info.threshold,
            target_fpr=info.target_fpr,
            description=info.description,
        )
    return out


def record_filter(q: pb.QueryResiduesRequest) -> RecordFilter:
    """The store filter of a QueryResidues request (invalid combinations raise ``InvalidInput``)."""
    return RecordFilter(
        tenant=q.tenant,
        start=_time(q.start_time),
        end=_time(q.end_time),
        model=q.model,
        fingerprint=q.fingerprint,
        min_score=q.min_score if q.HasField("min_score") else None,
        flagged_only=q.flagged_only,
    )


def watch_filter(w: pb.WatchFlagsRequest) -> WatchFilter:
    """The hub filter of a WatchFlags request."""
    return WatchFilter(check_tenant(w.tenant), w.model, w.fingerprint, w.after_event_id)


TARGET_OF: dict[int, TargetKind] = {
    pb.TARGET_KIND_EMITTED_TOKEN: "emitted",
    pb.TARGET_KIND_EOS: "eos",
    pb.TARGET_KIND_TOKEN: "token",
    pb.TARGET_KIND_CONTRAST: "contrast",
}


def _target(t: pb.TraceRequest) -> TargetSpec:
    kind = TARGET_OF.get(t.target)
    if kind is None:
        known = ", ".join(pb.TargetKind.Name(k) for k in TARGET_OF)
        got = "TARGET_KIND_UNSPECIFIED" if t.target == pb.TARGET_KIND_UNSPECIFIED else str(t.target)
        raise InvalidInput(f"target must be one of {known}; got {got}")
    if kind == "token":
        return TargetSpec(kind, token_id=t.token_id)
    if kind == "contrast":
        if not t.HasField("contrast"):
            raise InvalidInput("target TARGET_KIND_CONTRAST needs contrast {token_id, contrast_token_id}")
        a, b = t.contrast.token_id, t.contrast.contrast_token_id
        if a == b:
            raise InvalidInput(f"contrast needs two different token ids, got {a} twice")
        return TargetSpec(kind, token_id=a, contrast_token_id=b)
    return TargetSpec(kind)


def trace_call(t: pb.TraceRequest) -> TraceCall:
    """The checked call of a TraceRequest (``InvalidInput`` says what to fix). Token ids are checked against
    the model's vocabulary later, by ``TraceService``; proto3 cannot tell an unset ``token_id`` from 0, so
    TARGET_KIND_TOKEN with no token_id traces token 0."""
    source = t.WhichOneof("source")
    if source is None:
        raise InvalidInput("set prompt (text to trace) or request_id (a stored request with token ids)")
    if source == "prompt" and not t.prompt.strip():
        raise InvalidInput("prompt is empty: give the text to trace")
    if source == "request_id" and not t.request_id:
        raise InvalidInput("request_id is empty: give a stored request's id")
    return TraceCall(
        target=_target(t),
        prompt=t.prompt if source == "prompt" else "",
        request_id=t.request_id if source == "request_id" else "",
        tenant=t.tenant,
        node_threshold=check_fraction("node_threshold", t.node_threshold),
        edge_threshold=check_fraction("edge_threshold", t.edge_threshold),
        max_feature_nodes=t.max_feature_nodes,
    )


def _node(n: NodeInfo) -> pb.GraphNodeSummary:
    return pb.GraphNodeSummary(
        node_id=node_id(n), layer=n.layer, position=n.pos, feature=n.feature, influence=n.influence
    )


def trace_result(o: TraceOutcome) -> pb.TraceResult:
    """The wire form of a worker's outcome."""
    return pb.TraceResult(
        graph_json=o.graph_json,
        replacement_score=o.replacement_score,
        completeness_score=o.completeness_score,
        summary=o.summary,
        top_error_nodes=[_node(n) for n in o.top_errors],
        top_features=[_node(n) for n in o.top_features],
        model=o.model,
        clt_id=o.clt_id,
    )
