"""Attribution graphs on the tiny model: circuit-tracer's correctness oracle (perturb one source under the
frozen replacement; every target moves by exactly that source's adjacency column), exact logit
reproduction, targets, pruning and scores on hand-made graphs, and the three output forms."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from residue_monitor.detectors.attribution.draw import draw_graph
from residue_monitor.detectors.attribution.export import load_raw, node_ids, save_raw, to_json, write_json
from residue_monitor.detectors.attribution.graph import (
    AttributionGraph,
    GraphConfig,
    TargetSpec,
    build_graph,
    estimate_bytes,
)
from residue_monitor.detectors.attribution.prune import Layout, graph_scores, prune
from residue_monitor.detectors.attribution.replacement import LocalReplacement
from residue_monitor.detectors.attribution.summary import UNREACHED_RATIO, render_text, summarize
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, random_clt
from residue_monitor.detectors.exceptions import InvalidInput

PROMPT = "Quick brown foxes jump over lazy dogs while the clock"
KINDS = ("transcoder_set", "cross_layer_transcoder")
FULL = GraphConfig(max_feature_nodes=100_000, batch_size=16)

ACT_ATOL = 5e-4
LOGIT_ATOL = 1e-5


def _clt(kind: str, seed: int = 0) -> CrossLayerTranscoder:
    return random_clt(CLTConfig(n_layers=4, d_model=64, n_features=96, model_kind=kind, k=8), seed=seed)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tiny_hf: Any) -> tuple[Any, Any, list[int], Callable[[int], str]]:
    model, tok = tiny_hf
    ids = tok(PROMPT)["input_ids"]
    return model, tok, ids, lambda t: tok.decode([t])


@pytest.fixture(scope="module", params=KINDS)
def graph(request: pytest.FixtureRequest, tiny: Any) -> tuple[AttributionGraph, LocalReplacement]:
    model, _, ids, decode = tiny
    clt = _clt(request.param)
    g = build_graph(model, clt, ids, cfg=FULL, decode=decode)
    return g, LocalReplacement.build(model, clt, ids)


def _demeaned(logits: torch.Tensor, vocab_idx: int) -> float:
    return float(logits[-1, vocab_idx] - logits[-1].mean())


def _targets_after(
    rep: LocalReplacement, g: AttributionGraph, **sources: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-activation of every selected feature, demeaned logit of every target) under the replacement."""
    xs, logits = rep.frozen_forward(**sources)
    l, p, f = g.active_features[g.selected].unbind(1)
    pre = (xs[l, p] * rep.clt.W_enc[l, f]).sum(-1) + rep.clt.b_enc[l, f]
    lg = torch.tensor([_demeaned(logits, t.vocab_idx) for t in g.targets])
    return pre, lg


# ---------------------------------------------------------------------------- the replacement model


@pytest.mark.parametrize("kind", KINDS)
def test_replacement_reproduces_the_models_logits(tiny: Any, kind: str) -> None:
    """The local replacement (features + error nodes, frozen attention and norms) gives the real model's
    logits at every position, and so does its frozen forward with the real sources."""
    model, _, ids, _ = tiny
    rep = LocalReplacement.build(model, _clt(kind), ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].float()
    assert torch.allclose(rep.logits, ref, atol=1e-5, rtol=0)
    xs, logits = rep.frozen_forward()
    assert torch.allclose(logits, ref, atol=1e-5, rtol=0)
    assert torch.allclose(xs, rep.mlp_in, atol=1e-5, rtol=0)
    assert rep.excluded == (0,) and float(rep.acts[:, 0].abs().sum()) == 0.0  # the BOS position is all error


