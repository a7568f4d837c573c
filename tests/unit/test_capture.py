"""Reference capture and signatures: parity with the HF model's own attention, MLP and logits; row
sampling and ``Activations`` checks; head and logit statistics by hand; ``SignatureBuilder`` shapes and
artifact checks; the end-to-end request path on the tiny model."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from residue_monitor.detectors.capture import Activations, Phase, attention_probs, capture, sampled_rows
from residue_monitor.detectors.clt.activations import capture_mlp
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, random_clt
from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput
from residue_monitor.detectors.request import GenerationConfig, RequestAnalysis, analyze_prompt, prompt_ids
from residue_monitor.detectors.signature import (
    ENTROPY,
    ERROR_RATIO,
    HEAD_STAT_NAMES,
    L0,
    LAYER_STAT_NAMES,
    LOCAL,
    SELF,
    SINK,
    SPAN_LEN,
    SPAN_LEN_COL,
    SPAN_MASS,
    SPAN_START,
    UNREACHED,
    ResidueSignature,
    SignatureBuilder,
    head_stats,
    logit_stats,
)

CFG = CLTConfig(n_layers=4, d_model=64, n_features=128, model_kind="transcoder_set", activation="topk", k=8)
GEN = GenerationConfig(max_new_tokens=6, decode_every=2)
PROMPT = "hello"
TEXT = "the river key door opens on monday and the market is closed"

Rows = list[tuple[int, Phase]]
"""Sampled rows: [(position, phase)]."""


@pytest.fixture(scope="module")
def clt() -> CrossLayerTranscoder:
    return random_clt(CFG)


@pytest.fixture(scope="module")
def builder(tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder) -> SignatureBuilder:
    return SignatureBuilder.for_model(tiny_hf[0], clt, k=16)


@pytest.fixture(scope="module")
def text_ids(tiny_hf: tuple[Any, Any]) -> list[int]:
    """Plain (no chat template) token ids of TEXT: (T,)."""
    return prompt_ids(tiny_hf[1], TEXT, chat=False)


@pytest.fixture(scope="module")
def text_rows(text_ids: list[int]) -> Rows:
    """Rows of a request whose prompt is TEXT[:-5] and that generated 4 tokens: the last sampled row is
    T - 3, so the captured keys stop before the end of the sequence."""
    rows = sampled_rows(len(text_ids) - 5, 4, 2)
    assert rows[-1][0] == len(text_ids) - 3
    return rows


@pytest.fixture(scope="module")
def analysis(tiny_hf: tuple[Any, Any], builder: SignatureBuilder) -> RequestAnalysis:
    model, tok = tiny_hf
    return analyze_prompt(model, tok, builder, PROMPT, GEN)


def _acts(
    positions: tuple[int, ...] = (3, 7),
    phases: tuple[Phase, ...] | None = None,
    L: int = 2,
    D: int = 8,
    H: int = 4,
    H_kv: int = 2,
    T: int | None = None,
    V: int = 10,
    override: dict[str, torch.Tensor] | None = None,
) -> Activations:
    """Hand-built Activations of consistent shapes (zeros); ``override`` replaces single fields."""
    n, d_head = len(positions), 4
    T = T if T is not None else (positions[-1] + 1 if positions else 1)
    fields: dict[str, torch.Tensor] = {
        "mlp_in": torch.zeros(L, n, D),
        "mlp_out": torch.zeros(L, n, D),
        "q": torch.zeros(L, n, H, d_head),
        "k": torch.zeros(L, H_kv, T, d_head),
        "logits": torch.zeros(n, V),
        "targets": torch.zeros(n, dtype=torch.long),
    }
    fields.update(override or {})
    return Activations(
        positions=positions,
        phases=phases if phases is not None else ("decode",) * n,
        attn_scale=d_head**-0.5,
        **fields,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------- capture


def test_attention_recomputed_from_qk_equals_eager_weights(
    tiny_hf: tuple[Any, Any], text_ids: list[int], text_rows: Rows
) -> None:
    """Softmax(q·Kᵀ) from the captured post-rotary queries and keys equals the eager attention weights of
    the model at every sampled row, layer and head (GQA head mapping included); keys after the last
    sampled row are not captured and carry no mass in the eager weights either."""
    model, _ = tiny_hf
    acts, _ = capture(model, text_ids, text_rows)
    probs = attention_probs(acts)  # (L, H, n, T_k)
    T_k = text_rows[-1][0] + 1
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert probs.shape == (L, H, len(text_rows), T_k)
    assert acts.k.shape[1] == model.config.num_key_value_heads < H  # the tiny model really is GQA
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([text_ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    pos = torch.tensor(acts.positions)
    for layer in range(L):
        eager = out.attentions[layer][0][:, pos, :].float()  # (H, n, T)
        torch.testing.assert_close(probs[layer], eager[..., :T_k], atol=1e-5, rtol=1e-4)
        assert bool((eager[..., T_k:] == 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(L, H, len(text_rows)))


def test_captured_mlp_and_logits_equal_the_model(
    tiny_hf: tuple[Any, Any], text_ids: list[int], text_rows: Rows
) -> None:
    """mlp_in / mlp_out at the sampled rows equal ``capture_mlp`` over the whole sequence, the row logits
    equal the model's logits, and the default targets are the rows' argmax tokens."""
    model, _ = tiny_hf
    acts, all_logits = capture(model, text_ids, text_rows, return_all_logits=True)
    ids = torch.tensor([text_ids])
    xs, ys = capture_mlp(model, ids)  # (L, 1, T, D)
    pos = torch.tensor(acts.positions)
    torch.testing.assert_close(acts.mlp_in, xs[:, 0, pos].float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acts.mlp_out, ys[:, 0, pos].float(), atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
    torch.testing.assert_close(acts.logits, logits[pos], atol=1e-5, rtol=1e-5)
    assert all_logits is not None
    torch.testing.assert_close(all_logits, logits, atol=1e-5, rtol=1e-5)
    assert acts.targets.tolist() == logits[pos].argmax(-1).tolist()
    assert acts.positions == tuple(p for p, _ in text_rows)
    assert acts.phases == tuple(ph for _, ph in text_rows)
    assert acts.attn_scale == pytest.approx(acts.q.shape[-1] ** -0.5)


def test_capture_rejects_rows_outside_the_sequence(tiny_hf: tuple[Any, Any], text_ids: list[int]) -> None:
    """Rows must be distinct increasing positions inside the sequence."""
    model, _ = tiny_hf
    T = len(text_ids)
    bad: list[Rows] = [[], [(T, "final")], [(-1, "prompt_last")], [(3, "decode"), (3, "final")]]
    for rows in bad:
        with pytest.raises(InvalidInput):
            capture(model, text_ids, rows)


# ----------------------------------------------------------------------------------------- sampled rows


@pytest.mark.parametrize(
    ("n_generated", "expected"),
    [
        (0, [(9, "prompt_last")]),
        (1, [(9, "prompt_last")]),
        (2, [(9, "prompt_last"), (10, "final")]),
        (3, [(9, "prompt_last"), (11, "final")]),
        (5, [(9, "prompt_last"), (11, "decode"), (13, "final")]),
        (6, [(9, "prompt_last"), (11, "decode"), (13, "decode"), (14, "final")]),
    ],
)
def test_sampled_rows_edge_cases(n_generated: int, expected: list[tuple[int, Phase]]) -> None:
    """prompt_last is the last prompt token; decode rows every 2nd step; final is the row that picked the
    last generated token, absent with at most one generated token (prompt_last is then that row)."""
    assert sampled_rows(10, n_generated, decode_every=2) == expected


def test_sampled_rows_are_increasing_and_inside_the_replayed_sequence() -> None:
    """For any request the rows are strictly increasing, start at the last prompt token, end at the row
    that produced the last token, and lie inside prompt + output[:-1]; decode rows sit k steps apart."""
    for P in (1, 2, 7):
        for n in range(0, 12):
            for k in (1, 2, 3, 16):
                rows = sampled_rows(P, n, k)
                pos = [p for p, _ in rows]
                assert pos == sorted(set(pos))
                assert rows[0] == (P - 1, "prompt_last")
                assert pos[-1] == P - 1 + max(n - 1, 0)
                assert pos[-1] < P + max(n - 1, 0)
                assert [(p - (P - 1)) % k for p, ph in rows if ph == "decode"] == [0] * sum(
                    ph == "decode" for _, ph in rows
                )
                assert [ph for _, ph in rows].count("final") == (1 if n >= 2 else 0)


@pytest.mark.parametrize(("P", "n", "k"), [(0, 3, 2), (-1, 3, 2), (5, 3, 0), (5, 3, -2), (5, -1, 2)])
def test_sampled_rows_invalid_arguments(P: int, n: int, k: int) -> None:
    """An empty prompt, a non-positive stride or a negative generated count raise InvalidInput."""
    with pytest.raises(InvalidInput):
        sampled_rows(P, n, k)


# ---------------------------------------------------------------------------------- Activations checks


def test_activations_accept_consistent_shapes() -> None:
    """The hand-built helper is valid, so each failure below is caused by its one bad field."""
    acts = _acts()
    assert acts.n_layers == 2


@pytest.mark.parametrize("positions", [(3, 3), (7, 3), (2, 5, 4)])
def test_activations_reject_non_increasing_positions(positions: tuple[int, ...]) -> None:
    """Row positions must be strictly increasing."""
    with pytest.raises(InvalidInput, match="increasing"):
        _acts(positions=positions, T=8)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("mlp_in", torch.zeros(2, 3, 8)),
        ("mlp_out", torch.zeros(2, 2, 9)),
        ("q", torch.zeros(2, 1, 4, 4)),
        ("q", torch.zeros(3, 2, 4, 4)),
        ("k", torch.zeros(2, 2, 7, 4)),  # no key for the last row (position 7)
        ("k", torch.zeros(3, 2, 8, 4)),
        ("logits", torch.zeros(3, 10)),
        ("targets", torch.zeros(2, 1, dtype=torch.long)),
    ],
)
def test_activations_reject_inconsistent_shapes(field: str, bad: torch.Tensor) -> None:
    """Every field must agree with the row count and the layer count; the error names the field."""
    with pytest.raises(InvalidInput, match=field):
        _acts(override={field: bad})


def test_activations_need_rows_and_one_phase_per_row() -> None:
    """Zero rows or a phase count different from the row count raise InvalidInput."""
    with pytest.raises(InvalidInput):
        _acts(phases=("decode",))
    with pytest.raises(InvalidInput):
        _acts(positions=(), phases=())


# ----------------------------------------------------------------------------------------- head stats


def _rows_probs(T_k: int, rows: list[torch.Tensor]) -> torch.Tensor:
    """(1, 1, n, T_k) from n per-row distributions (each padded with zeros to T_k)."""
    out = torch.zeros(1, 1, len(rows), T_k)
    for r, p in enumerate(rows):
        out[0, 0, r, : p.shape[0]] = p
    return out


def test_head_stats_uniform_attention() -> None:
    """Uniform attention over keys 0..pos: entropy log(pos+1), self and sink 1/(pos+1), local
    min(8, pos)/(pos+1), a 4-key span holding 4/(pos+1) that ends at or before the query."""
    positions = [3, 5, 10, 19]
    T_k = 20
    probs = _rows_probs(T_k, [torch.full((p + 1,), 1.0 / (p + 1)) for p in positions])
    hs = head_stats(probs, torch.tensor(positions))[0, 0]  # (n, 7)
    assert hs.shape == (len(positions), len(HEAD_STAT_NAMES))
    for r, p in enumerate(positions):
        m = p + 1
        assert hs[r, ENTROPY] == pytest.approx(math.log(m), abs=1e-5)
        assert hs[r, SELF] == pytest.approx(1 / m, abs=1e-6)
        assert hs[r, SINK] == pytest.approx(1 / m, abs=1e-6)
        assert hs[r, LOCAL] == pytest.approx(min(8, p) / m, abs=1e-6)
        assert hs[r, SPAN_LEN_COL] == SPAN_LEN
        assert hs[r, SPAN_MASS] == pytest.approx(SPAN_LEN / m, abs=1e-6)
        assert hs[r, SPAN_START] >= 0 and hs[r, SPAN_START] + hs[r, SPAN_LEN_COL] - 1 <= p


@pytest.mark.parametrize(("pos", "j"), [(12, 0), (12, 12), (12, 6), (12, 4), (12, 11), (3, 0), (3, 3)])
def test_head_stats_one_hot_attention(pos: int, j: int) -> None:
    """All mass on key j: entropy 0, the span contains j with mass 1 and ends at or before the query;
    self / sink / local are 1 exactly when j is the query / key 0 / one of the 8 keys before the query."""
    p = torch.zeros(pos + 1)
    p[j] = 1.0
    hs = head_stats(_rows_probs(16, [p]), torch.tensor([pos]))[0, 0, 0]
    start, length = int(hs[SPAN_START]), int(hs[SPAN_LEN_COL])
    assert hs[ENTROPY] == pytest.approx(0.0, abs=1e-6)
    assert start <= j <= start + length - 1 <= pos
    assert hs[SPAN_MASS] == pytest.approx(1.0)
    assert hs[SELF] == float(j == pos)
    assert hs[SINK] == float(j == 0)
    assert hs[LOCAL] == float(pos - 8 <= j < pos)


def test_head_stats_span_never_extends_past_the_query() -> None:
    """Even for non-causal input (mass on later keys) the reported span ends at or before the row's own
    position and its mass counts only keys up to it; a row earlier than the span length gets the span
    0..pos."""
    T_k = 16
    positions = [0, 1, 2, 3, 9]
    probs = torch.zeros(1, 1, len(positions), T_k)
    probs[..., 2:6] = 0.1  # mass right after the early queries
    probs[..., T_k - 4 :] = 0.15  # and after every query
    hs = head_stats(probs, torch.tensor(positions))[0, 0]
    for r, p in enumerate(positions):
        start, length = int(hs[r, SPAN_START]), int(hs[r, SPAN_LEN_COL])
        assert start >= 0 and length == min(SPAN_LEN, p + 1)
        assert start + length - 1 <= p, (p, start, length)
        assert hs[r, SPAN_MASS] == pytest.approx(float(probs[0, 0, r, start : start + length].sum()))
    assert hs[:, SPAN_MASS].tolist() == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.4])


# ---------------------------------------------------------------------------------------- logit stats


def test_logit_stats_hand_values() -> None:
    """Entropy, top-1 probability, top1 − top2 margin and EOS probability of known distributions;
    no EOS id gives 0; −inf logits (masked tokens) do not produce NaN."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    logits = p.log()  # the zero probability becomes −inf
    s = logit_stats(logits, eos_id=3)
    h0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    h1 = -(3 * 0.1 * math.log(0.1) + 0.7 * math.log(0.7))
    torch.testing.assert_close(s, torch.tensor([[h0, 0.5, 0.2, 0.0], [h1, 0.7, 0.6, 0.7]]))
    assert logit_stats(logits, eos_id=None)[:, 3].tolist() == [0.0, 0.0]
    u = logit_stats(torch.zeros(1, 8), eos_id=0)[0]
    torch.testing.assert_close(u, torch.tensor([math.log(8), 1 / 8, 0.0, 1 / 8]))


