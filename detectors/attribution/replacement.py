"""The local replacement model of one prompt (circuit-tracer's construction, FACTS-clt.md).

For a prompt of ``T`` tokens on a Llama-style HF model with a transcoder (set or CLT) of ``L`` layers:

* every MLP output is split into ``skip(x_l) + Σ_{i ≤ l} a_i W_dec[i → l] + b_dec[l] + e_l``, where the
  feature activations ``a_i`` are *fixed* (they are graph nodes) and the **error node**
  ``e_l = y_l − reconstruction`` is a constant per (layer, position), so the model reproduces the real MLP
  outputs, and hence the real logits, exactly;
* attention patterns and every RMSNorm denominator are frozen at their values on the prompt.

What remains is linear from the sources (token embeddings, features, errors) to the targets (feature
pre-activations ``W_enc x_j + b_enc`` and logits), so an edge is a product of one source vector and one
gradient: :meth:`LocalReplacement.backward` computes those gradients for a batch of targets by hand
(vector-Jacobian products through the frozen attention value path, the frozen norms and the linear skip),
which costs a fraction of an autograd pass over the full model and keeps memory flat. The oracle tests in
``tests/unit/test_attribution.py`` check it against :meth:`LocalReplacement.frozen_forward`.

Positions whose features are left out (position 0, the attention sink, as circuit-tracer does; and
massive-activation tokens above the CLT's ``norm_cap``) keep their whole MLP output as an error node.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from residue_monitor.detectors.capture import apply_rope
from residue_monitor.detectors.clt.activations import decoder_layers
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import InvalidInput


@dataclass(frozen=True)
class _Layer:
    """The frozen weights of one decoder block that the linear (value) path reads."""

    w_ln1: torch.Tensor  # (D,) input_layernorm weight
    w_ln2: torch.Tensor  # (D,) post_attention_layernorm weight
    W_v: torch.Tensor  # (H_kv·d_head, D) v_proj weight (out, in)
    b_v: torch.Tensor | None  # (H_kv·d_head,)
    W_o: torch.Tensor  # (D, H·d_head) o_proj weight
    b_o: torch.Tensor | None  # (D,)


@dataclass(frozen=True)
class Injection:
    """One target's gradient seed: ``vector`` enters at the MLP input of ``layer`` (a feature's
    pre-activation) or, with ``layer = L``, at the final norm's output (a logit direction), at ``pos``."""

    layer: int
    pos: int
    vector: torch.Tensor  # (D,)


LayerVisitor = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``on_layer(layer, seed indices (n,), gradient at that layer's MLP output (n, T', D))``."""


def _rms_scale(h: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS(h) per row: (T, 1). Computed in float32 like HF's LlamaRMSNorm."""
    return torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)


