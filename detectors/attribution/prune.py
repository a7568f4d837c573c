"""Influence, pruning and graph scores on an adjacency matrix (circuit-tracer's definitions, FACTS-clt.md).

The adjacency ``A`` is (N, N) with ``A[target, source]`` the direct effect of source on target; nodes are
ordered ``[features (n_f), errors (n_e), tokens (n_t), logits (n_l)]``. Row-normalising ``|A|`` turns each
row into "where this node's input comes from"; a node's influence is the total, over all paths, of the
logit weight flowing back to it: ``w (Â + Â² + …)``, finite because the graph is a DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residue_monitor.detectors.exceptions import InvalidInput


@dataclass(frozen=True, eq=False)
class Layout:
    """How many nodes of each kind, in adjacency order."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def n(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def errors(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def tokens(self) -> slice:
        s = self.n_features + self.n_errors
        return slice(s, s + self.n_tokens)

    @property
    def logits(self) -> slice:
        return slice(self.n - self.n_logits, self.n)


@dataclass(frozen=True, eq=False)
class Pruned:
    """What survives pruning, and every node's cumulative influence rank (circuit-tracer's ``influence``
    field: the share of total influence held by this node and every node stronger than it)."""

    node_mask: torch.Tensor  # (N,) bool
    edge_mask: torch.Tensor  # (N, N) bool, [target, source]
    cumulative: torch.Tensor  # (N,) in (0, 1]; logits are 0 (they are the targets)
    node_influence: torch.Tensor  # (N,) influence of each node on the weighted targets, before pruning


def normalize_rows(A: torch.Tensor) -> torch.Tensor:
    """``|A|`` with every row scaled to sum to 1 (rows of zeros stay zero)."""
    a = A.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def propagate(A_norm: torch.Tensor, w: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """``w Â + w Â² + …`` for a row-normalised DAG adjacency: the influence of every node on ``w``."""
    cur = w @ A_norm
    total = cur.clone()
    for _ in range(max_iter):
        if not bool(cur.any()):
            return total
        cur = cur @ A_norm
        total += cur
    raise InvalidInput("influence did not converge: the adjacency matrix has a cycle")


def logit_weights(layout: Layout, weights: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(layout.n, dtype=torch.float32)
    w[layout.logits] = weights.to(torch.float32)
    return w


def threshold_at(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score among the strongest entries that together hold ``fraction`` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = float(s.sum())
    if total <= 0:
        return float("inf")
    cum = s.cumsum(0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), s.numel() - 1)
    return float(s[i])


def prune(
    A: torch.Tensor, layout: Layout, weights: torch.Tensor, node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:  # fmt: skip
    """Keep the nodes holding ``node_threshold`` of the influence (tokens and logits always), then the
    edges holding ``edge_threshold`` of the edge influence among them, then drop features and errors left
    without an outgoing edge and features without an incoming one, until nothing changes."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < v <= 1.0:
            raise InvalidInput(f"{name} must be in (0, 1], got {v}")
    w = logit_weights(layout, weights)
    influence = propagate(normalize_rows(A), w)
    node_mask = influence >= threshold_at(influence, node_threshold)
    node_mask[layout.tokens.start :] = True

    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    Pn = normalize_rows(pruned)
    edge_scores = Pn * (propagate(Pn, w) + w)[:, None]
    edge_mask = edge_scores >= threshold_at(edge_scores, edge_threshold)

    sources_end = layout.tokens.start  # features and errors: they must feed something kept
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask[:sources_end] &= edge_mask[:, :sources_end].any(0)
        node_mask[: layout.n_features] &= edge_mask[: layout.n_features].any(1)
        if torch.equal(node_mask, before):
            break
    edge_mask &= node_mask[:, None] & node_mask[None, :]

    order = influence.argsort(descending=True)
    total = float(influence.sum())
    cum = torch.zeros_like(influence)
    if total > 0:
        cum[order] = influence[order].cumsum(0) / total
    return Pruned(node_mask=node_mask, edge_mask=edge_mask, cumulative=cum, node_influence=influence)


def graph_scores(A: torch.Tensor, layout: Layout, weights: torch.Tensor) -> tuple[float, float]:
    """(replacement score, completeness score) of an unpruned graph.

    Replacement: of the influence that ends in a source with no inputs (tokens, errors), the share that
    ends in tokens, i.e. is explained by features all the way down. Completeness: the influence-weighted
    share of every node's input that does not come straight from an error node.
    """
    w = logit_weights(layout, weights)
    An = normalize_rows(A)
    influence = propagate(An, w)
    tok = float(influence[layout.tokens].sum())
    err = float(influence[layout.errors].sum())
    replacement = tok / (tok + err) if tok + err > 0 else 0.0
    non_error = 1.0 - An[:, layout.errors].sum(dim=1)
    out = influence + w
    completeness = float((non_error * out).sum() / out.sum()) if float(out.sum()) > 0 else 0.0
    return replacement, completeness
