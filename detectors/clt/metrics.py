"""How good is a transcoder: FVU per layer against a least-squares linear baseline, L0, dead features,
and spliced next-token quality (KL and top-1 agreement with MLPs replaced by the reconstruction).

All scores use held-out tokens; position 0 (the attention sink) and massive-activation tokens (the
transcoder's ``norm_cap``) are left out of FVU/L0, as in training. Splicing keeps position 0 exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from residue_monitor.detectors.clt.activations import mlp_hooks
from residue_monitor.detectors.clt.model import CrossLayerTranscoder


@torch.no_grad()
def fvu_per_layer(
    clt: CrossLayerTranscoder,
    xs: torch.Tensor,
    ys: torch.Tensor,
    ok: torch.Tensor | None = None,
    chunk: int = 4096,
) -> list[float]:
    """Fraction of variance unexplained per layer. xs, ys: (L, N, D); ok: (L, N) tokens to score.

    For a CLT the reconstruction of layer l uses every token's features from layers ≤ l, so tokens are
    scored where valid at layer l but encoded at every layer.
    """
    L, N, _ = xs.shape
    if ok is None:
        ok = torch.ones(L, N, dtype=torch.bool)
    sse = torch.zeros(L, dtype=torch.float64)
    s1 = torch.zeros(L, ys.shape[-1], dtype=torch.float64)
    s2 = torch.zeros(L, dtype=torch.float64)
    cnt = torch.zeros(L, dtype=torch.float64)
    for start in range(0, N, chunk):
        x, y, m = (
            xs[:, start : start + chunk].float(),
            ys[:, start : start + chunk].float(),
            ok[:, start : start + chunk],
        )
        err = ((clt.reconstruct(x) - y) ** 2).sum(-1)  # (L, n)
        mf = m.double()
        sse += (err.double() * mf).sum(1)
        s1 += (y.double() * mf[..., None]).sum(1)
        s2 += ((y.double() ** 2).sum(-1) * mf).sum(1)
        cnt += mf.sum(1)
    var = s2 - (s1**2).sum(-1) / cnt.clamp_min(1)
    return [float(v) for v in sse / var.clamp_min(1e-12)]


class LinearBaseline:
    """Least-squares affine map from MLP input to output per layer, fit by accumulating normal equations
    (float64) over streamed tokens: the bar a transcoder must clear."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        self.xtx = torch.zeros(n_layers, d_model + 1, d_model + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_layers, d_model + 1, d_model, dtype=torch.float64)
        self.n = torch.zeros(n_layers, dtype=torch.float64)
        self.W: torch.Tensor | None = None

    @staticmethod
    def _aug(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)

    def add(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """x, y: (n, D) valid tokens of one layer."""
        a = self._aug(x)
        self.xtx[layer] += a.T @ a
        self.xty[layer] += a.T @ y.double()
        self.n[layer] += x.shape[0]

    def fit(self, ridge: float = 1e-6) -> None:
        eye = torch.eye(self.xtx.shape[-1], dtype=torch.float64)
        ws = []
        for l in range(self.xtx.shape[0]):  # per layer: batched LAPACK solves misbehaved in MKL here
            a = self.xtx[l] + ridge * self.xtx[l].diagonal().mean() * eye
            chol = torch.linalg.cholesky(a)
            ws.append(torch.cholesky_solve(self.xty[l], chol))
        self.W = torch.stack(ws)

    @torch.no_grad()
    def fvu(self, xs: torch.Tensor, ys: torch.Tensor, ok: torch.Tensor) -> list[float]:
        """FVU per layer on (L, N, D) with mask (L, N)."""
        if self.W is None:
            self.fit()
        assert self.W is not None
        out = []
        for l in range(xs.shape[0]):
            x, y = xs[l][ok[l]], ys[l][ok[l]].double()
            pred = self._aug(x) @ self.W[l]
            out.append(float(((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-12)))
        return out


@torch.no_grad()
def l0_and_dead(
    clt: CrossLayerTranscoder, xs: torch.Tensor, ok: torch.Tensor, chunk: int = 4096
) -> tuple[list[float], list[float]]:
    """(mean active features per token, fraction of features never active) per layer on (L, N, D)."""
    L = xs.shape[0]
    l0, dead = [], []
    for l in range(L):
        x = xs[l][ok[l]].float()
        fired = torch.zeros(clt.cfg.n_features, dtype=torch.bool)
        active = 0.0
        for s in range(0, x.shape[0], chunk):
            a = clt.encode(x[s : s + chunk], l) > 0
            active += float(a.sum())
            fired |= a.any(0)
        l0.append(active / max(1, x.shape[0]))
        dead.append(float((~fired).float().mean()))
    return l0, dead


@dataclass(frozen=True)
class SpliceScore:
    kl: float
    """Mean next-token KL(original ‖ spliced) over scored positions (nats)."""
    top1: float
    """Fraction of positions where the spliced top-1 token equals the original's."""


def _spliced_hook(clt: CrossLayerTranscoder, layers: set[int]):
    """An ``on_output`` hook replacing MLP outputs at ``layers`` by the transcoder's reconstruction computed
    from the *spliced* run's own MLP inputs; position 0 stays exact."""
    L = clt.n_layers
    pending: dict[int, torch.Tensor] = {}  # target layer → decoder contributions so far (B, T, D)

    def hook(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        B, T, D = x.shape
        acts = clt.encode(x.reshape(-1, D).float(), i)
        if clt.is_cross_layer:
            w = clt.W_dec[i].reshape(clt.cfg.n_features, -1)
            contrib = (acts @ w).reshape(B, T, L - i, D)
            for j in range(i, L):
                pending[j] = pending.get(j, 0) + contrib[:, :, j - i]  # type: ignore[assignment]
        else:
            pending[i] = (acts @ clt.W_dec[i]).reshape(B, T, D)
        if i not in layers:
            pending.pop(i, None)
            return None
        rec = pending.pop(i) + clt.b_dec[i] + clt.skip_out(x.reshape(-1, D).float(), i).reshape(B, T, D)
        out = rec.to(y.dtype)
        out[:, 0] = y[:, 0]
        return out

    return hook


@torch.no_grad()
def splice_score(
    model: nn.Module,
    clt: CrossLayerTranscoder,
    input_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    batch: int = 8,
) -> SpliceScore:
    """Replace the MLPs of ``layers`` (default: all) with the transcoder and compare next-token
    distributions with the original model at positions ≥ 1 of ``input_ids`` (B, T)."""
    chosen = set(range(clt.n_layers) if layers is None else layers)
    kl_sum = agree = count = 0.0
    for s in range(0, input_ids.shape[0], batch):
        ids = input_ids[s : s + batch]
        ref = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, 1:]
        with mlp_hooks(model, on_output=_spliced_hook(clt, chosen)):
            out = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, 1:]
        kl_sum += float((ref.exp() * (ref - out)).sum(-1).sum())
        agree += float((ref.argmax(-1) == out.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
    return SpliceScore(kl=kl_sum / count, top1=agree / count)


def layer_thirds(n_layers: int) -> dict[str, list[int]]:
    """Layer bands used in reports: first, middle, last third."""
    a, b = n_layers // 3, 2 * n_layers // 3
    return {
        f"layers_0_{a - 1}": list(range(a)),
        f"layers_{a}_{b - 1}": list(range(a, b)),
        f"layers_{b}_{n_layers - 1}": list(range(b, n_layers)),
    }


@torch.no_grad()
def evaluate_clt(
    model: nn.Module,
    clt: CrossLayerTranscoder,
    heldout_ids: torch.Tensor,
    linear: LinearBaseline | None = None,
    splice_windows: int = 64,
) -> dict[str, object]:
    """Every quality number of a transcoder on held-out windows ``heldout_ids`` (B, T).

    Returns a JSON-ready dict: fvu / linear_fvu / l0 / dead_fraction / left_out per layer and their means,
    and spliced KL / top-1 for all layers and per third.
    """
    from residue_monitor.detectors.clt.activations import capture_mlp

    xs_l, ys_l = [], []
    for s in range(0, heldout_ids.shape[0], 16):
        x, y = capture_mlp(model, heldout_ids[s : s + 16])
        xs_l.append(x.float().flatten(1, 2))
        ys_l.append(y.float().flatten(1, 2))
    xs, ys = torch.cat(xs_l, 1), torch.cat(ys_l, 1)  # (L, N, D)
    L = xs.shape[0]
    T = heldout_ids.shape[1]
    first = (torch.arange(xs.shape[1]) % T) == 0
    if clt.cfg.norm_cap:
        capped = ys.norm(dim=-1) > torch.tensor(clt.cfg.norm_cap)[:, None]
    else:
        capped = torch.zeros(L, xs.shape[1], dtype=torch.bool)
    ok = ~capped & ~first[None, :]
    fvu = fvu_per_layer(clt, xs, ys, ok)
    l0, dead = l0_and_dead(clt, xs, ok)
    out: dict[str, object] = {
        "heldout_tokens": int((~first).sum()),
        "fvu": fvu,
        "fvu_mean": sum(fvu) / L,
        "l0": l0,
        "l0_mean": sum(l0) / L,
        "dead_fraction": dead,
        "dead_fraction_mean": sum(dead) / L,
        "left_out_massive": [int((capped[l] & ~first).sum()) for l in range(L)],
    }
    if linear is not None:
        lin = linear.fvu(xs, ys, ok)
        out["linear_fvu"] = lin
        out["linear_baseline_fvu_mean"] = sum(lin) / L
        out["fvu_vs_linear"] = [f / max(b, 1e-9) for f, b in zip(fvu, lin, strict=True)]
    ids = heldout_ids[:splice_windows]
    splice = {"all": splice_score(model, clt, ids)}
    for name, layers in layer_thirds(L).items():
        splice[name] = splice_score(model, clt, ids, layers)
    out["splice"] = {k: {"kl": v.kl, "top1": v.top1} for k, v in splice.items()}
    out["top1_agreement"] = splice["all"].top1
    out["kl_mean"] = splice["all"].kl
    return out
