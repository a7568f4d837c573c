"""SmolLM2 end to end (slow): GGUF conversion, generation, the default transcoder's quality, the CLI.

Uses the real cache dir ($RESIDUE_HOME or ~/.cache/residue-monitor) so a second run reuses the converted
model and the trained default CLT; on a fresh machine the first run converts (≈1 min) and trains
(≈15–20 min on 2 cores).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from residue_monitor.detectors.clt.activations import capture_mlp
from residue_monitor.detectors.clt.encode import encode_rows
from residue_monitor.detectors.clt.io import read_metrics
from residue_monitor.service.cli import app
from residue_monitor.service.models import load_hf, prepare_smollm2, sha256_file, smollm2_gguf_path
from residue_monitor.service.training import DEFAULT_SMOLLM2, ensure_default_clt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    prepared = prepare_smollm2()
    model, tok = load_hf(prepared.path)
    return prepared, model, tok


def test_conversion_is_exact_and_checksummed(smol) -> None:
    """The converted fp32 folder gives the same logits as transformers' own GGUF load, and its manifest
    checksum matches the weights file."""
    from transformers import AutoModelForCausalLM

    prepared, model, tok = smol
    assert sha256_file(prepared.path / "model.safetensors") == prepared.sha256
    gguf = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_chat_generation_answers(smol) -> None:
    """The converted instruct model answers an easy question through its chat template."""
    _, model, tok = smol
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
    )
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_default_clt_quality(smol) -> None:
    """The default transcoder trains (or loads from cache) and clears quality floors on held-out text:
    better than predicting the mean at every layer, k features per token, few dead features, and
    spliced into all 30 layers it keeps a useful share of next-token predictions."""
    del smol  # the fixture only makes sure the model is prepared first
    clt, where = ensure_default_clt("smollm2")
    m = read_metrics(where)
    assert m is not None
    assert clt.cfg.n_layers == 30 and clt.cfg.d_model == 576
    assert clt.cfg.n_features == DEFAULT_SMOLLM2.n_features and clt.cfg.k == DEFAULT_SMOLLM2.k
    assert m["clt_id"] == clt.clt_id()
    assert max(m["fvu"]) < 1.0, m["fvu"]
    assert m["fvu_mean"] < 0.6
    # the features must add something over the least-squares linear map the skip starts from
    assert m["fvu_mean"] < m["linear_baseline_fvu_mean"]
    assert m["l0_mean"] == pytest.approx(DEFAULT_SMOLLM2.k, abs=1.0)
    assert m["dead_fraction_mean"] < 0.5
    assert m["top1_agreement"] > 0.2
    assert m["splice"]["layers_20_29"]["top1"] > m["top1_agreement"]
    assert len(m["curve"]) >= 2 and m["curve"][-1]["fvu_mean"] < m["curve"][0]["fvu_mean"]


def test_encode_rows_on_smollm2(smol) -> None:
    """Encoding the last prompt token at every layer gives k sorted features and finite error ratios."""
    _, model, tok = smol
    clt, _ = ensure_default_clt("smollm2")
    ids = tok("Alice keeps the key in the blue box.", return_tensors="pt")["input_ids"]
    xs, ys = capture_mlp(model, ids)
    codes = encode_rows(clt, xs[:, 0, -1:], ys[:, 0, -1:], k=32)
    assert codes.ids.shape == (30, 1, 32)
    assert bool((codes.values[:, :, :-1] >= codes.values[:, :, 1:]).all())
    assert bool(torch.isfinite(codes.error_ratio).all()) and float(codes.error_ratio.mean()) < 1.5


def test_cli_info_on_default(smol) -> None:
    """`residue clt info --json` reports the id and saved metrics of the default transcoder."""
    clt, where = ensure_default_clt("smollm2")
    res = CliRunner().invoke(app, ["clt", "info", str(where), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["clt_id"] == clt.clt_id() and "fvu_mean" in data["metrics"]


def test_shell_fingerprints_on_held_out_prompts(smol) -> None:
    """Shells v1–v5 + the meta-shell on SmolLM2 with the default CLT: one fingerprint per shell, fitted on
    the fit split, detects its held-out paraphrases at ≥ 80 % and matches ≤ 10 % of the held-out controls
    (calibrated for 5 %; the slack covers the 104-prompt sample), and neither set was seen in fitting.

    Reuses the run folder `python -m benchmarks.fingerprints` leaves in the cache (refitting from its
    stored signatures, which is deterministic); on a fresh machine it runs every prompt (≈ 25 min)."""
    from residue_monitor.detectors.request import GenerationConfig
    from residue_monitor.service.engine import load_engine, rerun_report, run_shells
    from residue_monitor.service.models import residue_home
    from residue_monitor.shells.catalog import load_controls, load_shells

    del smol
    eng = load_engine("smollm2")
    run = residue_home() / "shells" / f"{eng.prepared.name}-{eng.clt_id}"
    if (run / "signatures.npz").is_file() and (run / "outputs.jsonl").is_file():
        report = rerun_report(run)
    else:
        report = run_shells(eng, run, GenerationConfig(max_new_tokens=24))
    specs = list(load_shells())
    assert sorted(report["per_shell"]) == sorted(s.id for s in specs)
    n_held_controls = sum(1 for c in load_controls() if c.split == "heldout")
    for spec in specs:
        row = report["per_shell"][spec.id]
        assert row["heldout_positives"] == sum(1 for i in spec.instances if i.split == "heldout")
        assert row["fit_positives"] == sum(1 for i in spec.instances if i.split == "fit")
        assert row["heldout_controls"] == n_held_controls
        assert row["detection_rate"] >= 0.8, (spec.id, row)
        assert row["fpr"] <= 0.10, (spec.id, row)
