"""Training and scoring transcoders on the tiny model with synthetic text (offline, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from residue_monitor.detectors.clt.activations import batched, capture_mlp, token_windows
from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.clt.metrics import LinearBaseline, evaluate_clt, fvu_per_layer, splice_score
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder
from residue_monitor.detectors.clt.train import TrainConfig, train_clt
from residue_monitor.service.models import PreparedModel
from residue_monitor.service.training import tiny_train_config, train_and_evaluate
from tests.conftest import synthetic_texts


def _windows(tok, texts: list[str], tc: TrainConfig):
    return batched(
        token_windows(texts, lambda t: tok(t, add_special_tokens=False)["input_ids"], tc.window),
        tc.chunk_windows,
    )


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
def test_training_learns_and_beats_the_mean(tiny_hf, kind: str) -> None:
    """Held-out FVU falls as training goes on and ends well below 1 (better than predicting the mean);
    every token carries exactly k features."""
    model, tok = tiny_hf
    tc = replace(tiny_train_config(), kind=kind, train_tokens=24_000, curve_every_tokens=4_000)
    held = next(iter(_windows(tok, synthetic_texts(8, seed=7), replace(tc, chunk_windows=16))))
    probe = capture_mlp(model, held)
    res = train_clt(model, iter(_windows(tok, synthetic_texts(200), tc)), tc, probe=probe)
    curve = [c["fvu_mean"] for c in res.curve]
    assert len(curve) >= 5
    assert curve[-1] < 0.7 * curve[0], curve
    assert curve[-1] < 0.9, curve
    assert res.clt.cfg.model_kind == kind and res.clt.cfg.k == tc.k
    assert res.train_tokens >= tc.train_tokens
    x = probe[0].flatten(1, 2)
    assert int((res.clt.encode(x[1, 1:], 1) > 0).sum(-1).max()) <= tc.k


def test_train_and_evaluate_saves_weights_and_metrics(tiny_model: PreparedModel, tmp_path: Path) -> None:
    """The pipeline writes a loadable folder whose metrics.json has every quality number and the id."""
    tc = replace(tiny_train_config(), train_tokens=8_000)
    dest, m = train_and_evaluate(
        str(tiny_model.path),
        tc,
        out=tmp_path / "clt",
        texts=(synthetic_texts(120), synthetic_texts(12, seed=9)),
        heldout_windows=24,
        splice_windows=8,
    )
    saved = json.loads((dest / "metrics.json").read_text())
    for key in (
        "fvu",
        "fvu_mean",
        "linear_fvu",
        "linear_baseline_fvu_mean",
        "l0",
        "l0_mean",
        "dead_fraction",
        "dead_fraction_mean",
        "splice",
        "top1_agreement",
        "kl_mean",
        "train_seconds",
        "curve",
        "clt_id",
        "machine",
        "left_out_massive",
    ):
        assert key in saved, key
    assert set(saved["splice"]) == {"all", "layers_0_0", "layers_1_1", "layers_2_3"}
    assert len(saved["fvu"]) == 4 and all(0 <= v < 2 for v in saved["fvu"])
    assert saved["l0_mean"] == pytest.approx(tc.k, abs=0.5)
    clt = load_clt(dest)
    assert clt.clt_id() == m["clt_id"] == saved["clt_id"]


def test_linear_baseline_is_exact_on_a_linear_map() -> None:
    """The least-squares baseline recovers an affine map exactly (FVU ≈ 0) and scores noise at ≈ 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2000, 8, generator=g)
    W = torch.randn(8, 8, generator=g)
    y = torch.stack([x[0] @ W + 1.0, torch.randn(2000, 8, generator=g)])
    lin = LinearBaseline(2, 8)
    for l in range(2):
        lin.add(l, x[l, :1500], y[l, :1500])
    ok = torch.ones(2, 500, dtype=torch.bool)
    fvu = lin.fvu(x[:, 1500:], y[:, 1500:], ok)
    assert fvu[0] < 1e-8
    assert 0.95 < fvu[1] < 1.1


def test_fvu_of_a_perfect_and_a_null_transcoder() -> None:
    """FVU is 0 for a transcoder whose skip is exactly the map, and 1-ish for one that outputs the mean."""
    cfg = CLTConfig(n_layers=1, d_model=4, n_features=8, activation="relu", skip=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 300, 4, generator=g)
    W = torch.randn(4, 4, generator=g)
    y = x @ W.T
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        assert clt.W_skip is not None
        clt.W_skip[0].copy_(W)
        clt.b_enc.fill_(-1.0)  # no feature fires
    assert fvu_per_layer(clt, x, y)[0] < 1e-10
    with torch.no_grad():
        clt.W_skip.zero_()
        clt.b_dec[0].copy_(y[0].mean(0))
    assert fvu_per_layer(clt, x, y)[0] == pytest.approx(1.0, abs=1e-6)


def test_splice_with_no_layers_is_identity_and_zeroing_hurts(tiny_hf) -> None:
    """Splicing nothing leaves the model unchanged (KL 0, top-1 1); replacing every MLP by zeros (a null
    transcoder) changes predictions, so the splice hook really replaces outputs."""
    model, tok = tiny_hf
    ids = torch.tensor([tok("the river runs past the old mill and under the stone bridge")["input_ids"]] * 2)
    cfg = CLTConfig(n_layers=4, d_model=64, n_features=8, activation="relu", skip=False)
    null = CrossLayerTranscoder(cfg)
    same = splice_score(model, null, ids, layers=[])
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    hurt = splice_score(model, null, ids)
    assert hurt.kl > 1e-4


def test_evaluate_reports_left_out_massive_tokens(tiny_hf) -> None:
    """Tokens whose MLP output exceeds the norm cap are counted and excluded from FVU."""
    model, tok = tiny_hf
    cfg = CLTConfig(n_layers=4, d_model=64, n_features=8, activation="relu", norm_cap=(1e-9,) * 4)
    ids = torch.tensor([tok("the key is in the box on the shelf of the kitchen")["input_ids"]])
    m = evaluate_clt(model, CrossLayerTranscoder(cfg), ids, splice_windows=1)
    n = ids.shape[1] - 1
    assert m["left_out_massive"] == [n] * 4