def test_feature_oracle(graph: tuple[AttributionGraph, LocalReplacement]) -> None:
    """Doubling a selected feature's activation changes every selected feature's pre-activation and every
    target logit by exactly that feature's adjacency column (circuit-tracer's test)."""
    g, rep = graph
    lay = g.layout
    assert lay.n_features > 50  # most active features reach the target on this prompt
    pre0, lg0 = _targets_after(rep, g)
    for j in range(0, lay.n_features, max(1, lay.n_features // 120)):  # ~120 of them, every layer
        l, p, f = g.active_features[g.selected[j]].tolist()
        acts = rep.acts.clone()
        acts[l, p, f] *= 2
        pre, lg = _targets_after(rep, g, acts=acts)
        col = g.adjacency[:, j]
        torch.testing.assert_close(pre - pre0, col[: lay.n_features], atol=ACT_ATOL, rtol=0)
        torch.testing.assert_close(lg - lg0, col[lay.logits], atol=LOGIT_ATOL, rtol=0)


def test_error_and_token_oracle(graph: tuple[AttributionGraph, LocalReplacement]) -> None:
    """The same holds for error nodes (doubling e at one layer and position) and token embeddings."""
    g, rep = graph
    lay = g.layout
    pre0, lg0 = _targets_after(rep, g)
    for l in range(g.n_layers):
        for p in (0, g.n_pos // 2, g.n_pos - 1):
            errors = rep.errors.clone()
            errors[l, p] *= 2
            pre, lg = _targets_after(rep, g, errors=errors)
            col = g.adjacency[:, g.node_of_error(l, p)]
            torch.testing.assert_close(pre - pre0, col[: lay.n_features], atol=ACT_ATOL, rtol=0)
            torch.testing.assert_close(lg - lg0, col[lay.logits], atol=LOGIT_ATOL, rtol=0)
    for p in range(g.n_pos):
        embed = rep.embed.clone()
        embed[p] *= 2
        pre, lg = _targets_after(rep, g, embed=embed)
        col = g.adjacency[:, g.node_of_token(p)]
        torch.testing.assert_close(pre - pre0, col[: lay.n_features], atol=ACT_ATOL, rtol=0)
        torch.testing.assert_close(lg - lg0, col[lay.logits], atol=LOGIT_ATOL, rtol=0)


def test_no_edge_runs_backwards(graph: tuple[AttributionGraph, LocalReplacement]) -> None:
    """A feature only feeds features of later layers at the same or later positions (causality), and
    nothing feeds error or token nodes."""
    g, _ = graph
    lay = g.layout
    feats = g.active_features[g.selected]  # (n, 3)
    A = g.adjacency[: lay.n_features, : lay.n_features]
    t_layer, s_layer = feats[:, 0][:, None], feats[:, 0][None, :]
    t_pos, s_pos = feats[:, 1][:, None], feats[:, 1][None, :]
    forbidden = (s_layer >= t_layer) | (s_pos > t_pos)
    assert float(A[forbidden].abs().max()) == 0.0
    assert float(g.adjacency[lay.n_features : lay.logits.start].abs().sum()) == 0.0


# ---------------------------------------------------------------------------- targets


@pytest.mark.parametrize("kind", KINDS)
def test_eos_token_and_contrast_targets(tiny: Any, kind: str) -> None:
    """EOS and token targets are one logit node with weight 1; a contrast is the direction W_U[a] − W_U[b]
    (its column matches the change in logit a − logit b) under a virtual vocab index."""
    model, tok, ids, decode = tiny
    clt = _clt(kind)
    rep = LocalReplacement.build(model, clt, ids)
    cfg = GraphConfig(max_feature_nodes=64, batch_size=32)
    eos = build_graph(model, clt, ids, TargetSpec("eos"), cfg, eos_id=tok.eos_token_id, decode=decode)
    assert [t.vocab_idx for t in eos.targets] == [tok.eos_token_id] and eos.targets[0].weight == 1.0
    a, b = 40, 41
    con = build_graph(
        model, clt, ids, TargetSpec("contrast", token_id=a, contrast_token_id=b), cfg, decode=decode
    )
    V = rep.W_U.shape[0]
    assert con.targets[0].vocab_idx == V
    _, lg0 = rep.frozen_forward()
    j = 0
    l, p, f = con.active_features[con.selected[j]].tolist()
    acts = rep.acts.clone()
    acts[l, p, f] *= 2
    _, lg = rep.frozen_forward(acts=acts)
    diff = float((lg[-1, a] - lg[-1, b]) - (lg0[-1, a] - lg0[-1, b]))
    assert abs(diff - float(con.adjacency[con.layout.logits.start, j])) < LOGIT_ATOL
    with pytest.raises(InvalidInput, match="EOS"):
        build_graph(model, clt, ids, TargetSpec("eos"), cfg, eos_id=None)
    with pytest.raises(InvalidInput, match="token_id"):
        build_graph(model, clt, ids, TargetSpec("token", token_id=10**9), cfg)
    with pytest.raises(InvalidInput, match="needs token_id"):
        TargetSpec("token")


def test_emitted_targets_cover_the_probability_mass(tiny: Any) -> None:
    """``emitted`` takes the argmax first, then the likeliest tokens until 0.95 of the mass or 10 logits,
    each weighted by its probability."""
    model, _, ids, decode = tiny
    g = build_graph(model, _clt("transcoder_set"), ids, cfg=GraphConfig(max_feature_nodes=8), decode=decode)
    probs = torch.softmax(g.logits.double(), -1)
    assert g.targets[0].vocab_idx == int(g.logits.argmax())
    assert len(g.targets) == 10 or sum(t.prob for t in g.targets) >= 0.95
    for t in g.targets:
        assert t.weight == pytest.approx(float(probs[t.vocab_idx]), rel=1e-5)


def test_budget_and_deadline(tiny: Any) -> None:
    """``max_feature_nodes`` caps the traced features; a deadline already passed still returns a valid graph
    with the logit rows only."""
    model, _, ids, decode = tiny
    clt = _clt("transcoder_set")
    g = build_graph(model, clt, ids, cfg=GraphConfig(max_feature_nodes=20, batch_size=8), decode=decode)
    assert g.layout.n_features == 20
    late = build_graph(model, clt, ids, cfg=FULL, decode=decode, deadline=0.0)
    assert late.layout.n_features == 0
    assert 0.0 <= late.replacement_score <= 1.0
    assert float(late.adjacency[late.layout.logits].abs().sum()) > 0


# ---------------------------------------------------------------------------- pruning and scores


def test_scores_on_hand_made_graphs() -> None:
    """Replacement = token influence / (token + error influence); completeness = influence-weighted share of
    non-error input. A token → feature → logit chain scores 1 and 1; an equal error input halves both."""
    # nodes: feature, error, token, logit
    lay = Layout(1, 1, 1, 1)
    A = torch.zeros(4, 4)
    A[0, 2] = 2.0  # token → feature
    A[3, 0] = 1.0  # feature → logit
    assert graph_scores(A, lay, torch.tensor([1.0])) == pytest.approx((1.0, 1.0))
    A[3, 1] = -1.0  # error → logit, as strong as the feature
    rep, comp = graph_scores(A, lay, torch.tensor([1.0]))
    # logit input: half feature, half error; feature: all token. Influence: feature 0.5, error 0.5, token 0.5.
    assert rep == pytest.approx(0.5)
    # non-error share: logit 0.5 (weight 1), feature 1 (influence 0.5), token 1 (0.5), error 1 (0.5)
    assert comp == pytest.approx((0.5 * 1 + 1 * 0.5 + 1 * 0.5 + 1 * 0.5) / (1 + 0.5 + 0.5 + 0.5))


def test_pruning_keeps_what_matters(graph: tuple[AttributionGraph, LocalReplacement]) -> None:
    """Tokens and logits always stay; kept features have a kept edge in and out; edges only join kept
    nodes; a lower node threshold keeps fewer nodes; thresholds outside (0, 1] are refused."""
    g, _ = graph
    lay = g.layout
    loose = prune(g.adjacency, lay, g.weights, 0.95, 0.99)
    tight = prune(g.adjacency, lay, g.weights, 0.5, 0.9)
    for pr in (loose, tight):
        assert bool(pr.node_mask[lay.tokens.start :].all())
        feats = pr.node_mask[: lay.n_features].nonzero().flatten()
        assert bool(pr.edge_mask[feats].any(1).all()) and bool(pr.edge_mask[:, feats].any(0).all())
        kept = pr.node_mask
        assert not bool((pr.edge_mask & ~(kept[:, None] & kept[None, :])).any())
    assert int(tight.node_mask.sum()) < int(loose.node_mask.sum())
    assert int(tight.node_mask[: lay.n_features].sum()) > 0
    with pytest.raises(InvalidInput, match="node_threshold"):
        prune(g.adjacency, lay, g.weights, 0.0, 0.9)


# ---------------------------------------------------------------------------- outputs


def test_circuit_tracer_json(graph: tuple[AttributionGraph, LocalReplacement]) -> None:
    """The JSON has circuit-tracer's top-level keys, node fields and id conventions; ids are unique; every
    link joins two written nodes; every token and logit is written; feature types are its strings."""
    g, _ = graph
    doc = json.loads(json.dumps(to_json(g, prompt=PROMPT)))
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    meta = doc["metadata"]
    assert (
        meta["schema_version"] == 1 and meta["prompt"] == PROMPT and meta["prompt_tokens"] == list(g.tokens)
    )
    assert doc["qParams"]["linkType"] == "both"
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)) and len(set(node_ids(g))) == g.layout.n
    fields = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
              "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence"}  # fmt: skip
    types = {n["feature_type"] for n in doc["nodes"]}
    assert types <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert {"cross layer transcoder", "embedding", "logit"} <= types
    for n in doc["nodes"]:
        assert fields <= set(n) and isinstance(n["layer"], str)
        if n["feature_type"] == "cross layer transcoder":
            layer, feat, pos = (int(x) for x in n["node_id"].split("_"))
            assert (n["layer"], n["ctx_idx"]) == (str(layer), pos) and n["activation"] > 0
            assert n["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
        elif n["feature_type"] == "mlp reconstruction error":
            assert n["node_id"].split("_")[1] == "-1" and n["feature"] == -1
        elif n["feature_type"] == "logit":
            assert n["layer"] == str(g.n_layers + 1) and n["ctx_idx"] == g.n_pos - 1
    assert sum(n["feature_type"] == "embedding" for n in doc["nodes"]) == g.n_pos
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == len(g.targets) and [n["is_target_logit"] for n in logits].count(True) == 1
    written = set(ids)
    assert doc["links"] and all(lk["source"] in written and lk["target"] in written for lk in doc["links"])


def test_viewer_folder(graph: tuple[AttributionGraph, LocalReplacement], tmp_path: Path) -> None:
    """Writing graphs lists each in the folder's graph-metadata.json once (by slug), as circuit-tracer's
    local viewer expects; a slug that is not the file stem is refused (the viewer could not fetch it)."""
    g, _ = graph
    for name in ("a", "b", "a"):
        write_json(to_json(g, slug=name), tmp_path / f"{name}.json")
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(m["slug"] for m in listing["graphs"]) == ["a", "b"]
    assert json.loads((tmp_path / "b.json").read_text())["metadata"] == listing["graphs"][0]
    with pytest.raises(InvalidInput, match="stem"):
        write_json(to_json(g, slug="x"), tmp_path / "y.json")


def test_raw_round_trip_and_corrupt_file(
    graph: tuple[AttributionGraph, LocalReplacement], tmp_path: Path
) -> None:
    """The raw form reloads bit for bit; a file that is not one raises InvalidInput naming it."""
    g, _ = graph
    back = load_raw(save_raw(g, tmp_path / "g.safetensors"))
    for name in (
        "adjacency",
        "active_features",
        "activations",
        "selected",
        "feature_influence",
        "error_norm",
    ):
        assert torch.equal(getattr(back, name), getattr(g, name)), name
    assert back.tokens == g.tokens and [t.vocab_idx for t in back.targets] == [t.vocab_idx for t in g.targets]
    assert back.replacement_score == g.replacement_score
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InvalidInput, match=r"bad\.safetensors"):
        load_raw(bad)


