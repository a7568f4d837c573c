"""Build the wire messages of residue capture: ``RowCodes`` + logits + attention → ``ResidueFrame``s.

The vLLM plugin uses the packing helpers (``layer_residues``, ``logit_stats``, ``head_stats``,
``frame_message``) on the rows it sampled; tests and benchmarks use ``request_messages``, which runs an HF
model and a transcoder on one prompt the way the plugin would and returns a whole request's
``IngestMessage``s (start, PROMPT_LAST, sampled DECODE rows, FINAL, end). Packing follows the proto:
ids little-endian int32, values little-endian float32, no header.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from residue_monitor.detectors.clt.activations import mlp_hooks
from residue_monitor.detectors.clt.encode import RowCodes, encode_rows
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.service._proto import residue_pb2 as pb

Phase = Literal["prompt_last", "decode", "final"]
PHASE_PROTO: dict[Phase, pb.Phase] = {
    "prompt_last": pb.PHASE_PROMPT_LAST,
    "decode": pb.PHASE_DECODE,
    "final": pb.PHASE_FINAL,
}
LOCAL_WINDOW = 8
"""Keys before the query that count as 'local' attention."""
SPAN_LEN = 4
"""Length of the attention span whose mass ``top_span_*`` reports."""


def pack_ids(ids: npt.ArrayLike) -> bytes:
    """Feature ids → little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


def pack_values(values: npt.ArrayLike) -> bytes:
    """Activations → little-endian float32 bytes."""
    return np.asarray(values, dtype="<f4").tobytes()


def layer_residues(codes: RowCodes, row: int) -> list[pb.LayerResidue]:
    """One LayerResidue per layer for row ``row`` of ``codes``; only active (value > 0) features are sent."""
    ids = codes.ids[:, row].cpu().numpy()  # (L, k)
    vals = codes.values[:, row].float().cpu().numpy()  # (L, k)
    stats = torch.stack(
        [codes.l0[:, row].float(), codes.mass[:, row], codes.error_ratio[:, row], codes.in_norm[:, row],
         codes.out_norm[:, row]]
    ).cpu().numpy()  # (5, L)  # fmt: skip
    out = []
    for layer in range(ids.shape[0]):
        active = vals[layer] > 0
        l0, mass, err, in_norm, out_norm = stats[:, layer].tolist()
        out.append(
            pb.LayerResidue(
                layer=layer,
                feature_ids=pack_ids(ids[layer][active]),
                feature_values=pack_values(vals[layer][active]),
                l0=int(l0),
                mass=mass,
                error_ratio=err,
                in_norm=in_norm,
                out_norm=out_norm,
            )
        )
    return out


