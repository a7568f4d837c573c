"""The residue detectors: for each registered detector a case built to trigger it and one built not to,
with the evidence that explains the difference; the detector contract, parametrized over the registry."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from residue_monitor.detectors.attention import detect_attention, trapped_mass
from residue_monitor.detectors.base import DetectorResult
from residue_monitor.detectors.capture import Activations
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, random_clt
from residue_monitor.detectors.errors import accumulation, detect_errors
from residue_monitor.detectors.nullout import detect_nullout
from residue_monitor.detectors.request import GenerationConfig, RequestAnalysis, analyze_ids, analyze_prompt
from residue_monitor.detectors.signature import (
    ERROR_RATIO,
    LOCAL_WINDOW,
    MASS,
    UNREACHED,
    ResidueSignature,
    SignatureBuilder,
)
from residue_monitor.detectors.suite import detector_registry, run_detectors

CFG = CLTConfig(n_layers=4, d_model=64, n_features=128, model_kind="transcoder_set", activation="topk", k=8)
GEN = GenerationConfig(max_new_tokens=6, decode_every=2)
PROMPT = "hello"


@pytest.fixture(scope="module")
def clt() -> CrossLayerTranscoder:
    return random_clt(CFG)


@pytest.fixture(scope="module")
def base(tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder) -> RequestAnalysis:
    """The request PROMPT signed by the random transcoder."""
    model, tok = tiny_hf
    return analyze_prompt(model, tok, SignatureBuilder.for_model(model, clt), PROMPT, GEN)


def _edited(clt: CrossLayerTranscoder, edit: Callable[[CrossLayerTranscoder], None]) -> CrossLayerTranscoder:
    """A copy of ``clt`` with ``edit`` applied to its weights."""
    out = copy.deepcopy(clt)
    with torch.no_grad():
        edit(out)
    return out


def _analyze(tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder, base: RequestAnalysis) -> RequestAnalysis:
    """The same request as ``base`` (same prompt ids, hence the same greedy output) signed by ``clt``."""
    model, tok = tiny_hf
    a = analyze_ids(model, tok, SignatureBuilder.for_model(model, clt), base.prompt_ids, GEN)
    assert a.output_ids == base.output_ids  # the transcoder never changes generation
    return a


# ----------------------------------------------------------------------------------------------- nullout


def test_nullout_unreached_versus_aligned_decoders(
    tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder, base: RequestAnalysis
) -> None:
    """Decoders orthogonal to the readout of every emitted token leave all feature mass unreached (score
    ≈ 1); decoders along the readout of the token the final row emitted reach it (score 0). The encoder is
    untouched, so the same features fire with the same mass in both: only propagation differs."""
    readout = SignatureBuilder.for_model(tiny_hf[0], clt).readout  # (V, D)
    emitted = sorted(set(base.output_ids))
    Q, _ = torch.linalg.qr(readout[emitted].T)  # (D, m): basis of the emitted tokens' readout span

    def orthogonal(c: CrossLayerTranscoder) -> None:
        for w in c.W_dec:  # (F, D)
            w.sub_((w @ Q) @ Q.T)

    u = readout[base.output_ids[-1]]  # (D,)

    def aligned(c: CrossLayerTranscoder) -> None:
        for w in c.W_dec:
            F = w.shape[0]
            scale = torch.linspace(0.5, 2.0, F) * (1 - 2 * (torch.arange(F) % 2))  # ±, varying size
            w.copy_(scale[:, None] * u[None, :])

    unreached = _analyze(tiny_hf, _edited(clt, orthogonal), base)
    reached = _analyze(tiny_hf, _edited(clt, aligned), base)
    hi = detect_nullout(unreached.signature)
    lo = detect_nullout(reached.signature)
    assert hi is not None and lo is not None
    assert hi.score == pytest.approx(1.0, abs=1e-6)
    assert lo.score == pytest.approx(0.0, abs=1e-6)
    assert hi.score - lo.score > 0.9
    end_hi, end_lo = unreached.signature.last_row, reached.signature.last_row
    assert end_hi.phase == "final"
    np.testing.assert_array_equal(end_hi.layer_stats[:, UNREACHED], np.ones(CFG.n_layers))
    np.testing.assert_array_equal(end_lo.layer_stats[:, UNREACHED], np.zeros(CFG.n_layers))
    np.testing.assert_allclose(end_hi.layer_stats[:, MASS], end_lo.layer_stats[:, MASS], rtol=1e-6)
    assert (end_hi.layer_stats[:, MASS] > 0).all()
    # every emitted token was projected out, so the prompt_last row is unreached too
    assert hi.evidence["prompt_last_unreached"] == pytest.approx(1.0, abs=1e-6)
    P, n = len(base.prompt_ids), len(base.output_ids)
    assert hi.evidence["end_position"] == lo.evidence["end_position"] == P + n - 2
    assert hi.evidence["empty_output"] == lo.evidence["empty_output"] == 0.0


def test_nullout_reports_an_eos_only_request_as_empty(base: RequestAnalysis) -> None:
    """A request that generated only EOS has a single (prompt_last) row; the detector scores that row and
    reports empty_output = stopped = 1 (a normal request reports 0)."""
    sig = base.signature
    first = sig.row("prompt_last")
    assert first is not None
    eos_only = dataclasses.replace(sig, rows=(first,), output_tokens=1, empty_output=True, stopped=True)
    res = detect_nullout(eos_only)
    normal = detect_nullout(sig)
    assert res is not None and normal is not None
    assert res.evidence["empty_output"] == 1.0 and res.evidence["stopped"] == 1.0
    assert normal.evidence["empty_output"] == 0.0
    assert res.evidence["end_position"] == first.position
    assert "prompt_last_unreached" not in res.evidence
    assert res.evidence["eos_prob"] == pytest.approx(float(first.logits[3]))


# --------------------------------------------------------------------------------------------- attention

T, D, V, H, H_KV, D_HEAD = 40, 16, 32, 4, 2, 8
POS = T - 1
SPAN = [18, 19, 20]  # far from key 0 and from the query's local window (keys 31..38)
LayerSpec = tuple[list[int], float] | None
"""One layer of a hand-built attention pattern: (keys every head scores, their score), None: uniform."""


def _attention_acts(per_layer: Sequence[LayerSpec], seed: int = 0) -> Activations:
    """One prompt_last row at POS over a T-token context, no model: in layer l every head scores the keys
    ``per_layer[l][0]`` at ``per_layer[l][1]`` and every other key at 0 (None: all keys 0, uniform).
    MLP tensors, logits and targets are random (the attention detector does not read them)."""
    g = torch.Generator().manual_seed(seed)
    L, scale = len(per_layer), D_HEAD**-0.5
    q = torch.zeros(L, 1, H, D_HEAD)
    k = torch.zeros(L, H_KV, T, D_HEAD)
    for layer, spec in enumerate(per_layer):
        if spec is None:
            continue
        keys, score = spec
        q[layer, 0, :, 0] = 1.0
        k[layer, :, keys, 0] = score / scale  # q·k · scale = score
    return Activations(
        positions=(POS,),
        phases=("prompt_last",),
        mlp_in=torch.randn(L, 1, D, generator=g),
        mlp_out=torch.randn(L, 1, D, generator=g),
        q=q,
        k=k,
        logits=torch.randn(1, V, generator=g),
        targets=torch.zeros(1, dtype=torch.long),
        attn_scale=scale,
    )


def _attention_sig(per_layer: Sequence[LayerSpec]) -> ResidueSignature:
    L = len(per_layer)
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=32, activation="topk", k=4)
    builder = SignatureBuilder(random_clt(cfg), torch.randn(V, D, generator=torch.Generator().manual_seed(1)))
    return builder.build(_attention_acts(per_layer))


def _span_mass(score: float, m: int = len(SPAN)) -> float:
    """Softmax mass of a 4-key span holding m keys scored ``score`` (and 4 − m scored 0) among T keys."""
    return (m * math.exp(score) + 4 - m) / (m * math.exp(score) + T - m)


def test_attention_trapped_in_a_middle_span() -> None:
    """Every head attends almost only to a 3-token span in the middle of the context: trapped mass ≈ the
    span's softmax mass in every layer, all heads trapped, and trap_layer names the layer trapping most."""
    spec = [(SPAN, 5.0), (SPAN, 20.0), (SPAN, 5.0)]
    res = detect_attention(_attention_sig(spec))
    assert res is not None
    ev = res.evidence
    expected = (2 * _span_mass(5.0) + 1.0) / 3
    assert res.score == ev["trapped_mass"] == pytest.approx(expected, abs=1e-3)
    assert res.score > 0.8
    assert ev["trap_layer"] == 1.0 and ev["trap_layer_mass"] == pytest.approx(1.0, abs=1e-4)
    assert ev["trapped_heads"] == 1.0
    assert ev["loop_heads"] == 0.0 and ev["sink_frac"] < 0.01
    assert "final_trapped_mass" not in ev  # the signature has no final row


