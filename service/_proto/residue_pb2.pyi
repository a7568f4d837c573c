import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PROMPT_LAST: _ClassVar[Phase]
    PHASE_DECODE: _ClassVar[Phase]
    PHASE_FINAL: _ClassVar[Phase]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_MISSING_REQUEST_ID: _ClassVar[RejectReason]
    REJECT_REASON_UNKNOWN_REQUEST: _ClassVar[RejectReason]
    REJECT_REASON_MALFORMED: _ClassVar[RejectReason]
    REJECT_REASON_TOO_LARGE: _ClassVar[RejectReason]
    REJECT_REASON_EMPTY_MESSAGE: _ClassVar[RejectReason]

class TargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_KIND_UNSPECIFIED: _ClassVar[TargetKind]
    TARGET_KIND_EMITTED_TOKEN: _ClassVar[TargetKind]
    TARGET_KIND_EOS: _ClassVar[TargetKind]
    TARGET_KIND_TOKEN: _ClassVar[TargetKind]
    TARGET_KIND_CONTRAST: _ClassVar[TargetKind]
PHASE_UNSPECIFIED: Phase
PHASE_PROMPT_LAST: Phase
PHASE_DECODE: Phase
PHASE_FINAL: Phase
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_MISSING_REQUEST_ID: RejectReason
REJECT_REASON_UNKNOWN_REQUEST: RejectReason
REJECT_REASON_MALFORMED: RejectReason
REJECT_REASON_TOO_LARGE: RejectReason
REJECT_REASON_EMPTY_MESSAGE: RejectReason
TARGET_KIND_UNSPECIFIED: TargetKind
TARGET_KIND_EMITTED_TOKEN: TargetKind
TARGET_KIND_EOS: TargetKind
TARGET_KIND_TOKEN: TargetKind
TARGET_KIND_CONTRAST: TargetKind

class IngestMessage(_message.Message):
    __slots__ = ("start", "frame", "end", "plugin_stats", "batch")
    START_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_STATS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    start: RequestStart
    frame: ResidueFrame
    end: RequestEnd
    plugin_stats: PluginStats
    batch: IngestBatch
    def __init__(self, start: _Optional[_Union[RequestStart, _Mapping]] = ..., frame: _Optional[_Union[ResidueFrame, _Mapping]] = ..., end: _Optional[_Union[RequestEnd, _Mapping]] = ..., plugin_stats: _Optional[_Union[PluginStats, _Mapping]] = ..., batch: _Optional[_Union[IngestBatch, _Mapping]] = ...) -> None: ...

class IngestBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[IngestMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[IngestMessage, _Mapping]]] = ...) -> None: ...

class PluginStats(_message.Message):
    __slots__ = ("instance_id", "queue_full", "hook_errors", "send_errors", "capture_seconds", "captured_steps")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FULL_FIELD_NUMBER: _ClassVar[int]
    HOOK_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SEND_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_STEPS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    queue_full: int
    hook_errors: int
    send_errors: int
    capture_seconds: float
    captured_steps: int
    def __init__(self, instance_id: _Optional[str] = ..., queue_full: _Optional[int] = ..., hook_errors: _Optional[int] = ..., send_errors: _Optional[int] = ..., capture_seconds: _Optional[float] = ..., captured_steps: _Optional[int] = ...) -> None: ...

class RequestStart(_message.Message):
    __slots__ = ("request_id", "model", "clt_id", "start_time", "prompt_tokens", "num_cached_tokens", "prompt_token_ids", "token_ids_opted_in", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLT_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_OPTED_IN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    clt_id: str
    start_time: _timestamp_pb2.Timestamp
    prompt_tokens: int
    num_cached_tokens: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_opted_in: bool
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., clt_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., token_ids_opted_in: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class ResidueFrame(_message.Message):
    __slots__ = ("request_id", "position", "phase", "sequence", "layers", "heads", "logits", "packed", "captured_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    phase: Phase
    sequence: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerResidue]
    heads: _containers.RepeatedCompositeFieldContainer[HeadStats]
    logits: LogitStats
    packed: PackedResidue
    captured_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., sequence: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerResidue, _Mapping]]] = ..., heads: _Optional[_Iterable[_Union[HeadStats, _Mapping]]] = ..., logits: _Optional[_Union[LogitStats, _Mapping]] = ..., packed: _Optional[_Union[PackedResidue, _Mapping]] = ..., captured_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PackedResidue(_message.Message):
    __slots__ = ("layer_ids", "feature_counts", "feature_ids", "feature_values", "layer_stats", "head_stats")
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VALUES_FIELD_NUMBER: _ClassVar[int]
    LAYER_STATS_FIELD_NUMBER: _ClassVar[int]
    HEAD_STATS_FIELD_NUMBER: _ClassVar[int]
    layer_ids: bytes
    feature_counts: bytes
    feature_ids: bytes
    feature_values: bytes
    layer_stats: bytes
    head_stats: bytes
    def __init__(self, layer_ids: _Optional[bytes] = ..., feature_counts: _Optional[bytes] = ..., feature_ids: _Optional[bytes] = ..., feature_values: _Optional[bytes] = ..., layer_stats: _Optional[bytes] = ..., head_stats: _Optional[bytes] = ...) -> None: ...

