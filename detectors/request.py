"""One request end to end on the HF reference path: generate, capture, sign, detect, baselines.

Generation follows what a vLLM OpenAI chat request does by default here: the tokenizer's chat template
with the generation prompt, greedy decoding (temperature 0), stop at EOS or after ``max_new_tokens``.
The rows DESIGN.md §4 names are captured while the model generates (prefill, then one cached decode
step per token), as the live plugin captures them, so the signature is the one the plugin would ship for
the same token ids, and no second forward pass replays the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from residue_monitor.detectors.base import DetectorResult
from residue_monitor.detectors.baselines import Baselines, compute_baselines
from residue_monitor.detectors.capture import generate_and_capture
from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.detectors.signature import ResidueSignature, SignatureBuilder
from residue_monitor.detectors.suite import run_detectors


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """How a request is generated and sampled."""

    max_new_tokens: int = 24
    """Generation budget (vLLM's ``max_tokens``)."""
    decode_every: int = 16
    """Sample every k-th decode token (DESIGN.md §4)."""
    chat: bool = True
    """Apply the tokenizer's chat template (with the generation prompt)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.decode_every < 1:
            raise InvalidInput(f"decode_every must be ≥ 1, got {self.decode_every}")


@dataclass(frozen=True, eq=False)
class RequestAnalysis:
    """Everything the reference path knows about one request."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    """Generated tokens, including a final EOS when generation stopped on it."""
    output_text: str
    """Decoded output without special tokens."""
    signature: ResidueSignature
    detectors: dict[str, DetectorResult]
    baselines: Baselines
    raw_mlp_in: torch.Tensor | None = None
    """(len(raw_layers), D) raw MLP inputs at the last prompt token, when ``raw_layers`` asked for them: the
    input of the raw-activation probe that residue is compared against (evaluation only)."""


def prompt_ids(tok: Any, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of ``prompt``: the chat template with the generation prompt when ``chat`` and the
    tokenizer has one, else the plain encoding."""
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tok(prompt)["input_ids"])


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tok):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, list | tuple):
            ids.update(int(x) for x in e)  # type: ignore[union-attr]
    return ids


@torch.inference_mode()
def generate(model: Any, tok: Any, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy generation from ``ids``; returns the new tokens (a stop token, if hit, included)."""
    t = torch.tensor([list(ids)])
    eos = sorted(_eos_ids(model, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    out = model.generate(
        input_ids=t,
        attention_mask=torch.ones_like(t),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=pad,
    )
    gen: list[int] = out[0, t.shape[1] :].tolist()
    # generate() pads after EOS in batches; a single sequence stops at the first stop token.
    for i, tkn in enumerate(gen):
        if tkn in eos:
            return gen[: i + 1]
    return gen


def analyze_ids(
    model: Any,
    tok: Any,
    builder: SignatureBuilder,
    ids: Sequence[int],
    gen: GenerationConfig | None = None,
    meta: dict[str, Any] | None = None,
    raw_layers: Sequence[int] = (),
) -> RequestAnalysis:
    """Generate from prompt token ids and read the request's residue (``raw_layers``: also keep the raw
    MLP inputs of these layers at the last prompt token)."""
    gen = gen or GenerationConfig()
    if not ids:
        raise InvalidInput("the prompt has no tokens")
    eos = _eos_ids(model, tok)
    P = len(ids)
    out, acts, step_logits = generate_and_capture(model, ids, gen.max_new_tokens, eos, gen.decode_every)
    stopped = bool(out) and out[-1] in eos
    content = [t for t in out if t not in eos]
    sig = builder.build(
        acts,
        prompt_tokens=P,
        output_tokens=len(out),
        empty_output=not content,
        stopped=stopped,
        meta={"max_new_tokens": gen.max_new_tokens, "decode_every": gen.decode_every, **(meta or {})},
    )
    return RequestAnalysis(
        prompt_ids=tuple(ids),
        output_ids=tuple(out),
        output_text=tok.decode(content, skip_special_tokens=True),
        signature=sig,
        detectors=run_detectors(sig),
        baselines=compute_baselines(step_logits, 1, out),  # row j of step_logits chose token j
        raw_mlp_in=acts.mlp_in[list(raw_layers), 0].clone() if raw_layers else None,  # row 0: prompt_last
    )


def analyze_prompt(
    model: Any, tok: Any, builder: SignatureBuilder, prompt: str, gen: GenerationConfig | None = None
) -> RequestAnalysis:
    """``analyze_ids`` on a text prompt (chat template applied unless ``gen.chat`` is False)."""
    gen = gen or GenerationConfig()
    return analyze_ids(model, tok, builder, prompt_ids(tok, prompt, gen.chat), gen)


def analyze_many(
    model: Any,
    tok: Any,
    builder: SignatureBuilder,
    prompts: Iterable[str],
    gen: GenerationConfig | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[RequestAnalysis]:
    """``analyze_prompt`` over many prompts, one at a time (greedy results do not depend on batching);
    ``on_done(i)`` after each (progress bars)."""
    out = []
    for i, p in enumerate(prompts):
        out.append(analyze_prompt(model, tok, builder, p, gen))
        if on_done is not None:
            on_done(i)
    return out