@pytest.mark.parametrize(
    ("case", "spec"),
    [
        ("uniform", [None, None, None]),
        ("near_uniform", [(SPAN, 0.3), ([5, 6], 0.2), ([30], 0.3)]),
        ("sink", [([0], 20.0)] * 3),
        ("local", [([33, 34, 35], 20.0)] * 3),
    ],
)
def test_attention_not_trapped(case: str, spec: Sequence[LayerSpec]) -> None:
    """Near-uniform attention (no span holds more than a few times 4/T), attention on the sink (key 0) or
    inside the query's local window is not trapping: trapped mass stays ≤ 0.15, far below a trapped span."""
    trapped = detect_attention(_attention_sig([(SPAN, 20.0)] * 3))
    res = detect_attention(_attention_sig(spec))
    assert res is not None and trapped is not None
    assert res.score <= 0.15
    assert trapped.score - res.score > 0.8
    ev = res.evidence
    if case == "uniform":
        assert res.score == 0.0
        assert ev["entropy"] == pytest.approx(math.log(T), abs=1e-4)
        assert ev["sink_frac"] == pytest.approx(1 / T, abs=1e-6)
    if case == "near_uniform":
        assert ev["entropy"] > 0.98 * math.log(T)
    if case == "sink":
        assert res.score == pytest.approx(0.0, abs=1e-6)
        assert ev["sink_frac"] == pytest.approx(1.0, abs=1e-6)
    if case == "local":
        assert res.score == pytest.approx(0.0, abs=1e-6)


