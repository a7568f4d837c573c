"""What a person reads first about a graph: scores, strongest nodes, paths, error per layer, and the
null-output view (active features at the final position that never reach the target).

The papers' error-accumulation view is ``error_share_per_layer``: the share of the target's influence that
ends in each layer's error nodes, i.e. where the replacement model stops explaining the computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residue_monitor.detectors.attribution.graph import AttributionGraph
from residue_monitor.detectors.attribution.prune import Pruned, prune

UNREACHED_RATIO = 0.1
"""A feature active at the final position "fails to reach" the output when its share of that position's
influence on the target is below this fraction of its share of the position's activation: it fires, but
passes on less than a tenth of what its activation would carry if every feature were equally effective.
(An absolute cut does not work: on SmolLM2 the influence of ~60 k active features is spread so thin that
the strongest single feature holds 0.2 %.)"""


@dataclass(frozen=True)
class NodeInfo:
    """One node of the graph, for summaries and the gRPC answer."""

    node: int
    """Index in the adjacency matrix."""
    kind: str
    """``feature`` | ``error`` | ``token`` | ``logit``."""
    layer: int
    """Layer (−1 for tokens, ``L`` for logits)."""
    pos: int
    feature: int
    """Transcoder feature id; −1 for other kinds (a logit: its vocab index)."""
    influence: float
    """Share of the weighted targets' influence passing through the node."""
    activation: float
    label: str


@dataclass(frozen=True)
class GraphSummary:
    target: str
    replacement_score: float
    completeness_score: float
    n_active: int
    n_selected: int
    n_nodes_kept: int
    n_edges_kept: int
    top_features: tuple[NodeInfo, ...]
    top_errors: tuple[NodeInfo, ...]
    paths: tuple[tuple[tuple[str, ...], float], ...]
    """Strongest chains from a source to the main target, with the product of their normalised weights."""
    error_share_per_layer: tuple[float, ...]
    """(L,) share of the target's influence ending in each layer's error nodes."""
    error_norm_last: tuple[float, ...]
    """(L,) ‖error‖ / ‖MLP output‖ at the last position."""
    unreached: tuple[NodeInfo, ...]
    """Active features at the last position that pass on under ``UNREACHED_RATIO`` of their activation
    share, strongest activation first (the null-output report)."""
    unreached_activation_share: float
    """Their share of the last position's total feature activation."""
    seconds: float


def node_info(g: AttributionGraph, node: int, influence: torch.Tensor) -> NodeInfo:
    """Describe adjacency node ``node`` with its influence share (``influence`` over all N nodes)."""
    lay = g.layout
    share = float(influence[node])
    if node < lay.n_features:
        a = int(g.selected[node])
        l, p, f = (int(v) for v in g.active_features[a])
        act = float(g.activations[a])
        return NodeInfo(node, "feature", l, p, f, share, act, f"L{l}/F{f}@{p} {g.tokens[p]!r}")
    if node < lay.tokens.start:
        l, p = divmod(node - lay.n_features, g.n_pos)
        return NodeInfo(node, "error", l, p, -1, share, 0.0, f"error L{l}@{p} {g.tokens[p]!r}")
    if node < lay.logits.start:
        p = node - lay.tokens.start
        return NodeInfo(node, "token", -1, p, -1, share, 0.0, f"token {g.tokens[p]!r}@{p}")
    t = g.targets[node - lay.logits.start]
    return NodeInfo(node, "logit", g.n_layers, g.n_pos - 1, t.vocab_idx, share, t.prob, f"logit {t.token!r}")


def top_paths(
    g: AttributionGraph, pruned: Pruned, n_paths: int = 5, max_len: int = 64
) -> list[tuple[list[int], float]]:
    """Greedy strongest chains into the main target (logit 0) through the pruned graph: start from each of
    its ``n_paths`` strongest inputs, then follow the strongest input until a node with none."""
    A = g.adjacency * pruned.edge_mask
    An = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12)
    start = g.layout.logits.start
    firsts = An[start].topk(min(n_paths, int((An[start] > 0).sum()))).indices.tolist()
    out: list[tuple[list[int], float]] = []
    for s in firsts:
        chain, strength, node = [start, s], float(An[start, s]), s
        while len(chain) < max_len and bool(An[node].any()):
            nxt = int(An[node].argmax())
            strength *= float(An[node, nxt])
            chain.append(nxt)
            node = nxt
        out.append((chain[::-1], strength))
    return out