class LayerResidue(_message.Message):
    __slots__ = ("layer", "feature_ids", "feature_values", "l0", "mass", "error_ratio", "in_norm", "out_norm", "unreached")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VALUES_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    MASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATIO_FIELD_NUMBER: _ClassVar[int]
    IN_NORM_FIELD_NUMBER: _ClassVar[int]
    OUT_NORM_FIELD_NUMBER: _ClassVar[int]
    UNREACHED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature_ids: bytes
    feature_values: bytes
    l0: int
    mass: float
    error_ratio: float
    in_norm: float
    out_norm: float
    unreached: float
    def __init__(self, layer: _Optional[int] = ..., feature_ids: _Optional[bytes] = ..., feature_values: _Optional[bytes] = ..., l0: _Optional[int] = ..., mass: _Optional[float] = ..., error_ratio: _Optional[float] = ..., in_norm: _Optional[float] = ..., out_norm: _Optional[float] = ..., unreached: _Optional[float] = ...) -> None: ...

class HeadStats(_message.Message):
    __slots__ = ("layer", "head", "entropy", "self_frac", "local_frac", "sink_frac", "top_span_start", "top_span_len", "top_span_mass")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    SELF_FRAC_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FRAC_FIELD_NUMBER: _ClassVar[int]
    SINK_FRAC_FIELD_NUMBER: _ClassVar[int]
    TOP_SPAN_START_FIELD_NUMBER: _ClassVar[int]
    TOP_SPAN_LEN_FIELD_NUMBER: _ClassVar[int]
    TOP_SPAN_MASS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    entropy: float
    self_frac: float
    local_frac: float
    sink_frac: float
    top_span_start: int
    top_span_len: int
    top_span_mass: float
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., entropy: _Optional[float] = ..., self_frac: _Optional[float] = ..., local_frac: _Optional[float] = ..., sink_frac: _Optional[float] = ..., top_span_start: _Optional[int] = ..., top_span_len: _Optional[int] = ..., top_span_mass: _Optional[float] = ...) -> None: ...

class LogitStats(_message.Message):
    __slots__ = ("entropy", "top1_prob", "margin", "eos_prob", "top1_token")
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    TOP1_PROB_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    EOS_PROB_FIELD_NUMBER: _ClassVar[int]
    TOP1_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entropy: float
    top1_prob: float
    margin: float
    eos_prob: float
    top1_token: int
    def __init__(self, entropy: _Optional[float] = ..., top1_prob: _Optional[float] = ..., margin: _Optional[float] = ..., eos_prob: _Optional[float] = ..., top1_token: _Optional[int] = ...) -> None: ...

