"""Ingest messages → checked domain events (``events.py``), or ``Rejected`` saying what to fix.

Everything a plugin can get wrong is caught here, before the assembler is touched, so a bad message
never changes any request's state: empty messages, missing or over-long ids, unknown phases, layer ids
out of order or outside the configured transcoder, feature ids outside its feature count, packed byte
fields whose length is not a whole number of 4-byte values or whose id and value counts differ, too many
layers / features / heads, and NaN or infinite statistics. Checks are vectorized over the frame's layers
(a SmolLM2 frame has 30 layers × 32 features), so validation stays a few tens of microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from residue_monitor.detectors.capture import Phase
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.detectors.signature import LAYER_STAT_NAMES
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.errors import Rejected
from residue_monitor.service.server.events import End, Frame, Start
from residue_monitor.service.store.base import MAX_REQUEST_ID_LEN, check_tenant

R = pb.RejectReason
PHASE_OF: dict[int, Phase] = {
    pb.PHASE_PROMPT_LAST: "prompt_last",
    pb.PHASE_DECODE: "decode",
    pb.PHASE_FINAL: "final",
}
MAX_NAME_LEN = 256
_EMPTY_HEADS = np.zeros((0, 9))
_EMPTY_HEADS.flags.writeable = False  # shared by every frame without heads
_ITEMSIZE = {"<i4": 4, "<f4": 4}
_MALFORMED = R.REJECT_REASON_MALFORMED  # the enum wrapper's attribute lookup is slow on the hot path
_ALL_LAYERS = [np.arange(n, dtype="<i4").tobytes() for n in range(257)]
"""Packed layer ids 0..n-1 (every layer, in order: what the plugin sends) for n up to 256 layers."""


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a valid frame may contain; from the config and, when one is loaded, the transcoder."""

    n_layers: int = 256
    """Layer ids must be below this (the CLT's layer count, else ``max_layers``)."""
    n_features: int | None = None
    """Feature ids must be below this (the CLT's F); None: any id >= 0."""
    max_features_per_layer: int = 256
    max_heads: int = 4096
    clt_id: str = ""
    """When set, a RequestStart naming another transcoder is rejected (its ids would mean nothing here)."""

    @classmethod
    def from_config(cls, cfg: ServerConfig, clt: CrossLayerTranscoder | None = None) -> FrameLimits:
        if clt is None:
            return cls(cfg.max_layers, None, cfg.max_features_per_layer, cfg.max_heads)
        return cls(clt.n_layers, clt.cfg.n_features, cfg.max_features_per_layer, cfg.max_heads, clt.clt_id())


def _ts(msg: pb.RequestStart | pb.RequestEnd | pb.ResidueFrame, name: str) -> float | None:
    if not msg.HasField(name):  # type: ignore[arg-type]  # a Timestamp field name
        return None
    ts = getattr(msg, name)
    return ts.seconds + ts.nanos / 1e9


def _request_id(request_id: str, what: str) -> str:
    if not request_id:
        raise Rejected(R.REJECT_REASON_MISSING_REQUEST_ID, f"{what} has no request_id: set vLLM's request id")
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise Rejected(
            R.REJECT_REASON_MALFORMED,
            f"{what} request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_LEN}",
        )
    return request_id


def unbatched(msg: pb.IngestMessage) -> Sequence[pb.IngestMessage]:
    """The messages ``msg`` carries: an ``IngestBatch``'s, in order, else ``msg`` itself (how the sidecar,
    and every stand-in for it, reads a stream message; ``to_event`` rejects a batch inside a batch)."""
    return msg.batch.messages if msg.WhichOneof("kind") == "batch" else (msg,)


def to_event(msg: pb.IngestMessage, limits: FrameLimits) -> Start | Frame | End:
    """The checked event of one IngestMessage; ``Rejected`` (an ``InvalidInput``) when it is invalid."""
    kind = msg.WhichOneof("kind")
    if kind == "frame":
        return check_frame(msg.frame, limits)
    if kind == "start":
        return check_start(msg.start, limits)
    if kind == "end":
        return check_end(msg.end)
    if kind == "plugin_stats":
        raise Rejected(
            R.REJECT_REASON_MALFORMED, "PluginStats is not a request event (IngestPipeline reads it)"
        )
    if kind == "batch":
        raise Rejected(
            R.REJECT_REASON_MALFORMED,
            "an IngestBatch inside an IngestBatch: send its messages in the outer batch instead",
        )
    raise Rejected(
        R.REJECT_REASON_EMPTY_MESSAGE,
        "IngestMessage has no kind: set one of start, frame, end, plugin_stats, batch",
    )