def test_attention_self_loop() -> None:
    """Every head attends to the query itself: loop_heads = 1, self_frac ≈ 1 and nothing is trapped."""
    res = detect_attention(_attention_sig([([POS], 20.0)] * 2))
    assert res is not None
    assert res.evidence["loop_heads"] == 1.0
    assert res.evidence["self_frac"] == pytest.approx(1.0, abs=1e-6)
    assert res.score == pytest.approx(0.0, abs=1e-6)


def test_trapped_span_must_clear_the_local_window() -> None:
    """A span ending just before the local window (keys POS-8 .. POS-1) is trapped; one ending on the
    window's first key is local attention, not trapping."""
    first_local = POS - LOCAL_WINDOW
    outside = _attention_sig([(list(range(first_local - 4, first_local)), 20.0)]).rows[0]
    touching = _attention_sig([(list(range(first_local - 3, first_local + 1)), 20.0)]).rows[0]
    assert trapped_mass(outside).min() == pytest.approx(1.0, abs=1e-6)
    assert trapped_mass(touching).max() == 0.0


# ------------------------------------------------------------------------------------------------ errors


def test_errors_break_where_reconstruction_fails(
    tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder, base: RequestAnalysis
) -> None:
    """Blowing up the decoders, decoder bias and skip of the last half of the layers (×50) leaves the
    first half's error ratios unchanged and multiplies the rest: growth jumps and the break is at L/2."""
    half = CFG.n_layers // 2

    def broken(c: CrossLayerTranscoder) -> None:
        assert c.W_skip is not None
        for layer in range(half, CFG.n_layers):
            c.W_dec[layer] *= 50.0
            c.b_dec[layer] *= 50.0
            c.W_skip[layer] *= 50.0

    bad = _analyze(tiny_hf, _edited(clt, broken), base)
    good_row, bad_row = base.signature.row("prompt_last"), bad.signature.row("prompt_last")
    assert good_row is not None and bad_row is not None
    e_good, e_bad = good_row.layer_stats[:, ERROR_RATIO], bad_row.layer_stats[:, ERROR_RATIO]
    np.testing.assert_array_equal(e_bad[:half], e_good[:half])
    assert (e_bad[half:] > 10 * e_good[half:]).all()
    lo, hi = detect_errors(base.signature), detect_errors(bad.signature)
    assert lo is not None and hi is not None
    assert hi.evidence["break_layer"] == half
    assert hi.evidence["max_jump"] == pytest.approx(e_bad[half] - e_bad[half - 1], rel=1e-5)
    assert hi.score == pytest.approx(e_bad[-1] - e_bad[0], rel=1e-5)  # L = 4: last third − first third
    assert hi.score - lo.score > 10 * max(float(e_good.max()), 1.0)
    assert hi.evidence["slope"] > 10 * abs(lo.evidence["slope"])
    assert hi.evidence["final_growth"] > 10 * abs(lo.evidence["final_growth"])


