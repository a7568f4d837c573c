"""Build an attribution graph for one prompt on its local replacement model.

Nodes (circuit-tracer's order): the selected active features, one error node per (layer, position), one
token node per position, and the target logits at the last position. Edges are direct effects under the
frozen replacement: ``A[t, s] = (source vector of s) · ∂t/∂(where s writes)``, which for a feature is
``a_s · Σ_l W_dec[s → l] · g_l`` (every layer it writes to), for an error node ``e · g_l``, for a token its
embedding · ∂t/∂embedding. Targets are feature pre-activations and logit directions.

Rows are computed in batches of targets (one hand-written backward pass each, ``LocalReplacement.backward``);
features are visited in order of their estimated influence on the logits so far, up to
``max_feature_nodes``; features never visited keep their columns (edges into visited nodes) only until the
adjacency is cut down to the selected ones, as circuit-tracer does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from residue_monitor.detectors.attribution.prune import Layout, graph_scores
from residue_monitor.detectors.attribution.replacement import Injection, LocalReplacement
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import InvalidInput

logger = logging.getLogger(__name__)

TargetKind = Literal["emitted", "eos", "token", "contrast"]
TARGET_KINDS: tuple[TargetKind, ...] = ("emitted", "eos", "token", "contrast")
ProgressFn = Callable[[int, int], None]
"""progress(features visited, features to visit)."""


@dataclass(frozen=True)
class TargetSpec:
    """What the graph explains, at the prompt's last position."""

    kind: TargetKind = "emitted"
    """``emitted``: the most likely tokens up to ``logit_cum_prob`` (at most ``max_logits``), the emitted
    one first (circuit-tracer's default); ``eos``: the end-of-sequence token, why the model would stop
    (null outputs); ``token``: ``token_id``; ``contrast``: ``token_id`` against ``contrast_token_id``,
    the direction ``u_expected − u_actual``."""
    token_id: int | None = None
    contrast_token_id: int | None = None
    emitted_token_id: int | None = None
    """The token actually emitted (sampling, or a replayed request); default: the argmax."""

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise InvalidInput(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if self.kind in ("token", "contrast") and self.token_id is None:
            raise InvalidInput(f"target kind {self.kind!r} needs token_id")
        if self.kind == "contrast" and self.contrast_token_id is None:
            raise InvalidInput("target kind 'contrast' needs contrast_token_id")


@dataclass(frozen=True)
class GraphConfig:
    """Budget and pruning of one graph (circuit-tracer's defaults where it has them)."""

    max_feature_nodes: int = 1024
    """Most features to compute input edges for; the rest keep no node."""
    batch_size: int = 64
    """Targets per backward pass."""
    max_logits: int = 10
    """``emitted`` targets: at most this many logits ..."""
    logit_cum_prob: float = 0.95
    """... or fewer, once their probabilities reach this."""
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    exclude_bos: bool = True
    """Position 0's features are left out (its MLP output is one error node), as circuit-tracer does."""
    decoder_cache_bytes: int = 1 << 30
    """Gathered decoder rows are kept across batches up to this size; above it they are gathered per batch."""

    def __post_init__(self) -> None:
        if self.max_feature_nodes < 0 or self.batch_size < 1 or self.max_logits < 1:
            raise InvalidInput("max_feature_nodes must be ≥ 0, batch_size and max_logits ≥ 1")
        if not 0 < self.logit_cum_prob <= 1:
            raise InvalidInput(f"logit_cum_prob must be in (0, 1], got {self.logit_cum_prob}")
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise InvalidInput(f"{name} must be in (0, 1], got {v}")


@dataclass(frozen=True)
class Target:
    """One logit node."""

    token: str
    """Its label (the decoded token, or ``"a − b"`` for a contrast)."""
    vocab_idx: int
    """The token id; ``vocab_size + i`` for the i-th custom direction (circuit-tracer's virtual index)."""
    direction: torch.Tensor = field(repr=False)
    """(D,) direction in the final norm's output space: demeaned ``W_U[tok]`` or ``W_U[a] − W_U[b]``."""
    weight: float
    """Its weight in influence and pruning (the probability for ``emitted``, 1 for single targets)."""
    prob: float
    """The model's probability of the token (contrast: of the first token)."""


@dataclass(frozen=True, eq=False)
class AttributionGraph:
    """An unpruned attribution graph and what it was computed from. Node order: ``[selected features,
    errors (layer-major: layer · T + pos), tokens (T), logits]``."""

    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    """(T,) decoded tokens (for labels and the JSON's ``prompt_tokens``)."""
    n_layers: int
    targets: tuple[Target, ...]
    active_features: torch.Tensor  # (n_active, 3) int64 rows (layer, pos, feature), sorted
    activations: torch.Tensor  # (n_active,) their activations
    selected: torch.Tensor  # (n_sel,) indices into active_features, in visit order
    adjacency: torch.Tensor  # (N, N) float32, [target, source]
    feature_influence: torch.Tensor
    """(n_active,) share of the targets' influence passing through each active feature, estimated from
    the rows computed (features never reached by a computed row get 0)."""
    error_norm: torch.Tensor  # (L, T) ‖e‖ / ‖y‖: the error node's share of each MLP output
    excluded_positions: tuple[int, ...]
    logits: torch.Tensor = field(repr=False)  # (V,) logits at the last position
    replacement_score: float = 0.0
    completeness_score: float = 0.0
    seconds: float = 0.0
    clt_id: str = ""
    model: str = ""

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def layout(self) -> Layout:
        return Layout(int(self.selected.numel()), self.n_layers * self.n_pos, self.n_pos, len(self.targets))

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor([t.weight for t in self.targets], dtype=torch.float32)

    def node_of_error(self, layer: int, pos: int) -> int:
        return int(self.selected.numel()) + layer * self.n_pos + pos

    def node_of_token(self, pos: int) -> int:
        return int(self.selected.numel()) + self.n_layers * self.n_pos + pos


# ---------------------------------------------------------------------------- targets


def select_targets(
    rep: LocalReplacement, spec: TargetSpec, eos_id: int | None, cfg: GraphConfig,
    decode: Callable[[int], str],
) -> list[Target]:  # fmt: skip
    """Logit targets at the last position for ``spec``."""
    logits = rep.logits[-1]
    V = int(logits.numel())
    probs = torch.softmax(logits.double(), -1).float()

    def check(tok: int | None, what: str) -> int:
        if tok is None or not 0 <= tok < V:
            raise InvalidInput(f"{what} must be a token id in [0, {V}), got {tok}")
        return tok

    def single(tok: int) -> Target:
        return Target(decode(tok), tok, rep.logit_direction(tok), 1.0, float(probs[tok]))

    if spec.kind == "eos":
        return [single(check(eos_id, "the model's EOS token"))]
    if spec.kind == "token":
        return [single(check(spec.token_id, "token_id"))]
    if spec.kind == "contrast":
        a, b = check(spec.token_id, "token_id"), check(spec.contrast_token_id, "contrast_token_id")
        if a == b:
            raise InvalidInput("a contrast needs two different tokens")
        direction = rep.W_U[a] - rep.W_U[b]
        return [Target(f"{decode(a)} − {decode(b)}", V, direction, 1.0, float(probs[a]))]
    emitted = (
        int(logits.argmax()) if spec.emitted_token_id is None else check(spec.emitted_token_id, "emitted")
    )
    order = [emitted] + [int(t) for t in probs.argsort(descending=True) if int(t) != emitted]
    chosen: list[int] = []
    mass = 0.0
    for tok in order[: cfg.max_logits]:
        chosen.append(tok)
        mass += float(probs[tok])
        if mass >= cfg.logit_cum_prob:
            break
    return [Target(decode(t), t, rep.logit_direction(t), float(probs[t]), float(probs[t])) for t in chosen]


# ---------------------------------------------------------------------------- edges


class _EdgeReader:
    """Turns a batch's gradients into adjacency rows over all columns ``[active, errors, tokens]``.

    Source features of layer ``i`` are laid out per position, padded to the most features any position
    has, so each (source layer, target layer) pair is one batched matmul over positions,
    ``(T', B, D) @ (T', D, K)``, done as the backward pass streams through the layers.
    """

    def __init__(self, rep: LocalReplacement, active: torch.Tensor, acts: torch.Tensor, cache_bytes: int):
        self.rep = rep
        L, T, D = rep.n_layers, rep.n_pos, rep.d_model
        self.n_active = int(active.shape[0])
        self.n_cols = self.n_active + L * T + T
        clt = rep.clt
        self.slots: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, range]] = []
        # per source layer: (column index (T, K) or -1, activation (T, K), feature id (T, K), target layers)
        for i in range(L):
            rows = (active[:, 0] == i).nonzero().flatten()
            pos, feat = active[rows, 1], active[rows, 2]
            K = int(torch.bincount(pos, minlength=T).max()) if rows.numel() else 0
            col = torch.full((T, K), -1, dtype=torch.long)
            val = torch.zeros(T, K)
            fid = torch.zeros(T, K, dtype=torch.long)
            if K:
                # rank of each feature within its position (active is sorted by layer, pos, feature)
                first = torch.searchsorted(pos, pos)
                rank = torch.arange(pos.numel()) - first
                col[pos, rank] = rows
                val[pos, rank] = acts[rows]
                fid[pos, rank] = feat
            targets = range(i, L) if clt.is_cross_layer else range(i, i + 1)
            self.slots.append((col, val, fid, targets))
        total = sum(s[0].numel() * len(s[3]) * D * 4 for s in self.slots)
        self._cache: list[torch.Tensor | None] = [None] * L
        self.cached = total <= cache_bytes
        logger.debug("decoder rows: %.1f MB (%s)", total / 2**20, "cached" if self.cached else "per batch")

    def _decoders(self, i: int) -> torch.Tensor:
        """(n_targets, T, D, K) decoder rows of source layer i's padded features into each layer it writes
        (zeros for padding)."""
        hit = self._cache[i]
        if hit is not None:
            return hit
        col, _, fid, targets = self.slots[i]
        T, K = col.shape
        W = self.rep.clt.W_dec[i].detach()  # (F, D) or (F, L-i, D)
        rows = W[fid.flatten()].reshape(T, K, len(targets), self.rep.d_model)
        out = rows.permute(2, 0, 3, 1).contiguous()
        if self.cached:
            self._cache[i] = out
        return out

    def rows(self, rep: LocalReplacement, seeds: Sequence[Injection]) -> torch.Tensor:
        """Run the backward pass of ``seeds`` and return their adjacency rows (B, n_cols)."""
        B = len(seeds)
        L, T = rep.n_layers, rep.n_pos
        Tp = 1 + max(s.pos for s in seeds)
        # Per source layer: effect of each padded feature slot on each seed, before its activation.
        acc = [torch.zeros(Tp, B, s[0].shape[1]) for s in self.slots]
        err = torch.zeros(B, L, Tp)

        def on_layer(l: int, idx: torch.Tensor, g: torch.Tensor) -> None:
            g_t = g.transpose(0, 1)  # (T', n, D)
            for i in range(l + 1) if rep.clt.is_cross_layer else (l,):
                if acc[i].shape[2] == 0:
                    continue
                R = self._decoders(i)[l - i, :Tp] if rep.clt.is_cross_layer else self._decoders(i)[0, :Tp]
                acc[i][:, idx] += torch.bmm(g_t, R)  # (T', n, K)
            err[idx, l] = (g * rep.errors[l, :Tp]).sum(-1)

        g_embed = rep.backward(seeds, on_layer)
        out = torch.zeros(B, self.n_cols)
        for i, (col, val, _, _) in enumerate(self.slots):
            if col.shape[1] == 0:
                continue
            c = col[:Tp]
            keep = c >= 0  # (T', K)
            out[:, c[keep]] = (acc[i] * val[:Tp, None, :]).transpose(0, 1)[:, keep]
        base = self.n_active
        cols = base + (torch.arange(L)[:, None] * T + torch.arange(Tp)[None, :]).flatten()
        out[:, cols] = err.reshape(B, -1)
        out[:, base + L * T + torch.arange(Tp)] = torch.einsum("tbd,td->bt", g_embed, rep.embed[:Tp])
        return out