def check_start(s: pb.RequestStart, limits: FrameLimits) -> Start:
    rid = _request_id(s.request_id, "RequestStart")
    where = f"RequestStart of request {rid!r}"
    try:
        check_tenant(s.tenant)
    except InvalidInput as e:
        raise Rejected(R.REJECT_REASON_MALFORMED, f"{where}: {e}") from e
    for name in ("model", "clt_id"):
        if len(getattr(s, name)) > MAX_NAME_LEN:
            raise Rejected(
                R.REJECT_REASON_MALFORMED, f"{where}: {name} is longer than {MAX_NAME_LEN} characters"
            )
    if limits.clt_id and s.clt_id and s.clt_id != limits.clt_id:
        raise Rejected(
            R.REJECT_REASON_MALFORMED,
            f"{where}: frames encoded with transcoder {s.clt_id!r}, but this sidecar checks against "
            f"{limits.clt_id!r}: point RESIDUE_CLT at the plugin's transcoder",
        )
    if s.prompt_token_ids and not s.token_ids_opted_in:
        raise Rejected(
            R.REJECT_REASON_MALFORMED,
            f"{where}: prompt_token_ids sent without token_ids_opted_in; token ids are only accepted from a "
            "deployment that opted in (DESIGN.md §8)",
        )
    if s.num_cached_tokens > s.prompt_tokens:
        raise Rejected(
            R.REJECT_REASON_MALFORMED,
            f"{where}: num_cached_tokens ({s.num_cached_tokens}) exceeds prompt_tokens ({s.prompt_tokens})",
        )
    return Start(
        request_id=rid,
        model=s.model,
        clt_id=s.clt_id,
        tenant=s.tenant,
        start_time=_ts(s, "start_time"),
        prompt_tokens=s.prompt_tokens,
        num_cached_tokens=s.num_cached_tokens,
        prompt_token_ids=tuple(s.prompt_token_ids),
        token_ids_opted_in=s.token_ids_opted_in,
    )


def check_end(e: pb.RequestEnd) -> End:
    rid = _request_id(e.request_id, "RequestEnd")
    if e.finish_reason not in pb.FinishReason.values():
        raise Rejected(
            R.REJECT_REASON_MALFORMED,
            f"RequestEnd of request {rid!r}: finish_reason {e.finish_reason} is not a FinishReason "
            f"({', '.join(pb.FinishReason.keys())})",
        )
    return End(
        request_id=rid,
        finish_reason=e.finish_reason,
        prompt_tokens=e.prompt_tokens,
        output_tokens=e.output_tokens,
        empty_output=e.empty_output,
        end_time=_ts(e, "end_time"),
    )