def test_accumulation_hand_values() -> None:
    """Flat ratios: growth 0, slope 0, no jump; a step of 0.7 into layer 2: break_layer 2, max_jump 0.7,
    growth 0.7; NaN layers are ignored (a step across a NaN layer lands on the next finite layer)."""
    flat = accumulation(np.full(6, 0.3))
    assert flat["growth"] == pytest.approx(0.0, abs=1e-12)
    assert flat["slope"] == pytest.approx(0.0, abs=1e-12)
    assert flat["max_jump"] == pytest.approx(0.0, abs=1e-12)
    assert flat["mean"] == pytest.approx(0.3)
    step = accumulation(np.array([0.2, 0.2, 0.9, 0.9, 0.9, 0.9]))
    assert step["break_layer"] == 2.0 and step["max_jump"] == pytest.approx(0.7)
    assert step["growth"] == pytest.approx(0.7) and step["slope"] > 0
    assert step["max"] == pytest.approx(0.9)
    with_nan = accumulation(np.array([0.2, np.nan, 0.2, 0.9, 0.9, np.nan]))
    assert with_nan["break_layer"] == 3.0 and with_nan["max_jump"] == pytest.approx(0.7)
    assert with_nan["growth"] == pytest.approx(0.7) and with_nan["mean"] == pytest.approx(0.55)
    gap = accumulation(np.array([0.1, 0.1, np.nan, 0.5, 0.5, 0.5]))
    assert gap["break_layer"] == 3.0 and gap["max_jump"] == pytest.approx(0.4)
    assert all(math.isfinite(v) for v in (*with_nan.values(), *gap.values()))
    few = accumulation(np.array([np.nan, 0.4, np.nan]))
    assert set(few) == set(flat)
    assert (few["growth"], few["break_layer"], few["mean"]) == (0.0, -1.0, pytest.approx(0.4))


# -------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", detector_registry().names())
def test_detector_contract(name: str, base: RequestAnalysis) -> None:
    """On a real tiny-model signature every registered detector returns a DetectorResult under its own
    name with a finite float score and finite float evidence (immutable); on a signature without rows it
    returns None, so ``run_detectors`` leaves it out."""
    detect = detector_registry().get(name)
    res = detect(base.signature)
    assert isinstance(res, DetectorResult)
    assert res.name == name
    assert isinstance(res.score, float) and math.isfinite(res.score)
    assert res.evidence
    for key, value in res.evidence.items():
        assert isinstance(value, float) and math.isfinite(value), key
    with pytest.raises(TypeError):
        res.evidence["x"] = 1.0  # type: ignore[index]
    assert detect(base.signature) == res  # pure: same input, same result
    assert base.detectors[name] == res
    assert detect(ResidueSignature(rows=())) is None


def test_run_detectors_runs_every_registered_detector(base: RequestAnalysis) -> None:
    """``run_detectors`` returns one result per registered name, and nothing for a signature without rows."""
    assert set(run_detectors(base.signature)) == set(detector_registry().names())
    assert run_detectors(ResidueSignature(rows=())) == {}


def test_attention_needs_head_stats_of_the_prompt_last_row(base: RequestAnalysis) -> None:
    """No prompt_last row, or a prompt_last row without head statistics, gives no attention result."""
    sig = base.signature
    decode_only = dataclasses.replace(sig, rows=tuple(r for r in sig.rows if r.phase != "prompt_last"))
    assert detect_attention(decode_only) is None
    first = sig.rows[0]
    no_heads = dataclasses.replace(first, heads=np.zeros((first.n_layers, 0, 7), np.float32))
    assert detect_attention(dataclasses.replace(sig, rows=(no_heads, *sig.rows[1:]))) is None
