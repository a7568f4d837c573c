"""Output-only baselines: hand-computed values on tiny logits, position convention, nan and shape rules."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from residue_monitor.detectors.baselines import BASELINE_NAMES, Baselines, compute_baselines
from residue_monitor.detectors.exceptions import InvalidInput


def test_uniform_distribution_has_entropy_log_v() -> None:
    """Equal logits: entropy = log V, top-1 probability = 1 / V, perplexity = V."""
    V, prompt_len, generated = 8, 3, [1, 5, 2]
    logits = torch.zeros(prompt_len + len(generated) - 1, V)
    b = compute_baselines(logits, prompt_len, generated)
    assert b.first_token_entropy == pytest.approx(math.log(V), rel=1e-6)
    assert b.first_token_max_prob == pytest.approx(1 / V, rel=1e-6)
    assert b.mean_token_entropy == pytest.approx(math.log(V), rel=1e-6)
    assert b.min_max_prob == pytest.approx(1 / V, rel=1e-6)
    assert b.perplexity == pytest.approx(V, rel=1e-6)
    assert b.output_tokens == 3


def test_one_hot_like_distribution_is_certain() -> None:
    """One dominant logit: top-1 probability ≈ 1, entropy ≈ 0, perplexity ≈ 1 when that token is sampled."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    b = compute_baselines(logits, prompt_len=2, generated=[0])
    assert b.first_token_max_prob == pytest.approx(1.0, abs=1e-9)
    assert b.first_token_entropy == pytest.approx(0.0, abs=1e-9)
    assert b.perplexity == pytest.approx(1.0, abs=1e-9)


def test_perplexity_of_tokens_with_probability_half_is_two() -> None:
    """Every generated token has probability 0.5 (at different vocab positions): perplexity = 2."""
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.1, 0.4, 0.5]])
    prompt_rows = torch.full((2, 3), 9.0)  # rows before the last prompt position are never read
    logits = torch.cat([prompt_rows, probs.log()])  # (T=5, V=3) with prompt_len=3, 3 generated
    b = compute_baselines(logits, prompt_len=3, generated=[0, 1, 2])
    assert b.perplexity == pytest.approx(2.0, rel=1e-6)
    h = [-(p * p.log()).sum().item() for p in probs]
    assert b.first_token_entropy == pytest.approx(h[0], rel=1e-6)
    assert b.mean_token_entropy == pytest.approx(sum(h) / 3, rel=1e-6)
    assert b.min_max_prob == pytest.approx(0.5, rel=1e-6)
    assert b.mean_max_prob == pytest.approx(0.5, rel=1e-6)


def test_rows_follow_the_causal_shift() -> None:
    """Row prompt_len − 1 + j predicts generated[j]: swapping which token is sampled changes perplexity."""
    logits = torch.tensor([[0.0, 0.0], [math.log(0.8), math.log(0.2)], [math.log(0.3), math.log(0.7)]])
    b = compute_baselines(logits, prompt_len=2, generated=[0, 1])
    assert b.perplexity == pytest.approx(math.exp(-(math.log(0.8) + math.log(0.7)) / 2), rel=1e-6)
    assert b.first_token_max_prob == pytest.approx(0.8, rel=1e-6)
    assert b.min_max_prob == pytest.approx(0.7, rel=1e-6)
    assert b.mean_max_prob == pytest.approx(0.75, rel=1e-6)


def test_no_generation_gives_nan_for_generated_position_baselines() -> None:
    """Nothing generated: first-token baselines are defined (T = prompt_len), the rest are nan."""
    b = compute_baselines(torch.zeros(4, 5), prompt_len=4, generated=[])
    assert b.first_token_entropy == pytest.approx(math.log(5), rel=1e-6)
    assert b.first_token_max_prob == pytest.approx(0.2, rel=1e-6)
    for name in ("mean_token_entropy", "min_max_prob", "mean_max_prob", "perplexity"):
        assert math.isnan(getattr(b, name)), name
    assert b.output_tokens == 0


def test_masked_tokens_do_not_make_entropy_nan() -> None:
    """−inf logits (masked tokens) contribute 0 · log 0 = 0; a sampled masked token gives perplexity inf."""
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    b = compute_baselines(logits, prompt_len=1, generated=[0])
    assert b.first_token_entropy == pytest.approx(math.log(2), rel=1e-6)
    assert compute_baselines(logits, prompt_len=1, generated=[3]).perplexity == math.inf


def test_half_precision_logits_are_accepted() -> None:
    """bf16 logits are upcast before log_softmax, giving the float32 values."""
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    ref = compute_baselines(logits.bfloat16().float(), prompt_len=2, generated=[3, 4, 5])
    got = compute_baselines(logits.bfloat16(), prompt_len=2, generated=[3, 4, 5])
    assert got == ref


def test_names_registry_matches_fields() -> None:
    """BASELINE_NAMES are the field names, and as_dict is keyed by them with float values."""
    assert tuple(f.name for f in fields(Baselines)) == BASELINE_NAMES
    d = compute_baselines(torch.zeros(2, 3), prompt_len=1, generated=[0, 1]).as_dict()
    assert tuple(d) == BASELINE_NAMES
    assert all(isinstance(v, float) for v in d.values())
    assert d["output_tokens"] == 2.0


@pytest.mark.parametrize(
    ("logits", "prompt_len", "generated", "match"),
    [
        (torch.zeros(5), 5, [], "2-D"),
        (torch.zeros(4, 3), 3, [0], "T = "),  # one token generated needs T = prompt_len
        (torch.zeros(4, 3), 3, [0, 1, 2], "T = "),
        (torch.zeros(3, 3), 4, [], "T = "),
        (torch.zeros(3, 3), 0, [], "prompt_len"),
        (torch.zeros(3, 3), 3, [3], r"\[0, 3\)"),
        (torch.zeros(3, 3), 3, [-1], r"\[0, 3\)"),
        (torch.zeros(3, 3, dtype=torch.long), 3, [0], "floating"),
        (torch.full((3, 3), math.nan), 3, [0], "NaN"),
        (torch.full((3, 3), -math.inf), 3, [0], "all -inf"),
    ],
)
def test_shape_and_value_errors_raise(
    logits: torch.Tensor, prompt_len: int, generated: list[int], match: str
) -> None:
    """A wrong rank, T not matching prompt_len + generated, bad ids or NaN logits raise InvalidInput."""
    with pytest.raises(InvalidInput, match=match):
        compute_baselines(logits, prompt_len, generated)
