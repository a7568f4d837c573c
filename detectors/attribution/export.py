"""Graph files: circuit-tracer / Neuronpedia JSON (for its viewer) and a raw tensor form (safetensors).

JSON layout (FACTS-clt.md; the field names and node ids of circuit-tracer's ``frontend/graph_models.py``):
``{metadata, qParams, nodes, links}``; node ids ``"{layer}_{feature}_{pos}"`` for features,
``"{layer}_-1_{pos}"`` for error nodes (circuit-tracer's newer form: the older ``"0_{layer}_{pos}"``
collides with layer-0 features), ``"E_{token}_{pos}"`` for tokens, ``"{L+1}_{vocab_idx}_{pos}"`` for
logits; ``influence`` is the node's cumulative influence rank. Only pruned-in edges are written, and the
nodes they touch plus every token and logit, as circuit-tracer writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from residue_monitor.detectors.attribution.graph import AttributionGraph, Target
from residue_monitor.detectors.attribution.prune import Pruned, prune
from residue_monitor.detectors.exceptions import InvalidInput

SCHEMA_VERSION = 1
RAW_FORMAT = "residue-attribution-graph/1"


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def format_node_id(kind: str, layer: int, pos: int, index: int = -1) -> str:
    """circuit-tracer's id of one node: ``index`` is the feature id, the token id (``embedding``) or the
    vocab index (``logit``, whose ``layer`` is the JSON's ``L + 1``); error nodes have none."""
    if kind == "feature":
        return f"{layer}_{index}_{pos}"
    if kind == "error":
        return f"{layer}_-1_{pos}"
    if kind == "token":
        return f"E_{index}_{pos}"
    if kind == "logit":
        return f"{layer}_{index}_{pos}"
    raise InvalidInput(f"unknown node kind {kind!r}")


def node_ids(g: AttributionGraph) -> list[str]:
    """circuit-tracer's node id of every adjacency node, in adjacency order."""
    ids: list[str] = []
    for a in g.selected.tolist():
        l, p, f = (int(v) for v in g.active_features[a])
        ids.append(format_node_id("feature", l, p, f))
    ids += [format_node_id("error", l, p) for l in range(g.n_layers) for p in range(g.n_pos)]
    ids += [format_node_id("token", -1, p, t) for p, t in enumerate(g.input_ids)]
    ids += [format_node_id("logit", g.n_layers + 1, g.n_pos - 1, t.vocab_idx) for t in g.targets]
    return ids


def to_json(g: AttributionGraph, pruned: Pruned | None = None, slug: str = "residue-trace",
            prompt: str = "", scan: str = "") -> dict[str, Any]:  # fmt: skip
    """The graph in circuit-tracer's JSON form (load it in its viewer unchanged)."""
    pruned = pruned or prune(g.adjacency, g.layout, g.weights)
    lay = g.layout
    ids = node_ids(g)
    cum = pruned.cumulative.tolist()
    L, last = g.n_layers, g.n_pos - 1
    nodes: dict[int, dict[str, Any]] = {}
    for i in pruned.node_mask.nonzero().flatten().tolist():
        base: dict[str, Any] = {"node_id": ids[i], "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                                "reverse_ctx_idx": 0, "clerp": "", "influence": cum[i]}  # fmt: skip
        if i < lay.n_features:
            a = int(g.selected[i])
            l, p, f = (int(v) for v in g.active_features[a])
            base |= {"feature": _cantor(l, f), "layer": str(l), "ctx_idx": p,
                     "feature_type": "cross layer transcoder", "jsNodeId": f"{l}_{f}-0",
                     "activation": float(g.activations[a])}  # fmt: skip
        elif i < lay.tokens.start:
            l, p = divmod(i - lay.n_features, g.n_pos)
            base |= {"feature": -1, "layer": str(l), "ctx_idx": p, "feature_type": "mlp reconstruction error",
                     "jsNodeId": f"{l}_{p}-0"}  # fmt: skip
        elif i < lay.logits.start:
            p = i - lay.tokens.start
            base |= {"feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
                     "jsNodeId": f"E_{g.input_ids[p]}-{p}"}  # fmt: skip
        else:
            j = i - lay.logits.start
            t = g.targets[j]
            base |= {"feature": t.vocab_idx, "layer": str(L + 1), "ctx_idx": last, "feature_type": "logit",
                     "token_prob": t.prob, "is_target_logit": j == 0, "jsNodeId": f"L_{t.vocab_idx}-{last}",
                     "clerp": f'Output "{t.token}" (p={t.prob:.3f})', "influence": None}  # fmt: skip
        nodes[i] = base
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    weights = g.adjacency[dst, src].tolist()
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for s, t, w in zip(src.tolist(), dst.tolist(), weights, strict=True)
        if s in nodes and t in nodes
    ]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [
        n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan or g.clt_id,
            "transcoder_list": [],
            "prompt_tokens": list(g.tokens),
            "prompt": prompt or "".join(g.tokens),
            "node_threshold": _threshold(pruned, g),
            "schema_version": SCHEMA_VERSION,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": used,
        "links": links,
    }


def _threshold(pruned: Pruned, g: AttributionGraph) -> float | None:
    feats = pruned.node_mask[: g.layout.n_features]
    if not bool(feats.any()):
        return None
    return float(pruned.cumulative[: g.layout.n_features][feats].max())


VIEWER_INDEX = "graph-metadata.json"
"""The graph list circuit-tracer's local viewer reads from its data folder: ``{"graphs": [metadata]}``."""


def write_json(doc: dict[str, Any], path: Path, index: bool = True) -> Path:
    """Write a graph JSON; with ``index``, also list it in the folder's ``graph-metadata.json`` (replacing
    an entry with the same slug), so the folder can be served to circuit-tracer's viewer as is. The slug
    must be the file's stem: the viewer fetches ``{slug}.json``."""
    if index and doc["metadata"]["slug"] != path.stem:
        raise InvalidInput(
            f"the graph's slug {doc['metadata']['slug']!r} must be the file name's stem {path.stem!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    if index:
        listing = path.parent / VIEWER_INDEX
        graphs: list[dict[str, Any]] = []
        if listing.is_file():
            try:
                graphs = list(json.loads(listing.read_text()).get("graphs", []))
            except (ValueError, AttributeError) as e:
                raise InvalidInput(
                    f"{listing}: not a graph list ({e}); move it away to start a new one"
                ) from e
        graphs = [g for g in graphs if g.get("slug") != doc["metadata"]["slug"]] + [doc["metadata"]]
        listing.write_text(json.dumps({"graphs": graphs}, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------- raw tensors


def save_raw(g: AttributionGraph, path: Path) -> Path:
    """Every tensor of the graph in one safetensors file (metadata: tokens, targets, scores, ids)."""
    tensors = {
        "adjacency": g.adjacency.contiguous(),
        "active_features": g.active_features.contiguous(),
        "activations": g.activations.contiguous(),
        "selected": g.selected.contiguous(),
        "feature_influence": g.feature_influence.contiguous(),
        "error_norm": g.error_norm.contiguous(),
        "logits": g.logits.contiguous(),
        "input_ids": torch.tensor(g.input_ids, dtype=torch.long),
        "target_directions": torch.stack([t.direction for t in g.targets]).contiguous(),
    }
    meta = {
        "format": RAW_FORMAT,
        "tokens": g.tokens,
        "n_layers": g.n_layers,
        "targets": [
            {"token": t.token, "vocab_idx": t.vocab_idx, "weight": t.weight, "prob": t.prob}
            for t in g.targets
        ],
        "excluded_positions": list(g.excluded_positions),
        "replacement_score": g.replacement_score,
        "completeness_score": g.completeness_score,
        "seconds": g.seconds,
        "clt_id": g.clt_id,
        "model": g.model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"graph": json.dumps(meta)})
    return path


def load_raw(path: Path) -> AttributionGraph:
    """Read a file written by :func:`save_raw`; anything else raises ``InvalidInput`` naming the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            meta = json.loads((f.metadata() or {}).get("graph", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInput(f"{path}: not a readable graph file ({e})") from e
    if meta.get("format") != RAW_FORMAT:
        raise InvalidInput(f"{path}: not a residue attribution graph (format {meta.get('format')!r})")
    targets = tuple(
        Target(
            d["token"], int(d["vocab_idx"]), t["target_directions"][i], float(d["weight"]), float(d["prob"])
        )
        for i, d in enumerate(meta["targets"])
    )
    return AttributionGraph(
        input_ids=tuple(t["input_ids"].tolist()),
        tokens=tuple(meta["tokens"]),
        n_layers=int(meta["n_layers"]),
        targets=targets,
        active_features=t["active_features"],
        activations=t["activations"],
        selected=t["selected"],
        adjacency=t["adjacency"],
        feature_influence=t["feature_influence"],
        error_norm=t["error_norm"],
        excluded_positions=tuple(meta["excluded_positions"]),
        logits=t["logits"],
        replacement_score=float(meta["replacement_score"]),
        completeness_score=float(meta["completeness_score"]),
        seconds=float(meta["seconds"]),
        clt_id=str(meta["clt_id"]),
        model=str(meta["model"]),
    )