def check_frame(f: pb.ResidueFrame, limits: FrameLimits) -> Frame:
    rid = _request_id(f.request_id, "ResidueFrame")
    where = f"frame {f.sequence} of request {rid!r}"

    def bad(detail: str, reason: pb.RejectReason = _MALFORMED) -> Rejected:
        return Rejected(reason, f"{where}: {detail}")

    phase = PHASE_OF.get(f.phase)
    if phase is None:
        raise bad(f"phase {f.phase} is not PHASE_PROMPT_LAST, PHASE_DECODE or PHASE_FINAL")
    if f.HasField("packed"):
        if f.layers or f.heads:
            raise bad("set either layers/heads or packed, not both")
        layers, stats, counts, ids, vals, heads = _unpack(f.packed, limits, bad)
    else:
        layers, stats, counts, ids, vals = _read_layers(f, limits, bad)
        heads = _check_heads(f, limits, bad)
    layer_ids = layers.tolist()
    if layer_ids and layer_ids[-1] >= limits.n_layers:
        n_l = limits.n_layers
        raise bad(f"layer {layer_ids[-1]} is outside the transcoder's {n_l} layers (0..{n_l - 1})")
    lo, hi = stats.min(axis=0).tolist(), stats.max(axis=0).tolist()  # NaN and ±inf show up in these
    if not all(map(math.isfinite, lo + hi)):
        i, j = map(int, np.argwhere(~np.isfinite(stats))[0])
        name = LAYER_STAT_NAMES[j]
        raise bad(f"layer {layer_ids[i]} {name} is {stats[i, j]}: statistics must be finite numbers")
    if min(lo[0], lo[3], lo[4]) < 0:
        raise bad("error_ratio, in_norm and out_norm must be >= 0")
    if lo[5] < 0 or hi[5] > 1:
        raise bad(f"unreached must be a fraction in [0, 1], got {lo[5]}..{hi[5]}")
    if limits.n_features is not None and hi[1] > limits.n_features:
        raise bad(f"l0 {int(hi[1])} exceeds the transcoder's {limits.n_features} features")
    widest = int(counts.max())
    if widest > limits.max_features_per_layer:
        i = int(np.argmax(counts))
        raise bad(
            f"layer {layer_ids[i]} carries {widest} features; at most {limits.max_features_per_layer} "
            "(RESIDUE_MAX_FEATURES_PER_LAYER)",
            R.REJECT_REASON_TOO_LARGE,
        )
    offsets = np.empty(len(counts) + 1, dtype=np.int64)  # (L + 1,)
    offsets[0] = 0
    np.cumsum(counts, out=offsets[1:])
    if ids.size:
        top = limits.n_features
        if int(ids.min()) < 0 or (top is not None and int(ids.max()) >= top):
            out = (ids < 0) if top is None else ((ids < 0) | (ids >= top))
            k = int(np.argmax(out))
            layer = layer_ids[int(np.searchsorted(offsets, k, side="right")) - 1]
            allowed = ">= 0" if top is None else f"in 0..{top - 1} (the transcoder's n_features)"
            raise bad(f"layer {layer} feature id {ids[k]} is out of range: ids must be {allowed}")
        # A NaN or inf makes the sum non-finite; so can huge finite values (float32 overflow): then look.
        if not math.isfinite(float(vals.sum())) and not np.isfinite(vals).all():
            k = int(np.argmax(~np.isfinite(vals)))
            layer = layer_ids[int(np.searchsorted(offsets, k, side="right")) - 1]
            raise bad(f"layer {layer} feature value {vals[k]} is not finite")
    logits = None
    if f.HasField("logits"):
        lg = (f.logits.entropy, f.logits.top1_prob, f.logits.margin, f.logits.eos_prob)
        ent, top1, margin, eos = lg  # NaN fails every comparison below; inf fails the ones that bound it
        if not (0.0 <= ent < math.inf and 0.0 <= top1 <= 1.0 and 0.0 <= margin <= 1.0 and 0.0 <= eos <= 1.0):
            raise bad(f"logits {lg} invalid: entropy must be finite >= 0, probabilities in [0, 1]")
        logits = (float(lg[0]), float(lg[1]), float(lg[2]), float(lg[3]))
    for a in (layers, stats, offsets, ids, vals, heads):
        a.flags.writeable = False
    t = _ts(f, "captured_time")
    return Frame(rid, f.position, phase, f.sequence, layers, stats, offsets, ids, vals, heads, logits, t)


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _read_layers(f: pb.ResidueFrame, limits: FrameLimits, bad: Callable[..., Rejected]) -> Arrays:
    """(layer ids, (L, 6) stats, (L,) feature counts, (N,) ids, (N,) values) of repeated LayerResidue."""
    n = len(f.layers)
    if n == 0:
        raise bad("no layers: a frame carries one LayerResidue per transcoder layer (or packed)")
    if n > limits.n_layers:
        raise bad(f"{n} layers; the transcoder has {limits.n_layers}", R.REJECT_REASON_TOO_LARGE)
    # One pass over the repeated field (element access is the costly part), then whole-array checks.
    raw: list[tuple[float, float, float, float, float, float]] = []
    layer_ids: list[int] = []
    ids_b: list[bytes] = []
    vals_b: list[bytes] = []
    prev = -1
    for x in f.layers:
        if x.layer <= prev:
            order = [y.layer for y in f.layers]
            raise bad(f"layers {order} are not strictly increasing: send each layer once, in order")
        prev = x.layer
        layer_ids.append(prev)
        raw.append((x.error_ratio, x.l0, x.mass, x.in_norm, x.out_norm, x.unreached))
        ids_b.append(x.feature_ids)
        vals_b.append(x.feature_values)
    n_ids = [len(a) for a in ids_b]
    n_vals = [len(b) for b in vals_b]
    if n_ids != n_vals or any(c & 3 for c in n_ids) or any(c & 3 for c in n_vals):
        for i, (a, b) in enumerate(zip(n_ids, n_vals, strict=True)):
            if a % 4 or b % 4:
                raise bad(
                    f"layer {layer_ids[i]} packs {a} id bytes and {b} value bytes; each must be a multiple "
                    "of 4 (little-endian int32 ids, float32 values)"
                )
            if a != b:
                raise bad(f"layer {layer_ids[i]} has {a // 4} feature ids but {b // 4} values")
    ids = np.frombuffer(b"".join(ids_b), dtype="<i4")  # (N,)
    vals = np.frombuffer(b"".join(vals_b), dtype="<f4")  # (N,)
    counts = np.array(n_ids, dtype=np.int64) // 4
    return np.array(layer_ids, dtype=np.int32), np.array(raw), counts, ids, vals


def _array(data: bytes, dtype: str, width: int, name: str, bad: Callable[..., Rejected]) -> np.ndarray:
    size = _ITEMSIZE[dtype] * width
    if len(data) % size:
        raise bad(f"packed.{name} has {len(data)} bytes, not a multiple of {size} ({width} × {dtype})")
    a = np.frombuffer(data, dtype=dtype)
    return a.reshape(-1, width) if width > 1 else a


