"""Output-only baselines: what the logits alone say about a request, to compare residue against.

A residue signal is only interesting if it predicts something the output distribution does not
already show. These baselines are the usual confidence measures read from one forward pass over
prompt + generated tokens: entropy and top-1 probability of the first answer token's distribution,
their mean / minimum over the generated positions, and the perplexity of the generated tokens.

Position convention (causal LM): ``logits`` (T, V) come from a forward pass over
``prompt + generated[:-1]``, so row ``prompt_len - 1`` predicts ``generated[0]`` and row
``prompt_len - 1 + j`` predicts ``generated[j]``; T = prompt_len + len(generated) − 1, or prompt_len when
zero or one token was generated. Everything is computed with ``log_softmax`` (no exp overflow) in
float32 or wider, reduced in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from residue_monitor.detectors.exceptions import InvalidInput


@dataclass(frozen=True, slots=True)
class Baselines:
    """Output-only confidence measures of one request (nan where no token was generated)."""

    first_token_entropy: float
    """Entropy (nats) of the next-token distribution at the last prompt position."""
    first_token_max_prob: float
    """Top-1 probability at the last prompt position."""
    mean_token_entropy: float
    """Mean entropy (nats) over the positions that produced generated tokens (nan if none)."""
    min_max_prob: float
    """Minimum over those positions of the top-1 probability (nan if none)."""
    mean_max_prob: float
    """Mean over those positions of the top-1 probability (nan if none)."""
    perplexity: float
    """``exp(−mean log p(generated token))`` (nan if none)."""
    output_tokens: int
    """Number of generated tokens."""

    def as_dict(self) -> dict[str, float]:
        """Name → value for every baseline, keyed by :data:`BASELINE_NAMES`."""
        return {name: float(getattr(self, name)) for name in BASELINE_NAMES}


BASELINE_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Baselines))
"""The baselines' names, in field order: the keys of :meth:`Baselines.as_dict`."""


@torch.no_grad()
def compute_baselines(logits: torch.Tensor, prompt_len: int, generated: Sequence[int]) -> Baselines:
    """Baselines of one request from its full-sequence logits.

    logits: (T, V) with T = prompt_len + max(len(generated) − 1, 0) (see the module docstring);
    generated: the sampled token ids, each in [0, V). Raises ``InvalidInput`` on a shape or id mismatch
    or on NaN / +inf logits.
    """
    if logits.ndim != 2:
        raise InvalidInput(f"logits must be 2-D (T, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise InvalidInput(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    n_rows, V = logits.shape  # (T, V)
    if V < 1:
        raise InvalidInput("logits must have a vocabulary dimension V >= 1, got 0")
    if prompt_len < 1:
        raise InvalidInput(f"prompt_len must be >= 1, got {prompt_len}")
    n_gen = len(generated)
    expected_T = prompt_len + max(n_gen - 1, 0)
    if n_rows != expected_T:
        raise InvalidInput(
            f"logits must have T = prompt_len + max(len(generated) - 1, 0) = {expected_T} rows "
            f"(prompt_len={prompt_len}, {n_gen} generated), got {n_rows}"
        )
    tokens = torch.as_tensor(list(generated), dtype=torch.long, device=logits.device)  # (G,)
    if n_gen and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise InvalidInput(f"generated token ids must be in [0, {V}), got {tokens.min()}..{tokens.max()}")

    # Only the rows that predict the first and the generated tokens matter: (max(G, 1), V).
    rows = logits[prompt_len - 1 :].detach()
    rows = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
    if bool(torch.isnan(rows).any()) or bool(torch.isposinf(rows).any()):
        raise InvalidInput("logits must not contain NaN or +inf")
    logp = torch.log_softmax(rows, dim=-1)  # (max(G, 1), V)
    if not bool(torch.isfinite(logp.amax(dim=-1)).all()):
        raise InvalidInput("every logits row needs at least one finite entry (a row is all -inf)")
    p = logp.exp()
    # p · log p with 0 · log 0 = 0, so -inf logits (masked tokens) do not turn the entropy into NaN.
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1).double()  # (max(G, 1),)
    max_prob = p.amax(dim=-1).double()  # (max(G, 1),)

    nan = math.nan
    mean_entropy = min_max = mean_max = ppl = nan
    if n_gen:
        token_logp = logp.gather(1, tokens[:, None]).squeeze(1).double()  # (G,)
        mean_entropy = float(entropy.mean())
        min_max = float(max_prob.min())
        mean_max = float(max_prob.mean())
        ppl = float(torch.exp(-token_logp.mean()))  # inf, not OverflowError, for p → 0
    return Baselines(
        first_token_entropy=float(entropy[0]),
        first_token_max_prob=float(max_prob[0]),
        mean_token_entropy=mean_entropy,
        min_max_prob=min_max,
        mean_max_prob=mean_max,
        perplexity=ppl,
        output_tokens=n_gen,
    )