# ------------------------------------------------------------------------------------ signature build


def test_signature_shapes_ranges_and_read_only(
    tiny_hf: tuple[Any, Any],
    builder: SignatureBuilder,
    text_ids: list[int],
    text_rows: Rows,
) -> None:
    """Per row: (L, k) feature ids / values (inactive slots 0), (L, 6) layer stats with 0 ≤ l0 ≤ the
    transcoder's active count ≤ n_features, error_ratio ≥ 0, unreached in [0, 1]; (L, H, 7) head stats;
    4 logit stats; every array read-only; the request fields are passed through."""
    model, _ = tiny_hf
    acts, _ = capture(model, text_ids, text_rows)
    sig = builder.build(acts, prompt_tokens=7, output_tokens=4, stopped=True, meta={"a": 1})
    L, H = CFG.n_layers, model.config.num_attention_heads
    assert (sig.prompt_tokens, sig.output_tokens, sig.stopped, sig.empty_output) == (7, 4, True, False)
    assert sig.clt_id == builder.clt.clt_id() and sig.meta == {"a": 1}
    assert [(r.position, r.phase) for r in sig.rows] == text_rows
    assert sig.n_layers == L
    for row in sig.rows:
        assert row.feature_ids.shape == row.feature_values.shape == (L, 16)
        assert row.feature_ids.dtype == np.int32 and row.feature_values.dtype == np.float32
        assert (row.feature_values >= 0).all()
        assert (row.feature_ids[row.feature_values == 0] == 0).all()
        assert ((row.feature_ids >= 0) & (row.feature_ids < CFG.n_features)).all()
        assert row.layer_stats.shape == (L, len(LAYER_STAT_NAMES))
        l0 = row.column("l0")
        assert (l0 >= 0).all() and (l0 <= CFG.n_features).all() and (l0 <= (CFG.k or 0)).all()
        np.testing.assert_array_equal(l0, (row.feature_values > 0).sum(-1))
        assert (row.layer_stats[:, ERROR_RATIO] >= 0).all()
        unreached = row.layer_stats[:, UNREACHED]
        assert ((unreached >= 0) & (unreached <= 1)).all()
        assert row.heads.shape == (L, H, len(HEAD_STAT_NAMES))
        assert row.logits.shape == (4,) and np.isfinite(row.logits).all()
        for a in (row.feature_ids, row.feature_values, row.layer_stats, row.heads, row.logits):
            assert not a.flags.writeable
            with pytest.raises(ValueError):
                a[0] = 0
    assert sig.row("prompt_last") is sig.rows[0]
    assert sig.last_row is sig.row("final") is sig.rows[-1]
    assert int(sig.rows[0].layer_stats[0, L0]) == int(sig.rows[0].column("l0")[0])


