"""Train a TopK transcoder set or cross-layer transcoder on CPU, streaming activations from the model.

Recipe (FACTS-clt.md, measured on these machines): TopK with a linear skip, Adam, decoder rows kept at unit
norm, input centred on its mean (fewer dead features), AuxK on dead features, position 0 and
massive-activation tokens (MLP-output norm > ``norm_cap_factor`` × the layer's median) left out of training
and scoring. Activations are never stored: each chunk of windows is captured, shuffled, trained on, dropped.

Cost: the encoder's dense forward is the only O(n·F·D) term. Its backward is sparse (only the k chosen
features of each token get gradient), written as a custom autograd function; the decoder is an
``embedding_bag`` over the chosen rows.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from residue_monitor.detectors.clt.activations import capture_mlp
from residue_monitor.detectors.clt.metrics import LinearBaseline, fvu_per_layer
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, ModelKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field is recorded in the metrics beside the weights."""

    kind: ModelKind = "transcoder_set"
    """``transcoder_set`` (per-layer) or ``cross_layer_transcoder``."""
    n_features: int = 2304
    """Features per layer (F)."""
    k: int = 32
    """TopK: active features per token and layer."""
    skip: bool = True
    """Train a linear skip x → y beside the features (it matters: FACTS-clt.md)."""
    train_tokens: int = 300_000
    """Token budget: training stops after this many (valid) tokens per layer."""
    batch_tokens: int = 1024
    """Tokens per optimizer step."""
    lr: float = 2e-3
    """Adam learning rate; decays linearly to 10 % over the last 20 % of the budget."""
    window: int = 128
    """Tokens per training window (position 0 of each is left out: the attention sink)."""
    chunk_windows: int = 32
    """Windows captured per chunk (activations of a chunk are shuffled together, then dropped)."""
    norm_cap_factor: float = 10.0
    """Tokens with MLP-output norm above this × the layer's median are left out (massive activations)."""
    aux_k: int = 256
    """AuxK: dead features that try to explain the residual."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_after_tokens: int = 50_000
    """A feature that has not fired for this many tokens counts as dead (for AuxK)."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    curve_every_tokens: int = 50_000
    """Evaluate FVU on the probe set every this many tokens (the training curve)."""
    init_chunks: int = 4
    """Chunks captured before training starts: their statistics set the norm caps and centring, and a
    least-squares fit on them initialises ``W_skip`` / ``b_dec``, so training starts at the linear-map
    baseline and features learn what it misses (without it the skip was far from converged after 200 k
    tokens: layers 0 and 29 stayed 3–7x worse than the linear map)."""
    skip_lr: float = 2e-4
    """Adam learning rate of ``W_skip`` (small: it starts at the least-squares optimum)."""

    def __post_init__(self) -> None:
        if self.kind not in ("transcoder_set", "cross_layer_transcoder"):
            raise ValueError(f"kind must be transcoder_set or cross_layer_transcoder, got {self.kind!r}")
        if not 0 < self.k <= self.n_features:
            raise ValueError(f"k must be in 1..n_features ({self.n_features}), got {self.k}")
        if self.train_tokens <= 0 or self.batch_tokens <= 0:
            raise ValueError("train_tokens and batch_tokens must be positive")