# ---------------------------------------------------------------------------- build


def partial_influence(
    rows_abs: torch.Tensor, n_logits: int, visited: torch.Tensor, weights: torch.Tensor, n_active: int
) -> torch.Tensor:
    """Influence of every active feature on the weighted logits through the rows computed so far.

    rows_abs (n_logits + k, n_cols): ``|rows|`` of the logits, then of the ``visited`` (k,) features, in
    that order; with M the row-normalised ``|rows|``, influence on the visited nodes solves
    ``y = w·M_logits[:, V] + y·M_visited[:, V]`` (a DAG, so the series ends), and every column's influence is
    ``w·M_logits + y·M_visited``. The normalisation is folded into the weight vectors, so M is never built.
    """
    inv = 1.0 / rows_abs.sum(1).clamp(min=1e-10)
    w = weights.to(torch.float32)
    a_log = w * inv[:n_logits]
    R_log, R_vis = rows_abs[:n_logits], rows_abs[n_logits:]
    y_total = a_log @ R_log[:, visited]
    cur = y_total
    sub = R_vis[:, visited] * inv[n_logits:, None]
    for _ in range(int(visited.numel()) + 1):
        cur = cur @ sub
        if not bool(cur.any()):
            break
        y_total = y_total + cur
    infl = a_log @ R_log[:, :n_active] + (y_total * inv[n_logits:]) @ R_vis[:, :n_active]
    return infl / w.sum().clamp(min=1e-12)


