"""MLP input/output capture on an HF Llama-style model, the data transcoders train and are judged on.

``feature_input_hook = mlp.hook_in`` is the MLP's input (after ``post_attention_layernorm``) and
``feature_output_hook = mlp.hook_out`` its output, read with forward (pre-)hooks on ``layers[i].mlp``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer blocks of an HF causal LM (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected a Llama-style model with .model.layers")
    return layers  # type: ignore[no-any-return]


def base_model(model: nn.Module) -> nn.Module:
    """The model without its LM head (``model.model``): capture does not need the logits."""
    return getattr(model, "model", model)  # type: ignore[no-any-return]


@contextmanager
def mlp_hooks(
    model: nn.Module,
    on_input: Callable[[int, torch.Tensor], None] | None = None,
    on_output: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> Iterator[None]:
    """Register hooks on every layer's MLP for the duration of the block.

    ``on_input(layer, x)`` sees the MLP input (B, T, D); ``on_output(layer, x, y)`` sees input and output and
    may return a replacement output (used for splicing transcoders in).
    """
    handles: list[Any] = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp: nn.Module = layer.mlp  # type: ignore[assignment]
        if on_input is not None:

            def pre(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
                on_input(i, args[0])

            handles.append(mlp.register_forward_pre_hook(pre))
        if on_output is not None:

            def post(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, i: int = i) -> Any:
                return on_output(i, args[0], out)

            handles.append(mlp.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def capture_mlp(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``input_ids`` (B, T) and return (mlp_in, mlp_out), each (L, B, T, D), in the model's dtype."""
    L = len(decoder_layers(model))
    xs: list[torch.Tensor | None] = [None] * L
    ys: list[torch.Tensor | None] = [None] * L

    def grab(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        xs[i], ys[i] = x.detach(), y.detach()

    with mlp_hooks(model, on_output=grab):
        base_model(model)(input_ids=input_ids)
    assert all(x is not None for x in xs), "a layer's MLP did not run"
    return torch.stack(xs), torch.stack(ys)  # type: ignore[arg-type]


def token_windows(
    texts: Iterable[str], tokenize: Callable[[str], list[int]], window: int, bos: int | None = None
) -> Iterator[list[int]]:
    """Cut each text's tokens into non-overlapping windows of ``window`` tokens (a leftover shorter than
    half a window is dropped). With ``bos`` each window starts with it, as a real prompt would."""
    body = window - (1 if bos is not None else 0)
    for text in texts:
        ids = tokenize(text)
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if len(chunk) < body // 2:
                break
            if len(chunk) < body:
                continue
            yield ([bos] if bos is not None else []) + chunk


def batched(it: Iterable[list[int]], n: int) -> Iterator[torch.Tensor]:
    """Group windows into (n, T) long tensors."""
    buf: list[list[int]] = []
    for w in it:
        buf.append(w)
        if len(buf) == n:
            yield torch.tensor(buf, dtype=torch.long)
            buf = []
    if buf:
        yield torch.tensor(buf, dtype=torch.long)