def test_signature_without_heads(
    tiny_hf: tuple[Any, Any],
    clt: CrossLayerTranscoder,
    text_ids: list[int],
    text_rows: Rows,
) -> None:
    """``with_heads=False`` gives (L, 0, 7) head arrays; the layer stats do not depend on it."""
    model, _ = tiny_hf
    acts, _ = capture(model, text_ids, text_rows)
    with_h = SignatureBuilder.for_model(model, clt).build(acts)
    without = SignatureBuilder.for_model(model, clt, with_heads=False).build(acts)
    for a, b in zip(with_h.rows, without.rows, strict=True):
        assert b.heads.shape == (CFG.n_layers, 0, len(HEAD_STAT_NAMES))
        np.testing.assert_array_equal(a.layer_stats, b.layer_stats)
        np.testing.assert_array_equal(a.feature_ids, b.feature_ids)


def test_builder_rejects_mismatched_artifacts(clt: CrossLayerTranscoder) -> None:
    """A readout whose width differs from the transcoder's d_model, or activations with a different
    layer count than the transcoder, raise ArtifactMismatch."""
    with pytest.raises(ArtifactMismatch):
        SignatureBuilder(clt, torch.randn(50, CFG.d_model + 1))
    with pytest.raises(ArtifactMismatch):
        SignatureBuilder(clt, torch.randn(CFG.d_model))
    builder = SignatureBuilder(clt, torch.randn(50, CFG.d_model))
    acts = _acts(L=CFG.n_layers - 1, D=CFG.d_model, V=50)
    with pytest.raises(ArtifactMismatch):
        builder.build(acts)


