"""Encode chosen rows (token positions) of every layer: what a residue frame carries per layer.

Only the sampled rows are encoded (DESIGN.md §4): the cost is one (n, D) × (D, F) matmul per layer for
n sampled rows, never the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residue_monitor.detectors.clt.model import CrossLayerTranscoder


@dataclass(frozen=True)
class RowCodes:
    """Per-layer transcoder readout of n rows (L layers, k kept features)."""

    ids: torch.Tensor
    """(L, n, k) int64 feature ids, strongest first."""
    values: torch.Tensor
    """(L, n, k) activations of those features (0 where fewer than k are active)."""
    l0: torch.Tensor
    """(L, n) number of active features."""
    mass: torch.Tensor
    """(L, n) sum of all feature activations."""
    error_ratio: torch.Tensor
    """(L, n) ‖y − ŷ‖ / ‖y‖ (NaN when the MLP output was not given)."""
    in_norm: torch.Tensor
    """(L, n) ‖x‖ of the MLP input."""
    out_norm: torch.Tensor
    """(L, n) ‖y‖ of the MLP output (NaN when not given)."""


@torch.no_grad()
def encode_rows(
    clt: CrossLayerTranscoder, mlp_in: torch.Tensor, mlp_out: torch.Tensor | None = None, k: int = 32
) -> RowCodes:
    """Encode rows: ``mlp_in`` / ``mlp_out`` (L, n, D) → :class:`RowCodes`.

    The reconstruction error is computed with the transcoder's own semantics: for a cross-layer
    transcoder, layer l's reconstruction sums the decoders of layers ≤ l evaluated on the same rows.
    """
    L, n, D = mlp_in.shape
    if clt.n_layers != L or clt.cfg.d_model != D:
        raise ValueError(
            f"mlp_in is {tuple(mlp_in.shape)}; transcoder expects ({clt.n_layers}, n, {clt.cfg.d_model})"
        )
    x = mlp_in.float()
    if clt.cfg.activation == "topk" and clt.cfg.k is not None and k <= clt.cfg.k and n > 0:
        return _encode_topk_rows(clt, x, None if mlp_out is None else mlp_out.float(), k)
    acts = [clt.encode(x[i], i) for i in range(L)]  # (n, F) each
    k = min(k, clt.cfg.n_features)
    vals, ids, l0, mass = [], [], [], []
    for a in acts:
        v, i = a.topk(k, dim=-1)
        vals.append(v)
        ids.append(i)
        l0.append((a > 0).sum(-1))
        mass.append(a.sum(-1))
    in_norm = x.norm(dim=-1)
    if mlp_out is not None:
        y = mlp_out.float()
        rec = clt.reconstruct(x, acts)
        out_norm = y.norm(dim=-1)
        err = (y - rec).norm(dim=-1) / out_norm.clamp_min(1e-12)
    else:
        out_norm = torch.full((L, n), float("nan"), device=x.device)
        err = torch.full((L, n), float("nan"), device=x.device)
    return RowCodes(
        ids=torch.stack(ids),
        values=torch.stack(vals),
        l0=torch.stack(l0),
        mass=torch.stack(mass),
        error_ratio=err,
        in_norm=in_norm,
        out_norm=out_norm,
    )


def _encode_topk_rows(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor | None, k: int) -> RowCodes:
    """``encode_rows`` for a TopK transcoder, without dense activations (the live plugin's hot path).

    A TopK code *is* its k strongest pre-activations (ReLU'd), so one ``topk`` per layer gives the ids,
    values, L0 and mass, and the reconstruction reads only the decoder rows those ids name
    (``embedding_bag``: Σ value·row, no (n, F) matrix and no pass over the whole decoder). All layers'
    encoders run as one batched matmul. Same results as the dense path up to float summation order.
    """
    L, n, _ = x.shape
    K = clt.cfg.k
    assert K is not None
    dt = clt.W_enc.dtype
    pre = torch.baddbmm(clt.b_enc[:, None, :], x.to(dt), clt.W_enc.transpose(1, 2))  # (L, n, F)
    top, ids = pre.topk(K, dim=-1)  # (L, n, K), strongest first
    acts = top.clamp_min(0.0)
    l0 = (acts > 0).sum(-1)
    mass = acts.sum(-1, dtype=torch.float32)
    in_norm = x.norm(dim=-1)
    if y is not None:
        rec = clt.reconstruct_sparse(x, ids, acts)
        out_norm = y.norm(dim=-1)
        err = (y - rec.float()).norm(dim=-1) / out_norm.clamp_min(1e-12)
    else:
        out_norm = torch.full((L, n), float("nan"), device=x.device)
        err = torch.full((L, n), float("nan"), device=x.device)
    return RowCodes(
        ids=ids[..., :k],
        values=acts[..., :k].float(),
        l0=l0,
        mass=mass,
        error_ratio=err,
        in_norm=in_norm,
        out_norm=out_norm,
    )
