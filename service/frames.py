"""A ``ResidueSignature`` as wire messages: one ``ResidueFrame`` per sampled row, between start and end.

The vLLM plugin uses the packing helpers (``layer_residues``, ``logit_stats``, ``head_stats``,
``frame_message``) on the rows it signed; ``signature_messages`` turns a whole signature into a request's
``IngestMessage``s, and ``request_messages`` runs an HF model and a transcoder on one prompt the way the
plugin would (tests, benchmarks, the dashboard check). The sidecar rebuilds the same signature from
the frames (``service/server/residue.py``). Packing follows the proto: ids little-endian int32, values
little-endian float32, no header.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from residue_monitor.detectors.capture import Phase
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.request import GenerationConfig, analyze_prompt
from residue_monitor.detectors.signature import ResidueSignature, RowSignature, SignatureBuilder
from residue_monitor.service._proto import residue_pb2 as pb

PHASE_PROTO: dict[Phase, pb.Phase] = {
    "prompt_last": pb.PHASE_PROMPT_LAST,
    "decode": pb.PHASE_DECODE,
    "final": pb.PHASE_FINAL,
}


def pack_ids(ids: npt.ArrayLike) -> bytes:
    """Feature ids → little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


def pack_values(values: npt.ArrayLike) -> bytes:
    """Activations → little-endian float32 bytes."""
    return np.asarray(values, dtype="<f4").tobytes()


def layer_residues(row: RowSignature) -> list[pb.LayerResidue]:
    """One LayerResidue per layer of a signature row; only active (value > 0) features are sent."""
    out = []
    for layer in range(row.n_layers):
        active = row.feature_values[layer] > 0
        err, l0, mass, in_norm, out_norm, unreached = row.layer_stats[layer].tolist()
        out.append(
            pb.LayerResidue(
                layer=layer,
                feature_ids=pack_ids(row.feature_ids[layer][active]),
                feature_values=pack_values(row.feature_values[layer][active]),
                l0=int(l0),
                mass=mass,
                error_ratio=err,
                in_norm=in_norm,
                out_norm=out_norm,
                unreached=unreached,
            )
        )
    return out


def logit_stats(row: RowSignature, top1_token: int | None = None) -> pb.LogitStats | None:
    """The row's next-token statistics (None when they were not captured); the token id only on opt-in."""
    if not np.isfinite(row.logits).all():
        return None
    ent, top1, margin, eos = row.logits.tolist()
    out = pb.LogitStats(entropy=ent, top1_prob=top1, margin=margin, eos_prob=eos)
    if top1_token is not None:
        out.top1_token = top1_token
    return out


def head_stats(row: RowSignature) -> list[pb.HeadStats]:
    """Per-(layer, head) attention summaries of a signature row."""
    out = []
    for layer in range(row.heads.shape[0]):
        for h in range(row.heads.shape[1]):
            ent, self_f, local, sink, start, span, mass = row.heads[layer, h].tolist()
            out.append(
                pb.HeadStats(
                    layer=layer, head=h, entropy=ent, self_frac=self_f, local_frac=local, sink_frac=sink,
                    top_span_start=int(start), top_span_len=int(span), top_span_mass=mass,
                )
            )  # fmt: skip
    return out


def packed_residue(row: RowSignature) -> pb.PackedResidue:
    """A signature row's layers and heads as one PackedResidue (only active features are sent)."""
    active = row.feature_values > 0  # (L, k)
    L, H = row.n_layers, row.heads.shape[1]
    heads = np.empty((L, H, 9), dtype="<f4")
    heads[..., 0] = np.arange(L)[:, None]
    heads[..., 1] = np.arange(H)[None, :]
    heads[..., 2:] = row.heads
    return pb.PackedResidue(
        layer_ids=np.arange(L, dtype="<i4").tobytes(),
        feature_counts=active.sum(-1).astype("<i4").tobytes(),
        feature_ids=pack_ids(row.feature_ids[active]),  # row-major: layer order, strongest first
        feature_values=pack_values(row.feature_values[active]),
        layer_stats=np.ascontiguousarray(row.layer_stats, dtype="<f4").tobytes(),
        head_stats=heads.reshape(-1, 9).tobytes() if H else b"",
    )