# ------------------------------------------------------------------------------------- request path


def test_analyze_prompt_rows_and_counts(tiny_hf: tuple[Any, Any], analysis: RequestAnalysis) -> None:
    """The signature's rows are ``sampled_rows(prompt, output, decode_every)``; token counts, baselines and
    the sampling settings agree with the generated output."""
    _, tok = tiny_hf
    out, P = analysis.output_ids, len(analysis.prompt_ids)
    sig = analysis.signature
    assert list(analysis.prompt_ids) == prompt_ids(tok, PROMPT)
    assert 1 <= len(out) <= GEN.max_new_tokens
    assert [(r.position, r.phase) for r in sig.rows] == sampled_rows(P, len(out), GEN.decode_every)
    assert sig.prompt_tokens == P and sig.output_tokens == len(out)
    assert analysis.baselines.output_tokens == len(out)
    assert sig.meta["max_new_tokens"] == GEN.max_new_tokens and sig.meta["decode_every"] == 2
    first = sig.row("prompt_last")
    assert first is not None
    assert float(first.logits[0]) == pytest.approx(analysis.baselines.first_token_entropy, abs=1e-5)
    assert float(first.logits[1]) == pytest.approx(analysis.baselines.first_token_max_prob, abs=1e-6)
    assert set(analysis.detectors) == {"attention", "errors", "nullout"}