class _TopKEncode(torch.autograd.Function):
    """(x (n, D), W_enc (F, D), b_enc (F)) → (values (n, k), ids (n, k)) with a sparse backward:
    only the chosen features receive gradient, so the backward costs O(n·k·D) instead of O(n·F·D)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int) -> Any:
        pre = torch.addmm(b, x, W.T)
        vals, ids = pre.topk(k, dim=-1)
        vals = torch.relu(vals)
        ctx.save_for_backward(x, ids, vals > 0)
        ctx.shape = W.shape
        ctx.mark_non_differentiable(ids)
        return vals, ids

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        g_vals = grads[0]  # grads[1] belongs to the (non-differentiable) ids
        x, ids, on = ctx.saved_tensors
        g = g_vals * on  # (n, k)
        n, k = g.shape
        rows = torch.arange(n).repeat_interleave(k)
        # gW = Gᵀ x with G (n, F) holding k non-zeros per row: a sparse matmul, never an (n, k, D) tensor
        G_t = torch.sparse_coo_tensor(
            torch.stack([ids.reshape(-1), rows]), g.reshape(-1), (ctx.shape[0], n), check_invariants=False
        )
        gW = torch.sparse.mm(G_t, x)
        gb = torch.zeros(ctx.shape[0], dtype=x.dtype).index_add_(0, ids.reshape(-1), g.reshape(-1))
        return None, gW, gb, None


def _decode_rows(ids: torch.Tensor, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Σ_j vals[:, j] · W[ids[:, j]]: ids/vals (n, k), W (F, M) → (n, M)."""
    return F.embedding_bag(ids, W, per_sample_weights=vals, mode="sum")


@dataclass
class _LayerStats:
    x_mean: torch.Tensor  # (L, D)
    y_mean: torch.Tensor  # (L, D)
    y_var: torch.Tensor  # (L,)  E‖y − ȳ‖² over valid tokens
    cap: torch.Tensor  # (L,)  massive-activation norm cap
    lin: torch.Tensor | None = None  # (L, D+1, D) least-squares map [W; b] fit on the first chunks


