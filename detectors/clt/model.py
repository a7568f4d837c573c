"""Cross-layer transcoders and per-layer transcoder sets, one class for both.

Notation follows circuit-tracer and the papers: ``L`` layers, ``D = d_model``, ``F`` features per layer.
A per-layer *transcoder set* is the special case of a CLT whose features only write to their own layer:
its decoder is ``W_dec[l]: (F, D)``; a *cross-layer transcoder* stores ``W_dec[i]: (F, L - i, D)``, the
features read at layer ``i`` writing to layers ``i .. L-1``.

Reconstruction of MLP output at layer ``l`` from MLP inputs ``x_0 .. x_l``::

    a_i   = act(x_i @ W_enc[i].T + b_enc[i])                     # (n, F)
    ŷ_l   = Σ_{i ≤ l} a_i @ W_dec[i → l] + b_dec[l] + x_l @ W_skip[l].T

``W_skip`` is stored (out, in) like ``nn.Linear`` weights and like circuit-tracer's single-layer files.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from residue_monitor.detectors.exceptions import CLTFormatError

ModelKind = Literal["transcoder_set", "cross_layer_transcoder"]
Activation = Literal["relu", "topk", "jumprelu"]
MODEL_KINDS: tuple[ModelKind, ...] = ("transcoder_set", "cross_layer_transcoder")
ACTIVATIONS: tuple[Activation, ...] = ("relu", "topk", "jumprelu")


@dataclass(frozen=True)
class CLTConfig:
    """Shape and behaviour of a transcoder; written to ``config.yaml`` beside the weights."""

    n_layers: int
    """Number of model layers covered (every layer from 0 to n_layers-1)."""
    d_model: int
    """Width of the MLP input and output (the residual stream width)."""
    n_features: int
    """Features per layer (``F``)."""
    model_kind: ModelKind = "transcoder_set"
    """``transcoder_set``: each layer's features write to that layer only; ``cross_layer_transcoder``:
    features read at layer i write to layers i..L-1."""
    activation: Activation = "topk"
    """``topk`` keeps the k largest pre-activations (ReLU'd), ``relu``, or ``jumprelu`` (needs thresholds)."""
    k: int | None = 32
    """Active features per token for ``topk``; ignored otherwise."""
    skip: bool = True
    """Whether a linear skip ``W_skip`` (x → y) is part of the reconstruction."""
    model_name: str = ""
    """The model the transcoder was trained on (e.g. ``SmolLM2-135M-Instruct``)."""
    feature_input_hook: str = "mlp.hook_in"
    """circuit-tracer hook name the features read from (the MLP input after the norm)."""
    feature_output_hook: str = "mlp.hook_out"
    """circuit-tracer hook name the reconstruction targets (the MLP output)."""
    norm_cap: tuple[float, ...] = field(default=())
    """Per-layer MLP-output norm above which a token counts as a massive-activation token: left out of
    training and metrics, and kept exact (as an error node) in replacement models. Empty: no cap."""

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise CLTFormatError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        if self.activation not in ACTIVATIONS:
            raise CLTFormatError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation != "topk" and self.k is not None:
            object.__setattr__(self, "k", None)  # k means nothing without topk; keep configs comparable
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.n_features):
            raise CLTFormatError(
                f"activation 'topk' needs 0 < k <= n_features={self.n_features}, got {self.k}"
            )
        for name in ("n_layers", "d_model", "n_features"):
            if getattr(self, name) <= 0:
                raise CLTFormatError(f"{name} must be positive, got {getattr(self, name)}")
        if self.norm_cap and len(self.norm_cap) != self.n_layers:
            raise CLTFormatError(
                f"norm_cap needs one value per layer ({self.n_layers}), got {len(self.norm_cap)}"
            )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["norm_cap"] = list(self.norm_cap)
        return d