def summarize(g: AttributionGraph, pruned: Pruned | None = None, n_top: int = 10) -> GraphSummary:
    """The headline view of ``g`` (pruned at its own thresholds when ``pruned`` is not given)."""
    pruned = pruned or prune(g.adjacency, g.layout, g.weights)
    lay = g.layout
    influence = pruned.node_influence / g.weights.sum().clamp(min=1e-12)
    feats = torch.arange(lay.n_features)
    feats = feats[influence[feats].argsort(descending=True)][:n_top]
    errs = torch.arange(lay.errors.start, lay.errors.stop)
    errs = errs[influence[errs].argsort(descending=True)][:n_top]
    err_layer = influence[lay.errors].reshape(g.n_layers, g.n_pos).sum(1)

    last = g.n_pos - 1
    at_last = (g.active_features[:, 1] == last).nonzero().flatten()
    act_share = g.activations[at_last] / g.activations[at_last].sum().clamp(min=1e-12)
    infl_share = g.feature_influence[at_last] / g.feature_influence[at_last].sum().clamp(min=1e-12)
    weak = at_last[infl_share < UNREACHED_RATIO * act_share]
    weak = weak[g.activations[weak].argsort(descending=True)]
    total_last = float(g.activations[at_last].sum())
    unreached = []
    for a in weak[:n_top].tolist():
        l, p, f = (int(v) for v in g.active_features[a])
        unreached.append(
            NodeInfo(
                -1,
                "feature",
                l,
                p,
                f,
                float(g.feature_influence[a]),
                float(g.activations[a]),
                f"L{l}/F{f}@{p} {g.tokens[p]!r}",
            )
        )
    main = g.targets[0]
    kinds = "contrast " if main.vocab_idx >= g.logits.numel() else ""
    return GraphSummary(
        target=f"{kinds}{main.token!r} (p={main.prob:.3f})"
        + (f" +{len(g.targets) - 1} more" if len(g.targets) > 1 else ""),
        replacement_score=g.replacement_score,
        completeness_score=g.completeness_score,
        n_active=int(g.active_features.shape[0]),
        n_selected=lay.n_features,
        n_nodes_kept=int(pruned.node_mask.sum()),
        n_edges_kept=int(pruned.edge_mask.sum()),
        top_features=tuple(node_info(g, int(n), influence) for n in feats),
        top_errors=tuple(node_info(g, int(n), influence) for n in errs),
        paths=tuple(
            (tuple(node_info(g, n, influence).label for n in chain), s) for chain, s in top_paths(g, pruned)
        ),
        error_share_per_layer=tuple(float(v) for v in err_layer),
        error_norm_last=tuple(float(v) for v in g.error_norm[:, last]),
        unreached=tuple(unreached),
        unreached_activation_share=float(g.activations[weak].sum()) / total_last if total_last > 0 else 0.0,
        seconds=g.seconds,
    )


def render_text(s: GraphSummary) -> str:
    """The summary as plain text (CLI output and TraceResult.summary)."""
    lines = [
        f"target: {s.target}",
        f"replacement score {s.replacement_score:.3f}   completeness score {s.completeness_score:.3f}",
        f"features: {s.n_active} active, {s.n_selected} traced; pruned graph: {s.n_nodes_kept} nodes, "
        f"{s.n_edges_kept} edges; {s.seconds:.1f} s",
        "",
        "strongest features (share of influence):",
        *(f"  {n.influence:7.3f}  {n.label}  act={n.activation:.3g}" for n in s.top_features),
        "strongest error nodes:",
        *(f"  {n.influence:7.3f}  {n.label}" for n in s.top_errors),
        "top paths (source → … → target, strength):",
        *(f"  {w:.3g}  " + " → ".join(p) for p, w in s.paths),
        "error accumulation (layer: influence ending in its error nodes | ‖error‖/‖mlp out‖, last token):",
        *(
            f"  L{l:<3d} {share:6.3f} {'█' * round(share * 40):<40s} | {norm:.2f}"
            for l, (share, norm) in enumerate(zip(s.error_share_per_layer, s.error_norm_last, strict=True))
        ),
        f"unreached at the last position: {s.unreached_activation_share:.1%} of its feature activation "
        f"passes on < {UNREACHED_RATIO:g}× its share of influence; strongest {len(s.unreached)}:",
        *(f"  act={n.activation:.3g}  {n.label}" for n in s.unreached),
    ]
    return "\n".join(lines) + "\n"