def valid_mask(ys: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """ys (L, B, T, D) → (L, B, T) bool: position > 0 and ‖y‖ ≤ cap[layer]."""
    norms = ys.float().norm(dim=-1)
    ok = norms <= cap[:, None, None]
    ok[:, :, 0] = False
    return ok


def _first_stats(xs: torch.Tensor, ys: torch.Tensor, factor: float) -> _LayerStats:
    """Per-layer statistics of the first chunks: xs, ys (L, B, T, D)."""
    norms = ys.float().norm(dim=-1)[:, :, 1:].reshape(ys.shape[0], -1)  # (L, N)
    cap = norms.median(dim=1).values * factor
    ok = valid_mask(ys, cap)
    L = ys.shape[0]
    xm, ym, yv = [], [], []
    for l in range(L):
        x, y = xs[l][ok[l]].float(), ys[l][ok[l]].float()
        xm.append(x.mean(0))
        ym.append(y.mean(0))
        yv.append(((y - y.mean(0)) ** 2).sum(-1).mean())
    return _LayerStats(torch.stack(xm), torch.stack(ym), torch.stack(yv), cap)


class _Trainable(nn.Module):
    """Training-time parameterisation: encoder reads centred input (x − x̄); folded away by :meth:`export`."""

    def __init__(self, L: int, D: int, tc: TrainConfig, stats: _LayerStats, gen: torch.Generator) -> None:
        super().__init__()
        Fn = tc.n_features
        self.L, self.D, self.tc, self.stats = L, D, tc, stats
        cross = tc.kind == "cross_layer_transcoder"
        dec = []
        enc = torch.empty(L, Fn, D)
        for i in range(L):
            w = torch.randn(Fn, (L - i) if cross else 1, D, generator=gen)
            w = w / w.flatten(1).norm(dim=1)[:, None, None]
            enc[i] = w[:, 0] * 0.5  # encoder starts as the (scaled) transpose of the own-layer decoder
            dec.append(nn.Parameter(w.reshape(Fn, -1) if cross else w[:, 0].clone()))
        # One parameter per layer: indexing a stacked (L, F, D) parameter would make every layer's
        # backward write a dense (L, F, D) gradient (measured: 2/3 of the step time).
        self.W_enc = nn.ParameterList([nn.Parameter(enc[i].clone()) for i in range(L)])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(Fn)) for _ in range(L)])
        self.W_dec = nn.ParameterList(dec)
        self.b_dec = nn.ParameterList([nn.Parameter(stats.y_mean[i].clone()) for i in range(L)])
        self.W_skip = (
            nn.ParameterList([nn.Parameter(torch.zeros(D, D)) for _ in range(L)]) if tc.skip else None
        )
        if self.W_skip is not None and stats.lin is not None:
            with torch.no_grad():
                for i in range(L):
                    self.W_skip[i].copy_(stats.lin[i, :D].T)
                    self.b_dec[i].copy_(stats.lin[i, D])
        self.last_fired = torch.zeros(L, Fn)  # tokens since each feature last fired
        self.cross = cross

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        for w in self.W_dec:
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def encode(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = x - self.stats.x_mean[layer]
        return _TopKEncode.apply(xc, self.W_enc[layer], self.b_enc[layer], self.tc.k)  # type: ignore[no-any-return]

    def loss_set(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        """Per-layer independent batches: xs[l], ys[l] (n_l, D). Returns (loss, per-layer FVU)."""
        total = torch.zeros(())
        fvus: list[float] = []
        for l in range(self.L):
            x, y = xs[l], ys[l]
            vals, ids = self.encode(l, x)
            yhat = _decode_rows(ids, vals, self.W_dec[l]) + self.b_dec[l]
            if self.W_skip is not None:
                yhat = yhat + x @ self.W_skip[l].T
            err = y - yhat
            mse = (err**2).sum(-1).mean() / self.stats.y_var[l]
            total = total + mse + self._aux(l, x, err.detach(), ids, self.W_dec[l])
            fvus.append(float(mse.detach()))
        return total, fvus

    def loss_cross(self, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Joint batch: xs, ys (L, n, D) on tokens valid at every layer."""
        L, n, D = xs.shape
        yhat = torch.stack(list(self.b_dec))[:, None, :].expand(L, n, D).clone()
        codes = []
        for i in range(L):
            vals, ids = self.encode(i, xs[i])
            codes.append(ids)
            # features read at layer i write to layers i..L-1: one embedding_bag over (F, (L-i)·D)
            yhat[i:] += _decode_rows(ids, vals, self.W_dec[i]).reshape(n, L - i, D).transpose(0, 1)
        if self.W_skip is not None:
            yhat = yhat + torch.stack([xs[i] @ self.W_skip[i].T for i in range(L)])
        err = ys - yhat
        per = (err**2).sum(-1).mean(-1) / self.stats.y_var  # (L,)
        total = per.sum()
        for i in range(L):
            total = total + self._aux(i, xs[i], err[i].detach(), codes[i], self.W_dec[i][:, :D])
        return total, [float(v) for v in per.detach()]

    def _aux(
        self, layer: int, x: torch.Tensor, resid: torch.Tensor, ids: torch.Tensor, W_dec: torch.Tensor
    ) -> torch.Tensor:
        """AuxK: the top ``aux_k`` dead features explain the residual; keeps dead features learning."""
        with torch.no_grad():
            self.last_fired[layer] += x.shape[0]
            self.last_fired[layer].index_fill_(0, ids.reshape(-1).unique(), 0.0)
            dead = (self.last_fired[layer] > self.tc.dead_after_tokens).nonzero().squeeze(1)
        if dead.numel() == 0 or self.tc.aux_coef == 0:
            return torch.zeros(())
        k = min(self.tc.aux_k, dead.numel())
        xc = x - self.stats.x_mean[layer]
        pre = torch.addmm(self.b_enc[layer][dead], xc, self.W_enc[layer][dead].T)
        vals, j = pre.topk(k, dim=-1)
        rec = _decode_rows(j, torch.relu(vals), W_dec[dead])
        return self.tc.aux_coef * ((rec - resid) ** 2).sum(-1).mean() / self.stats.y_var[layer]

    @torch.no_grad()
    def export(self, model_name: str, input_hook: str, output_hook: str) -> CrossLayerTranscoder:
        """The circuit-tracer-format transcoder: centring folded into b_enc (b_enc − W_enc x̄)."""
        cfg = CLTConfig(
            n_layers=self.L,
            d_model=self.D,
            n_features=self.tc.n_features,
            model_kind=self.tc.kind,
            activation="topk",
            k=self.tc.k,
            skip=self.tc.skip,
            model_name=model_name,
            feature_input_hook=input_hook,
            feature_output_hook=output_hook,
            norm_cap=tuple(float(c) for c in self.stats.cap),
        )
        clt = CrossLayerTranscoder(cfg)
        for i in range(self.L):
            clt.W_enc[i].copy_(self.W_enc[i])
            clt.b_enc[i].copy_(self.b_enc[i] - self.W_enc[i] @ self.stats.x_mean[i])
            clt.b_dec[i].copy_(self.b_dec[i])
            clt.W_dec[i].copy_(self.W_dec[i].reshape(clt.W_dec[i].shape))
            if self.W_skip is not None and clt.W_skip is not None:
                clt.W_skip[i].copy_(self.W_skip[i])
        clt.requires_grad_(
            False
        )  # an inference artifact; attribution differentiates activations, not weights
        return clt


@dataclass(frozen=True)
class TrainResult:
    clt: CrossLayerTranscoder
    train_tokens: int
    """Valid tokens trained on (per layer, mean over layers)."""
    train_seconds: float
    capture_seconds: float
    curve: list[dict[str, float]]
    """Probe-set FVU as training went: [{tokens, fvu_mean}]."""
    left_out_fraction: list[float]
    """Per layer: fraction of (non-first) tokens left out as massive activations."""
    config: dict[str, Any]


ProgressFn = Callable[[int, int, float], None]
Phase = Literal["capture", "train"]


def probe_fvu(clt_like: _Trainable, xs: torch.Tensor, ys: torch.Tensor, ok: torch.Tensor) -> list[float]:
    """FVU per layer of the trainable on a probe set (L, N, D) with mask (L, N)."""
    return fvu_per_layer(clt_like.export("", "", ""), xs, ys, ok)


def train_clt(
    model: nn.Module,
    windows: Iterator[torch.Tensor],
    tc: TrainConfig,
    *,
    model_name: str = "",
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    linear: LinearBaseline | None = None,
    linear_tokens: int = 60_000,
) -> TrainResult:
    """Train on batches of token windows ``(B, T)`` drawn from ``windows`` until ``tc.train_tokens``.

    ``probe``: optional held-out (mlp_in, mlp_out) (L, B, T, D) for the training curve.
    ``progress(tokens_done, tokens_total, last_loss)`` is called after every step.
    ``linear``: a :class:`LinearBaseline` fed the first ``linear_tokens`` valid training tokens per layer.
    """
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    t0 = time.perf_counter()
    capture_s = 0.0
    done = 0
    next_curve = tc.curve_every_tokens
    curve: list[dict[str, float]] = []
    total_steps = max(1, math.ceil(tc.train_tokens / tc.batch_tokens))
    step = 0

    def captured() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nonlocal capture_s
        for ids in windows:
            tc0 = time.perf_counter()
            xs, ys = capture_mlp(model, ids)
            capture_s += time.perf_counter() - tc0
            yield xs.float(), ys.float()

    source = captured()
    first = list(itertools.islice(source, max(1, tc.init_chunks)))
    if not first:
        raise ValueError("no training windows: the text source yielded nothing")
    stats = _first_stats(
        torch.cat([x for x, _ in first], 1), torch.cat([y for _, y in first], 1), tc.norm_cap_factor
    )
    L, D = first[0][0].shape[0], first[0][0].shape[-1]
    init_fit = LinearBaseline(L, D)
    for xs, ys in first:
        ok = valid_mask(ys, stats.cap).reshape(L, -1)
        for l in range(L):
            init_fit.add(l, xs[l].reshape(-1, D)[ok[l]], ys[l].reshape(-1, D)[ok[l]])
    init_fit.fit()
    stats.lin = init_fit.W.float() if init_fit.W is not None else None
    trainer = _Trainable(L, D, tc, stats, gen)
    skip_params = list(trainer.W_skip) if trainer.W_skip is not None else []
    skip_ids = {id(p) for p in skip_params}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trainer.parameters() if id(p) not in skip_ids], "lr": tc.lr, "base_lr": tc.lr}
    ]
    if skip_params:
        groups.append({"params": skip_params, "lr": tc.skip_lr, "base_lr": tc.skip_lr})
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999), fused=True)
    left_out = torch.zeros(L)
    seen = torch.zeros(())
    probe_ok = valid_mask(probe[1], stats.cap).flatten(1) if probe is not None else None

    for xs, ys in itertools.chain(first, source):
        ok = valid_mask(ys, trainer.stats.cap)  # (L, B, T)
        left_out += (~ok[:, :, 1:]).flatten(1).sum(1).float()
        seen += ok[:, :, 1:].numel() / L
        flat_x, flat_y, flat_ok = xs.reshape(L, -1, D), ys.reshape(L, -1, D), ok.reshape(L, -1)
        if linear is not None and float(linear.n.min()) < linear_tokens:
            for l in range(L):
                linear.add(l, flat_x[l][flat_ok[l]], flat_y[l][flat_ok[l]])
        if trainer.cross:
            joint = flat_ok.all(0).nonzero().squeeze(1)
            joint = joint[torch.randperm(joint.numel(), generator=gen)]
            batches = [
                ("joint", joint[s : s + tc.batch_tokens]) for s in range(0, joint.numel(), tc.batch_tokens)
            ]
            per_layer = None
        else:
            per_layer = [flat_ok[l].nonzero().squeeze(1) for l in range(L)]
            per_layer = [p[torch.randperm(p.numel(), generator=gen)] for p in per_layer]
            n_b = min(p.numel() for p in per_layer) // tc.batch_tokens or 1
            batches = [("set", torch.tensor(b)) for b in range(n_b)]
        for _kind, sel in batches:
            if done >= tc.train_tokens:
                break
            frac = step / total_steps
            decay = 1.0 if frac < 0.8 else max(0.1, 1 - (frac - 0.8) / 0.2 * 0.9)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * decay
            if per_layer is None:
                loss, fvus = trainer.loss_cross(flat_x[:, sel], flat_y[:, sel])
                n = sel.numel()
            else:
                b = int(sel)
                idx = [p[b * tc.batch_tokens : (b + 1) * tc.batch_tokens] for p in per_layer]
                loss, fvus = trainer.loss_set(
                    [flat_x[l, idx[l]] for l in range(L)], [flat_y[l, idx[l]] for l in range(L)]
                )
                n = min(i.numel() for i in idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trainer.normalise_decoder()
            done += n
            step += 1
            if progress is not None:
                progress(done, tc.train_tokens, sum(fvus) / len(fvus))
            if probe is not None and done >= next_curve:
                next_curve += tc.curve_every_tokens
                fv = probe_fvu(trainer, probe[0].flatten(1, 2), probe[1].flatten(1, 2), probe_ok)  # type: ignore[arg-type]
                curve.append({"tokens": float(done), "fvu_mean": sum(fv) / len(fv)})
                logger.info("probe FVU %.4f after %d tokens", curve[-1]["fvu_mean"], done)
        if done >= tc.train_tokens:
            break

    clt = trainer.export(model_name, "mlp.hook_in", "mlp.hook_out")
    elapsed = time.perf_counter() - t0
    if probe is not None and (not curve or curve[-1]["tokens"] < done):
        fv = probe_fvu(trainer, probe[0].flatten(1, 2), probe[1].flatten(1, 2), probe_ok)  # type: ignore[arg-type]
        curve.append({"tokens": float(done), "fvu_mean": sum(fv) / len(fv)})
    return TrainResult(
        clt=clt,
        train_tokens=done,
        train_seconds=elapsed,
        capture_seconds=capture_s,
        curve=curve,
        left_out_fraction=[float(v) for v in left_out / seen.clamp_min(1)],
        config=asdict(tc),
    )
