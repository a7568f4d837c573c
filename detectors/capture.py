"""Reference capture on an HF Llama: the :class:`Activations` of a request's sampled rows.

The live vLLM plugin produces the same type from inside the engine; everything downstream (signatures,
detectors, fingerprints) reads only ``Activations``, so the two paths agree by construction and can be
compared tensor by tensor.

What is captured, for the sampled query rows only (DESIGN.md §4):

* the MLP input and output of every layer (for CLT encoding and the reconstruction error);
* post-rotary queries of the sampled rows and post-rotary keys of every position up to the last sampled
  row: attention weights are recomputed from ``q · Kᵀ`` afterwards, which is what the live path can do
  too (vLLM never materialises attention probabilities), so no eager attention is needed here either;
* the next-token logits of the sampled rows.

Hooks read the projections the model computes anyway (``q_proj`` / ``k_proj`` outputs and the rotary
``cos``/``sin`` the attention module receives), so capture adds no matmul to the forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from residue_monitor.detectors.clt.activations import decoder_layers, mlp_hooks
from residue_monitor.detectors.exceptions import InvalidInput

Phase = Literal["prompt_last", "decode", "final"]
"""Where a row was sampled: the last prompt token, a strided decode step, the final generated token."""
PHASES: tuple[Phase, ...] = ("prompt_last", "decode", "final")


@dataclass(frozen=True, eq=False)
class Activations:
    """Captured internals of one request's sampled rows (``n`` rows, ``L`` layers)."""

    positions: tuple[int, ...]
    """(n,) absolute token positions of the sampled rows, increasing."""
    phases: tuple[Phase, ...]
    """(n,) the sampling rule of each row."""
    mlp_in: torch.Tensor
    """(L, n, D) MLP inputs (after the post-attention norm)."""
    mlp_out: torch.Tensor
    """(L, n, D) MLP outputs."""
    q: torch.Tensor
    """(L, n, H, d_head) post-rotary queries of the sampled rows."""
    k: torch.Tensor
    """(L, H_kv, T, d_head) post-rotary keys of positions 0..T-1, T ≥ last sampled position + 1; T = 0 when
    the head statistics were computed at capture time (the live plugin reads keys in vLLM's KV cache)."""
    logits: torch.Tensor
    """(n, V) next-token logits at the sampled rows."""
    targets: torch.Tensor
    """(n,) int64: the token each row's logits produced (the emitted token; EOS when the request stopped)."""
    attn_scale: float
    """Softmax scale of the attention scores (``d_head ** -0.5`` for Llama)."""

    def __post_init__(self) -> None:
        n = len(self.positions)
        L = self.mlp_in.shape[0]
        if len(self.phases) != n or n == 0:
            raise InvalidInput(
                f"need one phase per row and at least one row; got {n} rows, {len(self.phases)} phases"
            )
        if list(self.positions) != sorted(set(self.positions)):
            raise InvalidInput(f"positions must be strictly increasing, got {self.positions}")
        checks = {
            "mlp_in": (self.mlp_in.ndim == 3 and self.mlp_in.shape[1] == n),
            "mlp_out": (self.mlp_out.shape == self.mlp_in.shape),
            "q": (self.q.ndim == 4 and self.q.shape[:2] == (L, n)),
            # T = 0: no keys, the head statistics were computed where the keys live (the live plugin).
            "k": (
                self.k.ndim == 4
                and self.k.shape[0] == L
                and (self.k.shape[2] == 0 or self.k.shape[2] > self.positions[-1])
            ),
            "logits": (self.logits.ndim == 2 and self.logits.shape[0] == n),
            "targets": (tuple(self.targets.shape) == (n,)),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidInput(f"Activations fields with inconsistent shapes: {', '.join(bad)}")

    @property
    def n_layers(self) -> int:
        return int(self.mlp_in.shape[0])


def sampled_rows(prompt_len: int, n_generated: int, decode_every: int = 16) -> list[tuple[int, Phase]]:
    """(position, phase) of the rows DESIGN.md §4 samples for a request.

    PROMPT_LAST is the last prompt token (its logits pick the first output token); DECODE rows are every
    ``decode_every``-th decode step; FINAL is the row whose logits picked the last generated token (absent
    when at most one token was generated: then PROMPT_LAST is that row).
    """
    if prompt_len < 1:
        raise InvalidInput(f"prompt_len must be ≥ 1, got {prompt_len}")
    if decode_every < 1:
        raise InvalidInput(f"decode_every must be ≥ 1, got {decode_every}")
    if n_generated < 0:
        raise InvalidInput(f"n_generated must be ≥ 0, got {n_generated}")
    last = prompt_len - 1
    rows: list[tuple[int, Phase]] = [(last, "prompt_last")]
    for j in range(decode_every, n_generated - 1, decode_every):
        rows.append((last + j, "decode"))
    if n_generated >= 2:
        rows.append((prompt_len + n_generated - 2, "final"))
    return rows


@contextmanager
def qk_hooks(model: nn.Module, store: dict[int, dict[str, Any]]) -> Iterator[None]:
    """Record each layer's q/k projections and rotary tables into ``store[layer]`` during a forward."""
    handles: list[Any] = []
    for i, layer in enumerate(decoder_layers(model)):
        attn: nn.Module = layer.self_attn  # type: ignore[assignment]
        slot = store.setdefault(i, {})

        def pre(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], slot: dict[str, Any] = slot
        ) -> None:
            slot["rope"] = kwargs.get("position_embeddings")

        def keep(name: str, slot: dict[str, Any] = slot) -> Any:
            def hook(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
                slot[name] = out.detach()

            return hook

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.q_proj.register_forward_hook(keep("q")))  # type: ignore[union-attr]
        handles.append(attn.k_proj.register_forward_hook(keep("k")))  # type: ignore[union-attr]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding: x (…, T, H, d_head), cos/sin (T, d_head)."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