def test_analyze_prompt_targets_are_the_generated_tokens(
    tiny_hf: tuple[Any, Any], builder: SignatureBuilder, analysis: RequestAnalysis
) -> None:
    """Each row's target is the token generated from that row: replaying prompt + output[:-1] without
    targets, the rows' argmax (greedy) is exactly the generated token, and the signature built from that
    replay equals the request's signature (unreached fractions included)."""
    model, _ = tiny_hf
    P, out = len(analysis.prompt_ids), list(analysis.output_ids)
    rows: Rows = [(r.position, r.phase) for r in analysis.signature.rows]
    acts, _ = capture(model, list(analysis.prompt_ids) + out[:-1], rows)
    assert acts.targets.tolist() == [out[p - (P - 1)] for p, _ in rows]
    replay = builder.build(acts)
    for a, b in zip(analysis.signature.rows, replay.rows, strict=True):
        np.testing.assert_allclose(a.layer_stats, b.layer_stats, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a.feature_ids, b.feature_ids)
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-7)


def test_analyze_prompt_is_deterministic(
    tiny_hf: tuple[Any, Any], builder: SignatureBuilder, analysis: RequestAnalysis
) -> None:
    """Two runs of the same request give the same output and identical signatures and detector results."""
    model, tok = tiny_hf
    again = analyze_prompt(model, tok, builder, PROMPT, GEN)
    assert again.output_ids == analysis.output_ids and again.output_text == analysis.output_text
    _assert_same_signature(again.signature, analysis.signature)
    assert again.detectors == analysis.detectors
    assert again.baselines == analysis.baselines