def frame_message(
    request_id: str,
    position: int,
    phase: Phase,
    sequence: int,
    layers: Sequence[pb.LayerResidue] | pb.PackedResidue,
    logits: pb.LogitStats | None = None,
    heads: Sequence[pb.HeadStats] = (),
    captured_time: float | None = None,
) -> pb.IngestMessage:
    """An IngestMessage carrying one ResidueFrame: per-layer messages, or one PackedResidue;
    ``captured_time``: Unix seconds the row was captured (the plugin sets it)."""
    f = pb.ResidueFrame(request_id=request_id, position=position, phase=PHASE_PROTO[phase], sequence=sequence)
    if captured_time is not None:
        f.captured_time.FromNanoseconds(round(captured_time * 1e9))
    if isinstance(layers, pb.PackedResidue):
        f.packed.CopyFrom(layers)
    else:
        f.layers.extend(layers)
        f.heads.extend(heads)
    if logits is not None:
        f.logits.CopyFrom(logits)
    return pb.IngestMessage(frame=f)


def signature_messages(
    sig: ResidueSignature,
    request_id: str,
    *,
    tenant: str = "",
    start_time: float | None = None,
    end_time: float | None = None,
    packed: bool = True,
) -> list[pb.IngestMessage]:
    """A signature as the IngestMessages of one request, in order: start, one frame per row, end.
    ``packed``: frames carry a PackedResidue (what the plugin sends) rather than per-layer messages."""
    start = pb.RequestStart(request_id=request_id, model=sig.model, clt_id=sig.clt_id, tenant=tenant,
                            prompt_tokens=sig.prompt_tokens)  # fmt: skip
    if start_time is not None:
        start.start_time.FromNanoseconds(round(start_time * 1e9))
    msgs = [pb.IngestMessage(start=start)]
    for i, row in enumerate(sig.rows):
        if packed:
            msgs.append(
                frame_message(request_id, row.position, row.phase, i, packed_residue(row), logit_stats(row))
            )
        else:
            msgs.append(frame_message(request_id, row.position, row.phase, i, layer_residues(row),
                                      logit_stats(row), head_stats(row)))  # fmt: skip
    end = pb.RequestEnd(
        request_id=request_id,
        finish_reason=pb.FINISH_REASON_STOP if sig.stopped else pb.FINISH_REASON_LENGTH,
        prompt_tokens=sig.prompt_tokens,
        output_tokens=sig.output_tokens,
        empty_output=sig.empty_output,
    )
    if end_time is not None:
        end.end_time.FromNanoseconds(round(end_time * 1e9))
        if start_time is not None:
            end.e2e_latency.FromNanoseconds(round((end_time - start_time) * 1e9))
    msgs.append(pb.IngestMessage(end=end))
    return msgs


def request_messages(
    model: Any,
    tok: Any,
    clt: CrossLayerTranscoder,
    prompt: str,
    request_id: str,
    *,
    model_name: str = "tiny",
    tenant: str = "",
    max_new_tokens: int = 12,
    decode_every: int = 4,
    k: int = 32,
    heads: bool = True,
    packed: bool = True,
) -> list[pb.IngestMessage]:
    """Generate greedily from ``prompt`` with an HF causal LM, read its signature on the reference path
    (``detectors.request``) and return the request's IngestMessages, as the plugin would send them."""
    t_start = time.time()
    builder = SignatureBuilder.for_model(model, clt, k=k, model=model_name, with_heads=heads)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, decode_every=decode_every)
    analysis = analyze_prompt(model, tok, builder, prompt, gen)
    return signature_messages(
        analysis.signature, request_id, tenant=tenant, start_time=t_start, end_time=time.time(), packed=packed
    )
