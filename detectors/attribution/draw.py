# pyright: reportUnknownMemberType=false
# (matplotlib's stubs leave **kwargs unannotated, so every Axes method is "partially unknown".)
"""The pruned graph as a PNG trace map: token positions across, layers up, edges between.

Tokens sit on the bottom row, logits on the top row, features (circles) and error nodes (squares) at
their (position, layer), spread within the cell when several share one. Edge colour is the sign (blue
excites, red inhibits), width and opacity the weight's magnitude relative to the strongest edge drawn.
Built on a matplotlib ``Figure`` with the Agg canvas, never pyplot (no global state, thread-safe).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from residue_monitor.detectors.attribution.graph import AttributionGraph
from residue_monitor.detectors.attribution.prune import Pruned, prune
from residue_monitor.detectors.exceptions import InvalidInput

MAX_EDGES = 3000
"""The strongest edges drawn; a denser picture is unreadable anyway."""


def _short(tok: str, n: int = 10) -> str:
    tok = tok.replace("\n", "⏎").replace("\t", "→")
    tok = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in tok)  # fonts lack control glyphs
    return tok if len(tok) <= n else tok[: n - 1] + "…"


def node_xy(g: AttributionGraph, pruned: Pruned) -> dict[int, tuple[float, float]]:
    """Plot coordinates of every kept node: x = position (+ spread), y = layer (tokens −1, logits L)."""
    lay = g.layout
    cells: dict[tuple[int, int], list[int]] = {}
    for i in pruned.node_mask.nonzero().flatten().tolist():
        if i < lay.n_features:
            a = int(g.selected[i])
            key = (int(g.active_features[a, 0]), int(g.active_features[a, 1]))
        elif i < lay.tokens.start:
            key = divmod(i - lay.n_features, g.n_pos)
        elif i < lay.logits.start:
            key = (-1, i - lay.tokens.start)
        else:
            key = (g.n_layers, g.n_pos - 1)
        cells.setdefault(key, []).append(i)
    xy: dict[int, tuple[float, float]] = {}
    for (layer, pos), members in cells.items():
        n = len(members)
        for j, i in enumerate(members):
            dx = 0.0 if n == 1 else (j / (n - 1) - 0.5) * 0.8
            xy[i] = (pos + dx, float(layer))
    return xy


def draw_graph(g: AttributionGraph, path: Path, pruned: Pruned | None = None, title: str = "") -> Path:
    """Write the pruned graph of ``g`` as a PNG at ``path`` (its folder is created)."""
    if path.suffix.lower() != ".png":
        raise InvalidInput(f"graph picture must be a .png path, got {path}")
    pruned = pruned or prune(g.adjacency, g.layout, g.weights)
    lay = g.layout
    xy = node_xy(g, pruned)
    T, L = g.n_pos, g.n_layers
    fig = Figure(figsize=(min(4 + 0.45 * T, 30), min(3 + 0.28 * (L + 2), 16)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    w = g.adjacency[dst, src]
    if w.numel():
        order = w.abs().argsort(descending=True)[:MAX_EDGES].flip(0)  # strongest drawn last, on top
        top = float(w.abs().max())
        segs, colors, widths = [], [], []
        for k in order.tolist():
            s, t = int(src[k]), int(dst[k])
            if s in xy and t in xy:
                r = float(w[k].abs()) / top
                segs.append([xy[s], xy[t]])
                colors.append(
                    (0.15, 0.35, 0.8, 0.1 + 0.8 * r) if float(w[k]) > 0 else (0.85, 0.2, 0.15, 0.1 + 0.8 * r)
                )
                widths.append(0.3 + 2.5 * r)
        ax.add_collection(LineCollection(segs, colors=colors, linewidths=widths, zorder=1))

    infl = pruned.node_influence / pruned.node_influence.max().clamp(min=1e-12)
    kinds = {
        "feature": ([i for i in xy if i < lay.n_features], "o", "#f2a93b"),
        "error": ([i for i in xy if lay.errors.start <= i < lay.errors.stop], "s", "#9a9a9a"),
        "token": ([i for i in xy if lay.tokens.start <= i < lay.tokens.stop], "^", "#4c9a52"),
        "logit": ([i for i in xy if i >= lay.logits.start], "D", "#7b3fa0"),
    }
    for name, (members, marker, color) in kinds.items():
        if not members:
            continue
        sizes = [60.0 if name in ("token", "logit") else 12 + 80 * float(infl[i]) for i in members]
        ax.scatter([xy[i][0] for i in members], [xy[i][1] for i in members], s=sizes, marker=marker,
                   c=color, edgecolors="black", linewidths=0.4, zorder=2, label=name)  # fmt: skip
    for j, t in enumerate(g.targets[:3]):
        ax.annotate(
            _short(t.token, 14), (T - 1, L), xytext=(6, 8 - 11 * j), textcoords="offset points", fontsize=7
        )
    ax.set_xticks(range(T))
    ax.set_xticklabels([_short(t) for t in g.tokens], rotation=70, fontsize=7)
    ax.set_yticks(range(-1, L + 1))
    ax.set_yticklabels(["tok", *[str(i) for i in range(L)], "logit"], fontsize=7)
    ax.set_xlim(-0.8, T - 0.2 + 1.5)
    ax.set_ylim(-1.6, L + 0.8)
    ax.set_ylabel("layer")
    ax.legend(loc="upper left", fontsize=7, markerscale=0.7, frameon=False)
    ax.set_title(
        title
        or f"attribution graph: {g.targets[0].token!r}  replacement {g.replacement_score:.2f}  "
        f"completeness {g.completeness_score:.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