def _assert_same_signature(a: ResidueSignature, b: ResidueSignature) -> None:
    assert dataclasses.replace(a, rows=()).__dict__ == dataclasses.replace(b, rows=()).__dict__
    assert len(a.rows) == len(b.rows)
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert (ra.position, ra.phase) == (rb.position, rb.phase)
        for name in ("feature_ids", "feature_values", "layer_stats", "heads", "logits"):
            np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name), err_msg=name)


@pytest.mark.parametrize(("n_new", "every"), [(1, 4), (2, 4), (9, 4), (12, 3)])
def test_capture_during_generation_equals_generate_then_replay(tiny_hf, n_new: int, every: int) -> None:
    """generate_and_capture (KV-cached decode, rows read on the fly, as the live plugin does) gives the
    tokens of HF's own greedy generate() and, at every sampled row, the activations, q/K, logits and
    targets that one replay forward over prompt + output[:-1] gives, to fp32 tolerance."""
    from residue_monitor.detectors.capture import generate_and_capture
    from residue_monitor.detectors.request import _eos_ids, generate, prompt_ids

    model, tok = tiny_hf
    ids = prompt_ids(tok, "What is the capital of France? the river key door")
    out, acts, step_logits = generate_and_capture(model, ids, n_new, _eos_ids(model, tok), every)
    assert out == generate(model, tok, ids, n_new)
    rows = sampled_rows(len(ids), len(out), every)
    assert list(zip(acts.positions, acts.phases, strict=True)) == rows
    P = len(ids)
    ref, all_logits = capture(model, [*ids, *out[:-1]], rows, return_all_logits=True)
    assert all_logits is not None
    for name in ("mlp_in", "mlp_out", "q", "k", "logits"):
        torch.testing.assert_close(getattr(acts, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    assert acts.targets.tolist() == [out[p - (P - 1)] for p, _ in rows]
    torch.testing.assert_close(step_logits, all_logits[P - 1 :], atol=1e-5, rtol=1e-5)