class CrossLayerTranscoder(nn.Module):
    """Weights of a transcoder set or CLT plus encode / decode.

    Parameters (``L`` layers, ``F`` features, ``D`` d_model):
      W_enc (L, F, D), b_enc (L, F), b_dec (L, D), threshold (L, F) for jumprelu,
      W_skip (L, D, D) when ``cfg.skip``, W_dec: list of (F, D) [set] or (F, L-i, D) [CLT].
    """

    def __init__(self, cfg: CLTConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        L, F, D = cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.zeros(L, F, D, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(L, F, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(L, D, dtype=dtype))
        cross = cfg.model_kind == "cross_layer_transcoder"
        shapes = [(F, L - i, D) for i in range(L)] if cross else [(F, D)] * L
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes])
        self.threshold: nn.Parameter | None = (
            nn.Parameter(torch.zeros(L, F, dtype=dtype)) if cfg.activation == "jumprelu" else None
        )
        self.W_skip: nn.Parameter | None = (
            nn.Parameter(torch.zeros(L, D, D, dtype=dtype)) if cfg.skip else None
        )

    # ------------------------------------------------------------------ structure
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def is_cross_layer(self) -> bool:
        return self.cfg.model_kind == "cross_layer_transcoder"

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """Decoder of features read at ``source`` into layer ``target``: (F, D)."""
        if target < source:
            raise ValueError(f"features of layer {source} cannot write to earlier layer {target}")
        if not self.is_cross_layer:
            if target != source:
                raise ValueError("a transcoder set only writes to its own layer")
            return self.W_dec[source]
        return self.W_dec[source][:, target - source]

    def sources(self, target: int) -> range:
        """Layers whose features write into ``target``."""
        return range(target + 1) if self.is_cross_layer else range(target, target + 1)

    def clt_id(self) -> str:
        """Content id: sha256 over the config and every weight tensor (first 16 hex digits)."""
        h = hashlib.sha256(repr(sorted(self.cfg.to_dict().items())).encode())
        for name, p in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ encode
    def pre_activations(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: (n, D) MLP input at ``layer`` → (n, F) pre-activations."""
        return torch.addmm(self.b_enc[layer], x.to(self.W_enc.dtype), self.W_enc[layer].T)

    def activate(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """Dense activations (n, F) from pre-activations (n, F)."""
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold[layer])
        k = self.cfg.k
        assert k is not None
        vals, ids = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, ids, torch.relu(vals))

    def encode(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: (n, D) → dense feature activations (n, F)."""
        return self.activate(self.pre_activations(x, layer), layer)

    def encode_topk(self, x: torch.Tensor, layer: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k strongest active features per row: (values (n, k), ids (n, k)); inactive slots have value 0.

        This is what a residue frame ships: ids are int64 feature indices, values the activations.
        """
        acts = self.encode(x, layer)
        k = min(k, acts.shape[-1])
        vals, ids = acts.topk(k, dim=-1)
        return vals, ids

    # ------------------------------------------------------------------ decode
    def skip_out(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Skip contribution x @ W_skip[layer].T, or zeros: (n, D)."""
        if self.W_skip is None:
            return torch.zeros(x.shape[0], self.cfg.d_model, dtype=self.b_dec.dtype, device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip[layer].T

    def reconstruct(self, xs: torch.Tensor, acts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """MLP outputs reconstructed for every layer.

        xs: (L, n, D) MLP inputs; acts: optional precomputed dense activations per layer [(n, F)].
        Returns (L, n, D).
        """
        L = self.n_layers
        if acts is None:
            acts = [self.encode(xs[i], i) for i in range(L)]
        out = self.b_dec[:, None, :].expand(L, xs.shape[1], -1).clone()
        for i in range(L):
            a, w_dec = acts[i], self.W_dec[i]
            # Sparse codes (TopK keeps k of F): read only the decoder rows some row uses. For a few rows
            # this skips most of the decoder's weights (the cost of encoding a handful of live rows is
            # memory reads, not arithmetic); the result is the same sum.
            used = (a != 0).any(0).nonzero().squeeze(-1)
            if used.numel() * 4 < a.shape[-1]:
                a, w_dec = a.index_select(-1, used), w_dec.index_select(0, used)
            if self.is_cross_layer:
                # (n, F) @ (F, (L-i)·D) → (n, L-i, D): one matmul for every target layer.
                w = w_dec.reshape(a.shape[-1], -1)
                out[i:] += (a @ w).reshape(-1, L - i, self.cfg.d_model).transpose(0, 1)
            else:
                out[i] += a @ w_dec
            out[i] += self.skip_out(xs[i], i)
        return out

    def reconstruct_sparse(self, xs: torch.Tensor, ids: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """``reconstruct`` from sparse codes: ids / acts (L, n, k) name each row's active features and
        their activations (others are 0). Reads only those decoder rows (``embedding_bag``: Σ act·row)
        and runs every layer's skip as one batched matmul. Returns (L, n, D)."""
        L, n, D = self.n_layers, xs.shape[1], self.cfg.d_model
        out = self.b_dec[:, None, :].expand(L, n, D).clone()
        for i in range(L):
            w = self.W_dec[i]  # (F, D) or (F, L - i, D)
            part = torch.nn.functional.embedding_bag(
                ids[i], w.reshape(w.shape[0], -1), per_sample_weights=acts[i].to(w.dtype), mode="sum"
            )  # (n, D) or (n, (L - i)·D)
            if self.is_cross_layer:
                out[i:] += part.reshape(n, L - i, D).transpose(0, 1)
            else:
                out[i] += part
        if self.W_skip is not None:
            out += torch.bmm(xs.to(self.W_skip.dtype), self.W_skip.transpose(1, 2))
        return out


def random_clt(cfg: CLTConfig, seed: int = 0, scale: float = 1.0) -> CrossLayerTranscoder:
    """A randomly initialised transcoder (tests and the tiny model): unit-norm decoder rows,
    encoder ≈ decoderᵀ, small random skip."""
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(cfg)
    L, F, D = cfg.n_layers, cfg.n_features, cfg.d_model
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, F, D, generator=g) / D**0.5 * scale)
        clt.b_enc.copy_(torch.randn(L, F, generator=g) * 0.05)
        clt.b_dec.copy_(torch.randn(L, D, generator=g) * 0.01)
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=g) / (D * w[0].numel() / D) ** 0.5 * scale)
        if clt.threshold is not None:
            clt.threshold.copy_(torch.rand(L, F, generator=g) * 0.1)
        if clt.W_skip is not None:
            clt.W_skip.copy_(torch.randn(L, D, D, generator=g) * 0.02 / D**0.5)
    return clt