@torch.inference_mode()
def capture(
    model: nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    rows: Sequence[tuple[int, Phase]],
    targets: Sequence[int] | None = None,
    return_all_logits: bool = False,
) -> tuple[Activations, torch.Tensor | None]:
    """Run one forward over ``input_ids`` (T,) and capture the rows ``rows`` [(position, phase)].

    ``targets``: the token each row produced (default: the argmax of its logits, which is the emitted
    token under greedy decoding). Returns the activations and, when ``return_all_logits``, the (T, V)
    logits of every position (for output-only baselines).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)  # (1, T)
    T = ids.shape[1]
    positions = [p for p, _ in rows]
    if not rows or positions != sorted(set(positions)) or positions[0] < 0 or positions[-1] >= T:
        raise InvalidInput(f"rows must be distinct increasing positions in [0, {T}); got {positions}")
    cfg: Any = getattr(model, "config", None)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(cfg.num_key_value_heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    L = len(decoder_layers(model))
    pos_t = torch.tensor(positions)
    xs: list[torch.Tensor] = [torch.empty(0)] * L
    ys: list[torch.Tensor] = [torch.empty(0)] * L

    def grab(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        xs[i], ys[i] = x[0, pos_t].detach(), y[0, pos_t].detach()  # (n, D)

    store: dict[int, dict[str, Any]] = {}
    with mlp_hooks(model, on_output=grab), qk_hooks(model, store):
        out = model(input_ids=ids)
    logits_all = out.logits[0]  # (T, V)
    T_k = positions[-1] + 1
    qs, ks = [], []
    for i in range(L):
        slot = store[i]
        if slot.get("rope") is None:
            raise InvalidInput(f"layer {i}: the attention module received no position_embeddings")
        cos, sin = (t[0] for t in slot["rope"])  # (T, d_head)
        q = slot["q"][0, pos_t].view(len(positions), n_heads, d_head)  # (n, H, d_head)
        k = slot["k"][0, :T_k].view(T_k, n_kv, d_head)  # (T_k, H_kv, d_head)
        qs.append(apply_rope(q[None], cos[pos_t], sin[pos_t])[0])
        ks.append(apply_rope(k[None], cos[:T_k], sin[:T_k])[0].transpose(0, 1))  # (H_kv, T_k, d_head)
    row_logits = logits_all[pos_t].float()  # (n, V)
    tgt = torch.as_tensor(list(targets), dtype=torch.long) if targets is not None else row_logits.argmax(-1)
    acts = Activations(
        positions=tuple(positions),
        phases=tuple(ph for _, ph in rows),
        mlp_in=torch.stack(xs).float(),
        mlp_out=torch.stack(ys).float(),
        q=torch.stack(qs).float(),
        k=torch.stack(ks).float(),
        logits=row_logits,
        targets=tgt,
        attn_scale=float(getattr(decoder_layers(model)[0].self_attn, "scaling", d_head**-0.5)),
    )
    return acts, (logits_all.float() if return_all_logits else None)


def attention_probs(acts: Activations) -> torch.Tensor:
    """Attention probabilities of the sampled rows, recomputed from q·Kᵀ: (L, H, n, T_k), causal per row."""
    if acts.k.shape[2] == 0:
        raise InvalidInput("these activations carry no keys (their head statistics were computed at capture)")
    return probs_from_qk(acts.q, acts.k, acts.positions, acts.attn_scale)


def probs_from_qk(q: torch.Tensor, k: torch.Tensor, positions: Sequence[int], scale: float) -> torch.Tensor:
    """Causal attention probabilities from post-rotary q and keys → (L, H, n, T_k).

    q (L, n, H, d); k (L, H_kv, T_k, d), keys shared by every row (one sequence), or (L, n, H_kv, T_k, d),
    each row its own keys (rows of different requests, padded to T_k: keys past a row's position are
    masked like future ones). Grouped-query attention: query head h reads key head ``h // (H / H_kv)``,
    as in Llama. The live plugin calls this on keys read from vLLM's KV cache, the reference path on keys
    captured from HF.
    """
    L, n, H, d = q.shape
    kk = k.float()
    if kk.ndim == 4:
        kk = kk[:, None]  # (L, 1, H_kv, T_k, d): broadcast over the rows
    H_kv, T_k = kk.shape[2], kk.shape[3]
    # Query head h = g·G + j reads key head g: group the queries instead of repeating the keys G times.
    qg = q.float().reshape(L, n, H_kv, H // H_kv, d)
    scores = torch.matmul(qg, kk.transpose(-1, -2)) * scale  # (L, n, H_kv, G, T_k)
    scores = scores.reshape(L, n, H, T_k).transpose(1, 2)  # (L, H, n, T_k)
    pos = torch.tensor(list(positions), device=scores.device)
    future = torch.arange(T_k, device=scores.device)[None, :] > pos[:, None]  # (n, T_k)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1)


@torch.inference_mode()
def generate_and_capture(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    decode_every: int = 16,
) -> tuple[list[int], Activations, torch.Tensor]:
    """Greedy generation with capture on the fly: the rows of ``sampled_rows`` are read while the model
    runs (prefill, then one decode step per token, with a KV cache), as the live plugin reads them, so no
    second forward pass replays the request.

    Returns (generated tokens, a stop token included; the sampled rows' activations; (n, V) logits of
    every generation step, row j chose token j: the output-only baselines' input).
    """
    if not prompt_ids:
        raise InvalidInput("the prompt has no tokens")
    if max_new_tokens < 1 or decode_every < 1:
        raise InvalidInput(
            f"max_new_tokens and decode_every must be ≥ 1, got {max_new_tokens}, {decode_every}"
        )
    cfg: Any = getattr(model, "config", None)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(cfg.num_key_value_heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    layers = decoder_layers(model)
    L = len(layers)
    stop = set(eos_ids)
    P = len(prompt_ids)
    # Per forward: which rows of the chunk to keep (row index in the chunk → absolute position).
    keep: dict[int, int] = {}
    mlp: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # position → per-layer (x, y)
    qs: dict[int, list[torch.Tensor]] = {}  # position → per-layer q (H, d_head)
    ks: list[list[torch.Tensor]] = [[] for _ in range(L)]  # per layer: chunks of (H_kv, t, d_head)

    def grab(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        for r, pos in keep.items():
            mlp.setdefault(pos, []).append((x[0, r].detach().float(), y[0, r].detach().float()))

    # transformers ≥ 5.2x renamed the forward's ``past_key_values`` to ``cache`` (the old name warns).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    store: dict[int, dict[str, Any]] = {}
    tokens: list[int] = []
    step_logits: list[torch.Tensor] = []
    cache: Any = None
    with mlp_hooks(model, on_output=grab), qk_hooks(model, store):
        nxt = torch.tensor([list(prompt_ids)])
        for j in range(max_new_tokens):
            # Step j exists, so the previous step's row is not the final one: drop it unless sampled.
            if j >= 2 and (j - 1) % decode_every:
                del mlp[P - 2 + j], qs[P - 2 + j]
            # Keep the row that picks token j: the prompt's last row at j = 0, else the step's only row.
            keep.clear()
            keep[P - 1 if j == 0 else 0] = P - 1 + j
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            cache = out.cache if cache_kw == "cache" else out.past_key_values
            t = nxt.shape[1]
            for i in range(L):
                slot = store[i]
                cos, sin = (a[0] for a in slot["rope"])  # (t, d_head)
                k = slot["k"][0].view(t, n_kv, d_head)
                ks[i].append(apply_rope(k[None], cos, sin)[0].transpose(0, 1).float())  # (H_kv, t, d)
                r = P - 1 if j == 0 else 0
                q = slot["q"][0, r].view(1, n_heads, d_head)
                qs.setdefault(P - 1 + j, []).append(
                    apply_rope(q[None], cos[r : r + 1], sin[r : r + 1])[0, 0].float()
                )
            logits = out.logits[0, -1].float()
            step_logits.append(logits)
            tok = int(logits.argmax())
            tokens.append(tok)
            if tok in stop:
                break
            nxt = torch.tensor([[tok]])
    rows = sampled_rows(P, len(tokens), decode_every)
    positions = [p for p, _ in rows]
    T_k = positions[-1] + 1
    k_all = torch.stack([torch.cat(c, dim=1)[:, :T_k] for c in ks])  # (L, H_kv, T_k, d)
    acts = Activations(
        positions=tuple(positions),
        phases=tuple(ph for _, ph in rows),
        mlp_in=torch.stack([torch.stack([mlp[p][i][0] for p in positions]) for i in range(L)]),
        mlp_out=torch.stack([torch.stack([mlp[p][i][1] for p in positions]) for i in range(L)]),
        q=torch.stack([torch.stack([qs[p][i] for p in positions]) for i in range(L)]),
        k=k_all,
        logits=torch.stack([step_logits[p - (P - 1)] for p in positions]),
        targets=torch.tensor([tokens[p - (P - 1)] for p in positions]),
        attn_scale=float(getattr(layers[0].self_attn, "scaling", d_head**-0.5)),
    )
    return tokens, acts, torch.stack(step_logits)