class LocalReplacement:
    """The prompt's frozen replacement model: its constants, features, errors and linear maps.

    Build it with :meth:`build`; everything is float32 on the CPU. Shapes: ``T`` positions, ``L`` layers,
    ``D`` d_model, ``H`` query heads, ``H_kv`` key/value heads, ``F`` features per layer, ``V`` vocab.
    """

    def __init__(self) -> None:  # filled by build()
        self.input_ids: torch.Tensor = torch.empty(0, dtype=torch.long)  # (T,)
        self.clt: CrossLayerTranscoder
        self.layers: list[_Layer] = []
        self.n_heads = 0
        self.n_kv_heads = 0
        self.d_head = 0
        self.embed: torch.Tensor = torch.empty(0)  # (T, D) token embeddings of the prompt
        self.rstd1: torch.Tensor = torch.empty(0)  # (L, T, 1) frozen 1/RMS before attention
        self.rstd2: torch.Tensor = torch.empty(0)  # (L, T, 1) frozen 1/RMS before the MLP
        self.rstd_final: torch.Tensor = torch.empty(0)  # (T, 1)
        self.w_final: torch.Tensor = torch.empty(0)  # (D,) final norm weight
        self.W_U: torch.Tensor = torch.empty(0)  # (V, D) unembedding
        self.b_U: torch.Tensor | None = None  # (V,)
        self.patterns: torch.Tensor = torch.empty(0)  # (L, H, T, T) frozen attention probabilities
        self.mlp_in: torch.Tensor = torch.empty(0)  # (L, T, D) true MLP inputs
        self.mlp_out: torch.Tensor = torch.empty(0)  # (L, T, D) true MLP outputs
        self.acts: torch.Tensor = torch.empty(0)  # (L, T, F) feature activations (0 where left out)
        self.errors: torch.Tensor = torch.empty(0)  # (L, T, D) error nodes e = y − reconstruction
        self.logits: torch.Tensor = torch.empty(0)  # (T, V) the real model's logits
        self.excluded: tuple[int, ...] = ()  # positions whose features are left out (all error)

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        clt: CrossLayerTranscoder,
        input_ids: Sequence[int] | torch.Tensor,
        exclude_bos: bool = True,
    ) -> LocalReplacement:
        """Run the real model once over ``input_ids`` and freeze what the replacement needs.

        ``exclude_bos``: leave position 0's features out (its MLP output becomes one error node), as
        circuit-tracer does: the attention sink's activations are huge and off the transcoder's training
        distribution. Positions above the CLT's ``norm_cap`` are left out the same way.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        T = int(ids.numel())
        if T == 0:
            raise InvalidInput("the prompt has no tokens")
        blocks = decoder_layers(model)
        L = len(blocks)
        if clt.n_layers != L:
            raise InvalidInput(f"the transcoder covers {clt.n_layers} layers, the model has {L}")
        cfg: Any = getattr(model, "config", None)
        H = int(cfg.num_attention_heads)
        H_kv = int(cfg.num_key_value_heads)
        d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // H)
        if clt.cfg.d_model != int(cfg.hidden_size):
            raise InvalidInput(f"transcoder d_model {clt.cfg.d_model} ≠ model hidden size {cfg.hidden_size}")
        base: Any = getattr(model, "model", model)
        lm_head: Any = getattr(model, "lm_head", None)
        if lm_head is None:
            raise InvalidInput(f"{type(model).__name__} has no lm_head: attribution needs the logits")

        self = cls()
        self.input_ids = ids
        # float32 throughout; a half-precision transcoder is copied, never converted in place.
        self.clt = clt if clt.W_enc.dtype == torch.float32 else copy.deepcopy(clt).float()
        self.n_heads, self.n_kv_heads, self.d_head = H, H_kv, d_head
        f32 = torch.float32

        def w(t: Any) -> torch.Tensor:
            return t.detach().to(f32)

        def maybe(t: Any) -> torch.Tensor | None:
            return None if t is None else w(t)

        h = w(base.embed_tokens(ids))  # (T, D)
        self.embed = h.clone()
        pos_ids = torch.arange(T)[None]
        cos, sin = (w(t[0]) for t in base.rotary_emb(h[None], pos_ids))  # (T, d_head)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        rstd1, rstd2, pats, xs, ys = [], [], [], [], []
        for blk in blocks:
            attn: Any = blk.self_attn
            ln1: Any = blk.input_layernorm
            ln2: Any = blk.post_attention_layernorm
            mlp: Any = blk.mlp
            self.layers.append(
                _Layer(
                    w_ln1=w(ln1.weight),
                    w_ln2=w(ln2.weight),
                    W_v=w(attn.v_proj.weight),
                    b_v=maybe(attn.v_proj.bias),
                    W_o=w(attn.o_proj.weight),
                    b_o=maybe(attn.o_proj.bias),
                )
            )
            r1 = _rms_scale(h, float(ln1.variance_epsilon))
            xn = h * r1 * self.layers[-1].w_ln1
            q = w(attn.q_proj(xn.to(attn.q_proj.weight.dtype))).view(T, H, d_head)
            k = w(attn.k_proj(xn.to(attn.k_proj.weight.dtype))).view(T, H_kv, d_head)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = k.repeat_interleave(H // H_kv, dim=1)  # (T, H, d_head)
            scale = float(getattr(attn, "scaling", d_head**-0.5))
            scores = torch.einsum("thd,shd->hts", q, k) * scale
            pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (H, T, T)
            h = h + self._attn_out(len(self.layers) - 1, xn, pattern)
            r2 = _rms_scale(h, float(ln2.variance_epsilon))
            x_in = h * r2 * self.layers[-1].w_ln2
            y = w(mlp(x_in.to(_dtype(mlp))))
            h = h + y
            rstd1.append(r1)
            rstd2.append(r2)
            pats.append(pattern)
            xs.append(x_in)
            ys.append(y)
        norm: Any = base.norm
        self.rstd_final = _rms_scale(h, float(norm.variance_epsilon))
        self.w_final = w(norm.weight)
        self.W_U = w(lm_head.weight)
        self.b_U = maybe(getattr(lm_head, "bias", None))
        self.logits = self._unembed(h * self.rstd_final * self.w_final)
        self.rstd1, self.rstd2 = torch.stack(rstd1), torch.stack(rstd2)
        self.patterns = torch.stack(pats)
        self.mlp_in, self.mlp_out = torch.stack(xs), torch.stack(ys)

        # Features and error nodes.
        excluded = {0} if exclude_bos else set()
        cap = clt.cfg.norm_cap
        if cap:
            norms = self.mlp_out.norm(dim=-1)  # (L, T)
            over = (norms > torch.tensor(cap, dtype=f32)[:, None]).any(0)
            excluded |= {int(p) for p in over.nonzero().flatten()}
        self.excluded = tuple(sorted(excluded))
        acts = torch.stack([self.clt.encode(self.mlp_in[i], i) for i in range(L)])  # (L, T, F)
        if self.excluded:
            acts[:, list(self.excluded)] = 0.0
        self.acts = acts
        self.errors = self.mlp_out - self._reconstruct(self.acts, self.mlp_in)
        return self

    # ------------------------------------------------------------------ shapes
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def d_model(self) -> int:
        return int(self.embed.shape[-1])

    # ------------------------------------------------------------------ pieces of the forward
    def _attn_out(self, l: int, xn: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Attention output of layer ``l`` for normed input xn (…, T, D) under ``pattern`` (H, T, T)."""
        lay = self.layers[l]
        v = torch.nn.functional.linear(xn, lay.W_v, lay.b_v)  # (…, T, H_kv·d)
        v = v.unflatten(-1, (self.n_kv_heads, self.d_head)).repeat_interleave(
            self.n_heads // self.n_kv_heads, dim=-2
        )  # (…, T, H, d)
        o = torch.einsum("hts,...shd->...thd", pattern, v).flatten(-2)  # (…, T, H·d)
        return torch.nn.functional.linear(o, lay.W_o, lay.b_o)

    def _reconstruct(self, acts: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Transcoder reconstruction of every MLP output: acts (L, T, F), x_in (L, T, D) → (L, T, D)."""
        clt = self.clt
        out = clt.b_dec[:, None, :].expand_as(x_in).clone()
        for l in range(self.n_layers):
            for i in clt.sources(l):
                out[l] += acts[i] @ clt.decoder(i, l)
            out[l] += clt.skip_out(x_in[l], l)
        return out

    def _unembed(self, xf: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(xf, self.W_U, self.b_U)

    def logit_direction(self, token: int) -> torch.Tensor:
        """circuit-tracer's logit target direction: the demeaned unembedding ``W_U[tok] − mean_v W_U[v]``."""
        return self.W_U[token] - self.W_U.mean(0)

    # ------------------------------------------------------------------ the frozen model
    @torch.no_grad()
    def frozen_forward(
        self,
        acts: torch.Tensor | None = None,
        errors: torch.Tensor | None = None,
        embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the replacement model with the given sources (default: the real ones): feature activations
        ``acts`` (L, T, F), error nodes ``errors`` (L, T, D), token embeddings ``embed`` (T, D).

        Patterns and norm denominators stay frozen. Returns (MLP inputs (L, T, D), logits (T, V)); with the
        real sources both equal the real model's (up to float rounding).
        """
        acts = self.acts if acts is None else acts
        errs = self.errors if errors is None else errors
        clt = self.clt
        h = (self.embed if embed is None else embed).clone()
        xs = []
        for l, lay in enumerate(self.layers):
            h = h + self._attn_out(l, h * self.rstd1[l] * lay.w_ln1, self.patterns[l])
            x_in = h * self.rstd2[l] * lay.w_ln2
            y = clt.b_dec[l] + clt.skip_out(x_in, l) + errs[l]
            for i in clt.sources(l):
                y = y + acts[i] @ clt.decoder(i, l)
            h = h + y
            xs.append(x_in)
        return torch.stack(xs), self._unembed(h * self.rstd_final * self.w_final)

    @torch.no_grad()
    def backward(self, seeds: Sequence[Injection], on_layer: LayerVisitor) -> torch.Tensor:
        """Gradients of B targets w.r.t. every MLP output and every token embedding, by hand.

        Target b is ``seeds[b].vector · z`` where z is the MLP input of layer ``seeds[b].layer`` at
        ``seeds[b].pos`` (a feature pre-activation) or, for ``layer == L``, the final norm's output (a logit
        direction). Only positions up to the latest seed and layers up to the highest seed are visited:
        nothing above or after them can reach a target (causal attention).

        ``on_layer(l, idx, g)`` receives, from the top layer down, ``g`` (n, T', D) = ∂target / ∂(MLP output
        of layer l at each position) for the seeds ``idx`` (n,) (indices into ``seeds``; the others are
        zero there), recorded before a target's own layer injects, so a feature never feeds its own layer's
        targets. Returns ``g_embed`` (T', B, D): ∂target_b / ∂(embedding at t). ``T' = 1 + max seed
        position``. Streaming the layers keeps memory at O(B·T'·D) instead of O(B·T'·L·D).
        """
        if not seeds:
            raise InvalidInput("backward needs at least one target")
        L, D, B = self.n_layers, self.d_model, len(seeds)
        Tp = 1 + max(s.pos for s in seeds)
        top = max(s.layer for s in seeds)
        if top > L or Tp > self.n_pos or min(s.pos for s in seeds) < 0:
            raise InvalidInput(f"seed outside the prompt: layers 0..{L}, positions 0..{self.n_pos - 1}")
        # Work on the seeds sorted by layer, highest first: a seed is zero above its own layer, so at layer l
        # only the prefix of seeds at layers ≥ l is computed (about half the work for spread-out targets).
        order = sorted(range(B), key=lambda b: -seeds[b].layer)
        perm = torch.tensor(order)
        layer_of = torch.tensor([seeds[b].layer for b in order])

        def inject(g: torch.Tensor, layer: int, scale: torch.Tensor | None) -> None:
            for r, b in enumerate(order):
                s = seeds[b]
                if s.layer == layer:
                    vec = s.vector.to(torch.float32)
                    g[r, s.pos] += vec if scale is None else vec * scale[s.pos]

        g_h = torch.zeros(B, Tp, D)  # ∂target / ∂(residual stream after the current layer), sorted order
        # Logit seeds enter through the frozen final norm: xf = h · rstd · w.
        inject(g_h, L, (self.rstd_final[:Tp] * self.w_final))
        groups = self.n_heads // self.n_kv_heads
        pats = self.patterns[:, :, :Tp, :Tp].unflatten(1, (self.n_kv_heads, groups))  # (L, H_kv, G, T', T')
        W_skip = self.clt.W_skip
        for l in range(min(top, L - 1), -1, -1):
            lay = self.layers[l]
            n = int((layer_of >= l).sum())
            h = g_h[:n]
            on_layer(l, perm[:n], h)  # the MLP output adds straight into the stream: same gradient
            # MLP input: the skip path (y = x W_skipᵀ) plus the targets reading this layer's MLP input.
            g_x = h @ W_skip[l] if W_skip is not None else torch.zeros_like(h)
            inject(g_x, l, None)
            h = h + g_x * (self.rstd2[l, :Tp] * lay.w_ln2)
            # Attention through the frozen pattern: o = P v, v = W_v xn, out = W_o o.
            g_o = (h @ lay.W_o).unflatten(-1, (self.n_kv_heads, groups, self.d_head))  # (n, T', H_kv, G, d)
            # Query head (k, g) reads value head k: sum over the group and the query positions at once.
            g_v = torch.einsum("kgts,btkgd->bskd", pats[l], g_o).flatten(-2)  # (n, T', H_kv·d)
            g_h[:n] = h + (g_v @ lay.W_v) * (self.rstd1[l, :Tp] * lay.w_ln1)
        g_embed = torch.empty(Tp, B, D)
        g_embed[:, perm] = g_h.transpose(0, 1)
        return g_embed


def _dtype(mod: nn.Module) -> torch.dtype:
    for p in mod.parameters():
        return p.dtype
    return torch.float32