class RequestEnd(_message.Message):
    __slots__ = ("request_id", "finish_reason", "prompt_tokens", "output_tokens", "empty_output", "end_time", "queue_time", "time_to_first_token", "e2e_latency")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EMPTY_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    E2E_LATENCY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    output_tokens: int
    empty_output: bool
    end_time: _timestamp_pb2.Timestamp
    queue_time: _duration_pb2.Duration
    time_to_first_token: _duration_pb2.Duration
    e2e_latency: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., empty_output: _Optional[bool] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queue_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., e2e_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RejectCount(_message.Message):
    __slots__ = ("reason", "count", "first_detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: RejectReason
    count: int
    first_detail: str
    def __init__(self, reason: _Optional[_Union[RejectReason, str]] = ..., count: _Optional[int] = ..., first_detail: _Optional[str] = ...) -> None: ...

class IngestSummary(_message.Message):
    __slots__ = ("requests_started", "frames_accepted", "frames_duplicate", "requests_ended", "rejected", "rejected_by_reason")
    REQUESTS_STARTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ENDED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    requests_started: int
    frames_accepted: int
    frames_duplicate: int
    requests_ended: int
    rejected: int
    rejected_by_reason: _containers.RepeatedCompositeFieldContainer[RejectCount]
    def __init__(self, requests_started: _Optional[int] = ..., frames_accepted: _Optional[int] = ..., frames_duplicate: _Optional[int] = ..., requests_ended: _Optional[int] = ..., rejected: _Optional[int] = ..., rejected_by_reason: _Optional[_Iterable[_Union[RejectCount, _Mapping]]] = ...) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("layer", "mean_error_ratio", "mean_l0", "mean_mass")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MEAN_ERROR_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEAN_L0_FIELD_NUMBER: _ClassVar[int]
    MEAN_MASS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    mean_error_ratio: float
    mean_l0: float
    mean_mass: float
    def __init__(self, layer: _Optional[int] = ..., mean_error_ratio: _Optional[float] = ..., mean_l0: _Optional[float] = ..., mean_mass: _Optional[float] = ...) -> None: ...

class SignatureSummary(_message.Message):
    __slots__ = ("layers", "frame_count")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSummary]
    frame_count: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerSummary, _Mapping]]] = ..., frame_count: _Optional[int] = ...) -> None: ...

class FingerprintMatch(_message.Message):
    __slots__ = ("fingerprint", "score", "threshold", "matched")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    score: float
    threshold: float
    matched: bool
    def __init__(self, fingerprint: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., matched: _Optional[bool] = ...) -> None: ...

class PrefillForecast(_message.Message):
    __slots__ = ("score", "unavailable_reason")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    score: ForecastScore
    unavailable_reason: str
    def __init__(self, score: _Optional[_Union[ForecastScore, _Mapping]] = ..., unavailable_reason: _Optional[str] = ...) -> None: ...