def _unpack(
    p: pb.PackedResidue, limits: FrameLimits, bad: Callable[..., Rejected]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The PackedResidue arrays, shape-checked: (layer ids, stats, counts, ids, values, heads)."""
    layers = _array(p.layer_ids, "<i4", 1, "layer_ids", bad)
    n = layers.shape[0]
    if n == 0:
        raise bad("packed.layer_ids is empty: a frame carries every transcoder layer")
    if n > limits.n_layers:
        raise bad(f"{n} layers; the transcoder has {limits.n_layers}", R.REJECT_REASON_TOO_LARGE)
    if (n >= len(_ALL_LAYERS) or p.layer_ids != _ALL_LAYERS[n]) and (
        int(layers[0]) < 0 or (n > 1 and bool((layers[1:] <= layers[:-1]).any()))
    ):
        raise bad(f"packed.layer_ids {layers.tolist()} must be >= 0 and strictly increasing")
    counts = _array(p.feature_counts, "<i4", 1, "feature_counts", bad).astype(np.int64)
    stats = _array(p.layer_stats, "<f4", len(LAYER_STAT_NAMES), "layer_stats", bad).astype(np.float64)
    if counts.shape[0] != n or stats.shape[0] != n:
        raise bad(
            f"packed: {n} layer ids but {counts.shape[0]} feature counts and {stats.shape[0]} stat rows"
        )
    if int(counts.min()) < 0:
        raise bad("packed.feature_counts must be >= 0")
    ids = _array(p.feature_ids, "<i4", 1, "feature_ids", bad)
    vals = _array(p.feature_values, "<f4", 1, "feature_values", bad)
    total = int(counts.sum())
    if ids.shape[0] != total or vals.shape[0] != total:
        n_i, n_v = ids.shape[0], vals.shape[0]
        raise bad(f"packed: feature_counts sum to {total} but there are {n_i} ids and {n_v} values")
    heads = _EMPTY_HEADS
    if p.head_stats:
        heads = _array(p.head_stats, "<f4", 9, "head_stats", bad).astype(np.float64)
        if heads.shape[0] > limits.max_heads:
            raise bad(
                f"{heads.shape[0]} head entries; at most {limits.max_heads} (RESIDUE_MAX_HEADS)",
                R.REJECT_REASON_TOO_LARGE,
            )
        _check_head_values(heads, limits, bad)
    return layers, stats, counts, ids, vals, heads


def _check_heads(f: pb.ResidueFrame, limits: FrameLimits, bad: Callable[..., Rejected]) -> np.ndarray:
    """(H, 9) head statistics (see ``Frame.head_stats``), checked."""
    if not f.heads:
        return _EMPTY_HEADS
    if len(f.heads) > limits.max_heads:
        raise bad(
            f"{len(f.heads)} head entries; at most {limits.max_heads} (RESIDUE_MAX_HEADS)",
            R.REJECT_REASON_TOO_LARGE,
        )
    h = np.array(
        [
            (x.layer, x.head, x.entropy, x.self_frac, x.local_frac, x.sink_frac,
             x.top_span_start, x.top_span_len, x.top_span_mass)
            for x in f.heads
        ]
    )  # fmt: skip
    _check_head_values(h, limits, bad)
    return h


def _check_head_values(h: np.ndarray, limits: FrameLimits, bad: Callable[..., Rejected]) -> None:
    """(H, 9) head statistics: finite, layers in range, entropy >= 0, fractions in [0, 1]."""
    lo, hi = h.min(axis=0).tolist(), h.max(axis=0).tolist()  # NaN and ±inf show up in these
    if not all(map(math.isfinite, lo + hi)):
        raise bad("a HeadStats value is not finite")
    if hi[0] >= limits.n_layers:
        raise bad(f"a HeadStats layer ({int(hi[0])}) is outside the transcoder's {limits.n_layers} layers")
    if hi[1] >= limits.max_heads:
        raise bad(
            f"a HeadStats head index ({int(hi[1])}) is not below {limits.max_heads} (RESIDUE_MAX_HEADS)"
        )
    whole = h[:, [0, 1, 6, 7]]  # layer, head, span start, span len: counts, sent as floats when packed
    if lo[0] < 0 or lo[1] < 0 or lo[6] < 0 or lo[7] < 0 or bool((whole != np.floor(whole)).any()):
        raise bad("HeadStats: layer, head, top_span_start and top_span_len must be whole numbers >= 0")
    fractions = (3, 4, 5, 8)  # self, local, sink, span mass
    if lo[2] < 0 or min(lo[i] for i in fractions) < 0 or max(hi[i] for i in fractions) > 1:
        raise bad("HeadStats: entropy must be >= 0 and the fractions and span mass in [0, 1]")
