"""Offline analysis of one prompt on the HF path: generate, capture the last prompt token, encode it.

The residue engine (signatures, detectors, fingerprints) builds on this; for now it yields the per-layer
transcoder readout the demo prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from residue_monitor.detectors.clt.activations import capture_mlp
from residue_monitor.detectors.clt.encode import RowCodes, encode_rows
from residue_monitor.detectors.clt.model import CrossLayerTranscoder


@dataclass(frozen=True)
class PromptReadout:
    prompt: str
    output: str
    prompt_tokens: int
    output_tokens: int
    codes: RowCodes
    """Transcoder readout of the last prompt token (n = 1)."""


def prompt_ids(tok: Any, prompt: str, chat: bool = True) -> list[int]:
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tok(prompt)["input_ids"])


@torch.no_grad()
def analyze_prompt(
    model: Any, tok: Any, clt: CrossLayerTranscoder, prompt: str, max_new_tokens: int = 24, chat: bool = True
) -> PromptReadout:
    ids = torch.tensor([prompt_ids(tok, prompt, chat)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    gen = out[0, ids.shape[1] :]
    xs, ys = capture_mlp(model, ids)
    codes = encode_rows(clt, xs[:, 0, -1:], ys[:, 0, -1:])
    return PromptReadout(
        prompt=prompt,
        output=tok.decode(gen, skip_special_tokens=True),
        prompt_tokens=int(ids.shape[1]),
        output_tokens=int(gen.shape[0]),
        codes=codes,
    )
