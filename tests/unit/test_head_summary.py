"""The offline attention report: per-head QK/OV summaries (detectors.attention.head_summary)."""

from __future__ import annotations

import torch

from residue_monitor.detectors.attention import head_summary
from residue_monitor.detectors.capture import attention_probs, capture


def test_head_summary_reads_qk_and_ov_of_every_head(tiny_hf) -> None:
    """One entry per (layer, head); QK top keys are causal and their mass matches the recomputed
    attention; OV norms equal the norms of W_O,h · W_V,kv(h) computed by hand (grouped-query mapping)."""
    model, tok = tiny_hf
    ids = tok("the river key door box market monday tuesday answer")["input_ids"]
    pos = len(ids) - 1
    acts, _ = capture(model, ids, [(pos, "prompt_last")])
    probs = attention_probs(acts)  # (L, H, 1, T)
    rows = head_summary(model, probs, acts.positions, top=3)
    L, H = probs.shape[:2]
    assert [(r["layer"], r["head"]) for r in rows] == [(li, h) for li in range(L) for h in range(H)]
    for r in rows:
        assert all(0 <= k <= pos for k in r["qk_top_keys"])
        expect = probs[r["layer"], r["head"], 0].topk(3).values
        assert torch.allclose(torch.tensor(r["qk_top_mass"]), expect, atol=1e-6)
        assert r["ov_spectral"] <= r["ov_frobenius"] + 1e-6
    attn = model.model.layers[1].self_attn
    d = attn.head_dim
    n_kv = attn.k_proj.weight.shape[0] // d
    h = H - 1
    W_V = attn.v_proj.weight.detach().float()[(h // (H // n_kv)) * d : (h // (H // n_kv) + 1) * d]  # (d, D)
    W_O = attn.o_proj.weight.detach().float()[:, h * d : (h + 1) * d]  # (D, d)
    ov = W_O @ W_V
    got = next(r for r in rows if r["layer"] == 1 and r["head"] == h)
    assert abs(got["ov_frobenius"] - float(ov.norm())) < 1e-4
    assert abs(got["ov_spectral"] - float(torch.linalg.matrix_norm(ov, ord=2))) < 1e-4