class ForecastScore(_message.Message):
    __slots__ = ("probability", "threshold", "flagged", "forecast_id", "prefill_time", "scored_time")
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    FORECAST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIME_FIELD_NUMBER: _ClassVar[int]
    SCORED_TIME_FIELD_NUMBER: _ClassVar[int]
    probability: float
    threshold: float
    flagged: bool
    forecast_id: str
    prefill_time: _timestamp_pb2.Timestamp
    scored_time: _timestamp_pb2.Timestamp
    def __init__(self, probability: _Optional[float] = ..., threshold: _Optional[float] = ..., flagged: _Optional[bool] = ..., forecast_id: _Optional[str] = ..., prefill_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scored_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ResidueRecord(_message.Message):
    __slots__ = ("request_id", "model", "clt_id", "tenant", "start_time", "end_time", "signature", "detector_scores", "fingerprint_matches", "flags", "prefill_forecast", "finish_reason", "prompt_tokens", "output_tokens", "num_cached_tokens", "empty_output", "complete", "prompt_token_ids", "incomplete_reason", "prefill_signature", "frames_over_limit", "frames_duplicate")
    class DetectorScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SCORES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_MATCHES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FORECAST_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EMPTY_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    clt_id: str
    tenant: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    signature: SignatureSummary
    detector_scores: _containers.ScalarMap[str, float]
    fingerprint_matches: _containers.RepeatedCompositeFieldContainer[FingerprintMatch]
    flags: _containers.RepeatedScalarFieldContainer[str]
    prefill_forecast: PrefillForecast
    finish_reason: FinishReason
    prompt_tokens: int
    output_tokens: int
    num_cached_tokens: int
    empty_output: bool
    complete: bool
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    incomplete_reason: str
    prefill_signature: SignatureSummary
    frames_over_limit: int
    frames_duplicate: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., clt_id: _Optional[str] = ..., tenant: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signature: _Optional[_Union[SignatureSummary, _Mapping]] = ..., detector_scores: _Optional[_Mapping[str, float]] = ..., fingerprint_matches: _Optional[_Iterable[_Union[FingerprintMatch, _Mapping]]] = ..., flags: _Optional[_Iterable[str]] = ..., prefill_forecast: _Optional[_Union[PrefillForecast, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., empty_output: _Optional[bool] = ..., complete: _Optional[bool] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., incomplete_reason: _Optional[str] = ..., prefill_signature: _Optional[_Union[SignatureSummary, _Mapping]] = ..., frames_over_limit: _Optional[int] = ..., frames_duplicate: _Optional[int] = ...) -> None: ...

class GetResidueRequest(_message.Message):
    __slots__ = ("request_id", "tenant", "wait_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    wait_ms: int
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class QueryResiduesRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "model", "fingerprint", "min_score", "flagged_only", "page_size", "page_token", "tenant")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    model: str
    fingerprint: str
    min_score: float
    flagged_only: bool
    page_size: int
    page_token: str
    tenant: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., min_score: _Optional[float] = ..., flagged_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class QueryResiduesResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ResidueRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[ResidueRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchFlagsRequest(_message.Message):
    __slots__ = ("tenant", "model", "fingerprint", "after_event_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    fingerprint: str
    after_event_id: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., after_event_id: _Optional[str] = ...) -> None: ...

class FlagEvent(_message.Message):
    __slots__ = ("event_id", "time", "request_id", "model", "tenant", "flag", "fingerprint", "score", "threshold", "clt_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    request_id: str
    model: str
    tenant: str
    flag: str
    fingerprint: str
    score: float
    threshold: float
    clt_id: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., flag: _Optional[str] = ..., fingerprint: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., clt_id: _Optional[str] = ...) -> None: ...

class ListFingerprintsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Fingerprint(_message.Message):
    __slots__ = ("name", "version", "model", "clt_id", "threshold", "target_fpr", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLT_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    model: str
    clt_id: str
    threshold: float
    target_fpr: float
    description: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., model: _Optional[str] = ..., clt_id: _Optional[str] = ..., threshold: _Optional[float] = ..., target_fpr: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class ListFingerprintsResponse(_message.Message):
    __slots__ = ("fingerprints",)
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    fingerprints: _containers.RepeatedCompositeFieldContainer[Fingerprint]
    def __init__(self, fingerprints: _Optional[_Iterable[_Union[Fingerprint, _Mapping]]] = ...) -> None: ...

class ContrastPair(_message.Message):
    __slots__ = ("token_id", "contrast_token_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    contrast_token_id: int
    def __init__(self, token_id: _Optional[int] = ..., contrast_token_id: _Optional[int] = ...) -> None: ...

class TraceRequest(_message.Message):
    __slots__ = ("prompt", "request_id", "tenant", "target", "token_id", "contrast", "node_threshold", "edge_threshold", "max_feature_nodes")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_FIELD_NUMBER: _ClassVar[int]
    NODE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EDGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_FEATURE_NODES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    request_id: str
    tenant: str
    target: TargetKind
    token_id: int
    contrast: ContrastPair
    node_threshold: float
    edge_threshold: float
    max_feature_nodes: int
    def __init__(self, prompt: _Optional[str] = ..., request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., target: _Optional[_Union[TargetKind, str]] = ..., token_id: _Optional[int] = ..., contrast: _Optional[_Union[ContrastPair, _Mapping]] = ..., node_threshold: _Optional[float] = ..., edge_threshold: _Optional[float] = ..., max_feature_nodes: _Optional[int] = ...) -> None: ...

class GraphNodeSummary(_message.Message):
    __slots__ = ("node_id", "layer", "position", "feature", "influence")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    layer: int
    position: int
    feature: int
    influence: float
    def __init__(self, node_id: _Optional[str] = ..., layer: _Optional[int] = ..., position: _Optional[int] = ..., feature: _Optional[int] = ..., influence: _Optional[float] = ...) -> None: ...

class TraceResult(_message.Message):
    __slots__ = ("graph_json", "replacement_score", "completeness_score", "summary", "top_error_nodes", "top_features", "model", "clt_id")
    GRAPH_JSON_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_SCORE_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_SCORE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TOP_ERROR_NODES_FIELD_NUMBER: _ClassVar[int]
    TOP_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLT_ID_FIELD_NUMBER: _ClassVar[int]
    graph_json: str
    replacement_score: float
    completeness_score: float
    summary: str
    top_error_nodes: _containers.RepeatedCompositeFieldContainer[GraphNodeSummary]
    top_features: _containers.RepeatedCompositeFieldContainer[GraphNodeSummary]
    model: str
    clt_id: str
    def __init__(self, graph_json: _Optional[str] = ..., replacement_score: _Optional[float] = ..., completeness_score: _Optional[float] = ..., summary: _Optional[str] = ..., top_error_nodes: _Optional[_Iterable[_Union[GraphNodeSummary, _Mapping]]] = ..., top_features: _Optional[_Iterable[_Union[GraphNodeSummary, _Mapping]]] = ..., model: _Optional[str] = ..., clt_id: _Optional[str] = ...) -> None: ...
