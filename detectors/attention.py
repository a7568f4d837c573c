"""Attention disruption: per-head statistics, trapping and self-attention loops; QK/OV head summaries.

The signature carries, per sampled row and head, the entropy of the attention distribution, the mass
on the query itself (self), on the local window before it, on the first token (sink) and the mass of the
short span holding the most attention (``signature.head_stats``). Two disruptions from the papers:

* **trapping**: attention mass stuck inside one short span that is neither the sink nor the query's
  local neighbourhood (e.g. inside the command tokens of a shell); per head the span mass when the span
  lies in that region, else 0;
* **self-attention loops**: heads that attend mostly to the query token itself.

The score is the mean trapped mass over heads and layers at the last prompt token (the row that decides
the first output token); evidence gives the loop fraction, mean entropy and sink mass, and the layer
where trapping is strongest. ``head_summary`` reads QK/OV numbers per head for the offline report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from residue_monitor.detectors.base import DetectorResult, frozen
from residue_monitor.detectors.signature import (
    ENTROPY,
    LOCAL_WINDOW,
    SELF,
    SINK,
    SPAN_LEN_COL,
    SPAN_MASS,
    SPAN_START,
    ResidueSignature,
    RowSignature,
)

NAME = "attention"
LOOP_SELF = 0.5
"""A head is in a self-attention loop when at least this much of its mass sits on the query itself."""


def trapped_mass(row: RowSignature, window: int = LOCAL_WINDOW) -> np.ndarray:
    """(L, H) per head: the top span's mass when the span avoids the sink and the local window, else 0."""
    h = row.heads.astype(np.float64)
    start, length, mass = h[..., SPAN_START], h[..., SPAN_LEN_COL], h[..., SPAN_MASS]
    # The local window is keys position - window .. position - 1 (signature.head_stats): the span's last
    # key, start + length - 1, must lie before its first key.
    away = (start >= 1) & (start + length <= row.position - window)
    return np.where(away, mass, 0.0)


def attention_evidence(row: RowSignature) -> dict[str, float]:
    """The row's disruption numbers (see the module docstring); empty when the row has no head stats."""
    if row.heads.shape[1] == 0:
        return {}
    trap = trapped_mass(row)  # (L, H)
    h = row.heads.astype(np.float64)
    per_layer = trap.mean(axis=1)
    return {
        "trapped_mass": float(trap.mean()),
        "trapped_heads": float((trap > 0.5).mean()),
        "trap_layer": float(per_layer.argmax()),
        "trap_layer_mass": float(per_layer.max()),
        "loop_heads": float((h[..., SELF] >= LOOP_SELF).mean()),
        "self_frac": float(h[..., SELF].mean()),
        "entropy": float(h[..., ENTROPY].mean()),
        "sink_frac": float(h[..., SINK].mean()),
    }


def detect_attention(sig: ResidueSignature) -> DetectorResult | None:
    """Trapped attention mass at the last prompt token (and the final row's, as evidence)."""
    row = sig.row("prompt_last")
    if row is None or row.heads.shape[1] == 0:
        return None
    ev = attention_evidence(row)
    final = sig.row("final")
    if final is not None and final.heads.shape[1]:
        fe = attention_evidence(final)
        ev["final_trapped_mass"] = fe["trapped_mass"]
        ev["final_loop_heads"] = fe["loop_heads"]
    return DetectorResult(NAME, ev["trapped_mass"], frozen(ev))


@torch.no_grad()
def head_summary(
    model: Any, probs: torch.Tensor, positions: tuple[int, ...], top: int = 3
) -> list[dict[str, Any]]:
    """Per-head QK/OV numbers for the offline report (one dict per (layer, head)).

    ``probs`` (L, H, n, T_k) from ``capture.attention_probs``. QK: the ``top`` keys each head reads at the
    last sampled row and their mass. OV: the Frobenius and spectral norm of the head's W_O·W_V (how much a
    head can write, independent of input), which separates heads that move information from idle ones.
    """
    from residue_monitor.detectors.clt.activations import decoder_layers

    out: list[dict[str, Any]] = []
    layers = decoder_layers(model)
    L, H = probs.shape[:2]
    for li in range(L):
        attn: Any = layers[li].self_attn
        d_head = attn.head_dim
        n_kv = attn.k_proj.weight.shape[0] // d_head
        W_V = attn.v_proj.weight.float().view(n_kv, d_head, -1)  # (H_kv, d_head, D)
        W_O = attn.o_proj.weight.float().view(-1, H, d_head).permute(1, 0, 2)  # (H, D, d_head)
        for h in range(H):
            ov = W_O[h] @ W_V[h // (H // n_kv)]  # (D, D)
            sv = torch.linalg.svdvals(ov)
            p = probs[li, h, -1]
            val, idx = p.topk(min(top, int(p.shape[-1])))
            out.append({
                "layer": li, "head": h,
                "qk_top_keys": [int(i) for i in idx], "qk_top_mass": [float(v) for v in val],
                "ov_frobenius": float(sv.norm()), "ov_spectral": float(sv[0]),
                "query_position": positions[-1],
            })  # fmt: skip
    return out