def test_summary_and_null_output_report(tiny: Any) -> None:
    """A feature active at the last position whose decoder is zeroed reaches no output: the null-output
    report lists it as unreached, and the text summary carries every section."""
    model, _, ids, decode = tiny
    clt = _clt("transcoder_set", seed=3)
    rep = LocalReplacement.build(model, clt, ids)
    last = len(ids) - 1
    l = 2
    f = int(rep.acts[l, last].argmax())
    with torch.no_grad():
        clt.W_dec[l][f] = 0.0
    g = build_graph(model, clt, ids, cfg=FULL, decode=decode)
    s = summarize(g)
    silent = [(n.layer, n.feature) for n in s.unreached]
    assert (l, f) in silent
    assert all(n.pos == last for n in s.unreached)
    at_last = g.active_features[:, 1] == last
    total_act, total_infl = float(g.activations[at_last].sum()), float(g.feature_influence[at_last].sum())
    for n in s.unreached:
        assert n.influence / total_infl < UNREACHED_RATIO * n.activation / total_act
    assert 0 < s.unreached_activation_share < 1
    assert len(s.error_share_per_layer) == g.n_layers and s.paths
    text = render_text(s)
    for part in ("replacement score", "strongest features", "error accumulation", "unreached", "top paths"):
        assert part in text


def test_png_trace_map(graph: tuple[AttributionGraph, LocalReplacement], tmp_path: Path) -> None:
    """The pruned graph is drawn as a PNG of a size that grows with the prompt; other suffixes are refused."""
    g, _ = graph
    png = draw_graph(g, tmp_path / "graph.png")
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 400 and height >= 300
    with pytest.raises(InvalidInput, match=r"\.png"):
        draw_graph(g, tmp_path / "graph.svg")


def test_memory_estimate_grows_with_the_prompt() -> None:
    """The estimate the Trace RPC refuses large prompts with is monotone in the prompt length."""
    cfg = GraphConfig()
    sizes = [estimate_bytes(t, 30, 576, 1536, 32, cfg) for t in (16, 64, 256, 1024)]
    assert sizes == sorted(sizes) and sizes[-1] > 16 * sizes[0]