def logit_stats(logits: torch.Tensor, eos_id: int | None, with_token: bool = False) -> pb.LogitStats:
    """Summary of one position's next-token distribution; ``logits`` (V,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top = p.topk(2)
    out = pb.LogitStats(
        entropy=float(-(p * logp).sum()),
        top1_prob=float(top.values[0]),
        margin=float(top.values[0] - top.values[1]),
        eos_prob=float(p[eos_id]) if eos_id is not None else 0.0,
    )
    if with_token:
        out.top1_token = int(top.indices[0])
    return out


def head_stats(attn: torch.Tensor, layer: int, query: int) -> list[pb.HeadStats]:
    """Per-head summaries of one query row; ``attn`` (n_heads, T_q, T_k) attention probabilities."""
    rows = attn[:, query, : query + 1].float()  # (H, q+1): causal, keys 0..query
    out = []
    for h, a in enumerate(rows):
        ent = float(-(a * a.clamp_min(1e-30).log()).sum())
        span = min(SPAN_LEN, a.shape[0])
        sums = a.unfold(0, span, 1).sum(-1)  # (q+2-span,) mass of each span
        start = int(sums.argmax())
        out.append(
            pb.HeadStats(
                layer=layer,
                head=h,
                entropy=max(ent, 0.0),
                self_frac=float(a[query]),
                local_frac=float(a[max(0, query - LOCAL_WINDOW) : query].sum()),
                sink_frac=float(a[0]),
                top_span_start=start,
                top_span_len=span,
                top_span_mass=min(float(sums[start]), 1.0),
            )
        )
    return out


def frame_message(
    request_id: str,
    position: int,
    phase: Phase,
    sequence: int,
    layers: Sequence[pb.LayerResidue],
    logits: pb.LogitStats | None = None,
    heads: Sequence[pb.HeadStats] = (),
) -> pb.IngestMessage:
    """An IngestMessage carrying one ResidueFrame."""
    f = pb.ResidueFrame(
        request_id=request_id, position=position, phase=PHASE_PROTO[phase], sequence=sequence, layers=layers
    )
    f.heads.extend(heads)
    if logits is not None:
        f.logits.CopyFrom(logits)
    return pb.IngestMessage(frame=f)


def sampled_rows(prompt_len: int, n_generated: int, decode_every: int = 16) -> list[tuple[int, Phase]]:
    """(position, phase) of the rows the plugin samples (DESIGN.md §4).

    PROMPT_LAST is the last prompt token (its logits pick the first output token); DECODE rows are every
    ``decode_every``-th decode step; FINAL is the row whose logits picked the last generated token.
    """
    last = prompt_len - 1
    rows: list[tuple[int, Phase]] = [(last, "prompt_last")]
    for j in range(decode_every, n_generated - 1, decode_every):
        rows.append((last + j, "decode"))
    if n_generated >= 2:
        rows.append((prompt_len + n_generated - 2, "final"))  # decode step n-1 ran at this position
    return rows


@torch.no_grad()
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
) -> list[pb.IngestMessage]:
    """Generate greedily from ``prompt`` with an HF causal LM, capture and encode the sampled rows, and
    return the request's IngestMessages in order: start, frames (sequence 0, 1, …), end."""
    from residue_monitor.service.analysis import prompt_ids

    t_start = time.time()
    ids = torch.tensor([prompt_ids(tok, prompt)])  # (1, P)
    P = ids.shape[1]
    eos = tok.eos_token_id
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
    )  # fmt: skip
    gen = out[0, P:].tolist()
    rows = sampled_rows(P, len(gen), decode_every)
    seq = torch.tensor([ids[0].tolist() + gen[:-1]])  # (1, T): every row a sampled position needs
    L = clt.n_layers
    xs: list[torch.Tensor] = [torch.empty(0)] * L
    ys: list[torch.Tensor] = [torch.empty(0)] * L

    def grab(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        xs[i], ys[i] = x[0].detach(), y[0].detach()  # (T, D)

    impl = getattr(model.config, "_attn_implementation", None)
    if heads and impl != "eager":
        model.set_attn_implementation("eager")  # only eager attention returns probabilities
    try:
        with mlp_hooks(model, on_output=grab):
            fwd = model(input_ids=seq, output_attentions=heads)
    finally:
        if heads and impl != "eager" and impl is not None:
            model.set_attn_implementation(impl)
    positions = [p for p, _ in rows]
    codes = encode_rows(clt, torch.stack(xs)[:, positions], torch.stack(ys)[:, positions], k=k)  # (L, n, ·)
    start = pb.RequestStart(request_id=request_id, model=model_name, clt_id=clt.clt_id(), tenant=tenant,
                            prompt_tokens=P)  # fmt: skip
    start.start_time.FromNanoseconds(round(t_start * 1e9))
    msgs = [pb.IngestMessage(start=start)]
    for i, (pos, phase) in enumerate(rows):
        hs = (
            [h for layer, a in enumerate(fwd.attentions) for h in head_stats(a[0], layer, pos)]
            if heads
            else []
        )
        msgs.append(frame_message(request_id, pos, phase, i, layer_residues(codes, i),
                                  logit_stats(fwd.logits[0, pos], eos), hs))  # fmt: skip
    stopped = bool(gen) and gen[-1] == eos
    end = pb.RequestEnd(
        request_id=request_id,
        finish_reason=pb.FINISH_REASON_STOP if stopped else pb.FINISH_REASON_LENGTH,
        prompt_tokens=P,
        output_tokens=len(gen),
        empty_output=len(gen) == 0 or gen == [eos],
    )
    t_end = time.time()
    end.end_time.FromNanoseconds(round(t_end * 1e9))
    end.e2e_latency.FromNanoseconds(round((t_end - t_start) * 1e9))
    msgs.append(pb.IngestMessage(end=end))
    return msgs