@torch.no_grad()
def build_graph(
    model: nn.Module,
    clt: CrossLayerTranscoder,
    input_ids: Sequence[int],
    target: TargetSpec | None = None,
    cfg: GraphConfig | None = None,
    eos_id: int | None = None,
    decode: Callable[[int], str] = str,
    progress: ProgressFn | None = None,
    deadline: float | None = None,
    clt_id: str | None = None,
) -> AttributionGraph:
    """The attribution graph of ``input_ids``'s next token (see the module docstring).

    ``decode`` turns a token id into its label; ``deadline`` (``time.monotonic()`` value) stops visiting
    features once passed, keeping the graph built so far (the summary says how many were visited).
    ``clt_id``: the transcoder's id when the caller has it (hashing every weight again costs ~0.3 s on
    SmolLM2's default transcoder).
    """
    t0 = time.monotonic()
    target = target or TargetSpec()
    cfg = cfg or GraphConfig()
    rep = LocalReplacement.build(model, clt, input_ids, exclude_bos=cfg.exclude_bos)
    L, T = rep.n_layers, rep.n_pos
    targets = select_targets(rep, target, eos_id, cfg, decode)
    n_logits = len(targets)
    weights = torch.tensor([t.weight for t in targets], dtype=torch.float32)

    active = rep.acts.nonzero()  # (n_active, 3): layer, pos, feature — sorted
    acts = rep.acts[active[:, 0], active[:, 1], active[:, 2]]
    reader = _EdgeReader(rep, active, acts, cfg.decoder_cache_bytes)
    n_active = reader.n_active
    budget = min(cfg.max_feature_nodes, n_active)
    rows = torch.zeros(n_logits + budget, reader.n_cols)
    rows_abs = torch.zeros_like(rows)  # |rows|, kept beside them for the influence estimates

    seeds = [Injection(L, T - 1, t.direction) for t in targets]
    for s in range(0, n_logits, cfg.batch_size):
        part = reader.rows(rep, seeds[s : s + cfg.batch_size])
        rows[s : s + part.shape[0]] = part
        rows_abs[s : s + part.shape[0]] = part.abs()

    W_enc = rep.clt.W_enc.detach()
    visited = torch.empty(0, dtype=torch.long)
    is_visited = torch.zeros(n_active, dtype=torch.bool)
    while visited.numel() < budget:
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("attribution deadline reached after %d of %d features", visited.numel(), budget)
            break
        infl = partial_influence(rows_abs[: n_logits + visited.numel()], n_logits, visited, weights, n_active)
        infl[is_visited] = -1.0
        n_next = min(cfg.batch_size, budget - int(visited.numel()))
        top = infl.topk(n_next)
        pick = top.indices[top.values > 0]
        if pick.numel() == 0:
            break  # nothing left reaches the targets
        # Sorted by position then layer, so a batch's backward stops at its latest position early.
        pick = pick[torch.argsort(active[pick, 1] * (L + 1) + active[pick, 0])]
        batch = [
            Injection(int(active[n, 0]), int(active[n, 1]), W_enc[active[n, 0], active[n, 2]]) for n in pick
        ]
        k = int(visited.numel())
        part = reader.rows(rep, batch)
        rows[n_logits + k : n_logits + k + pick.numel()] = part
        rows_abs[n_logits + k : n_logits + k + pick.numel()] = part.abs()
        visited = torch.cat([visited, pick])
        is_visited[pick] = True
        if progress is not None:
            progress(int(visited.numel()), budget)

    k = int(visited.numel())
    rows = rows[: n_logits + k]
    feature_influence = partial_influence(rows_abs[: n_logits + k], n_logits, visited, weights, n_active)
    del rows_abs
    feature_influence = feature_influence.clamp(min=0.0)

    layout = Layout(k, L * T, T, n_logits)
    keep_cols = torch.cat([visited, n_active + torch.arange(L * T + T)])
    A = torch.zeros(layout.n, layout.n)
    A[:k, : layout.tokens.stop] = rows[n_logits:][:, keep_cols]
    A[layout.logits, : layout.tokens.stop] = rows[:n_logits][:, keep_cols]
    replacement, completeness = graph_scores(A, layout, weights)

    y_norm = rep.mlp_out.norm(dim=-1).clamp(min=1e-12)  # (L, T)
    return AttributionGraph(
        input_ids=tuple(int(t) for t in rep.input_ids),
        tokens=tuple(decode(int(t)) for t in rep.input_ids),
        n_layers=L,
        targets=tuple(targets),
        active_features=active,
        activations=acts,
        selected=visited,
        adjacency=A,
        feature_influence=feature_influence,
        error_norm=rep.errors.norm(dim=-1) / y_norm,
        excluded_positions=rep.excluded,
        logits=rep.logits[-1].clone(),
        replacement_score=replacement,
        completeness_score=completeness,
        seconds=time.monotonic() - t0,
        clt_id=clt_id if clt_id is not None else clt.clt_id(),
        model=str(getattr(getattr(model, "config", None), "name_or_path", "") or ""),
    )


def estimate_bytes(n_pos: int, n_layers: int, d_model: int, n_features: int, k_per_token: int,
                   cfg: GraphConfig, cross_layer: bool = False) -> int:  # fmt: skip
    """Rough peak memory of :func:`build_graph` beyond the model and transcoder weights (the Trace RPC
    refuses requests above its budget with this, before allocating anything)."""
    n_active = n_layers * n_pos * k_per_token
    n_cols = n_active + n_layers * n_pos + n_pos
    rows = (cfg.max_logits + min(cfg.max_feature_nodes, n_active)) * n_cols
    grads = n_pos * cfg.batch_size * n_layers * d_model * 2
    frozen = n_layers * n_pos * (n_features + 4 * d_model) + n_layers * 16 * n_pos * n_pos
    span = (n_layers + 1) / 2 if cross_layer else 1
    decoders = min(n_active * d_model * span, cfg.decoder_cache_bytes / 4)
    n_nodes = min(cfg.max_feature_nodes, n_active) + n_layers * n_pos + n_pos + cfg.max_logits
    return int(4 * (rows * 2 + grads + frozen + decoders + 3 * n_nodes * n_nodes))
