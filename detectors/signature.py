"""Activations → ResidueSignature: the compact per-request residue every detector and fingerprint reads.

Per sampled row (DESIGN.md §4): per layer the top-k CLT features (ids, values), L0, feature mass,
reconstruction-error ratio, MLP norms and the *unreached* fraction (feature mass whose decoder direction
carries little to the row's emitted token: the papers' "activation without propagation"); per head the
attention statistics; the next-token logit statistics. The wire form (``residue.v1.ResidueFrame``) carries
exactly these numbers; ``service/frames.py`` converts both ways, so the sidecar rebuilds the same
signature from frames and runs the same detectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from residue_monitor.detectors.capture import Activations, Phase, attention_probs
from residue_monitor.detectors.clt.encode import encode_rows
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]

LOCAL_WINDOW = 8
"""Keys before the query that count as 'local' attention."""
SPAN_LEN = 4
"""Length of the attention span whose mass ``span_mass`` reports."""
REACH_SIGMAS = 1.0
"""A feature 'reaches' the emitted token when |cos(decoder, unembedding)| · √D ≥ this (a random
direction in D dimensions has |cos| · √D ≈ 0.8 on average: one σ is the line between noise and signal)."""

# Columns of RowSignature.layer_stats.
ERROR_RATIO, L0, MASS, IN_NORM, OUT_NORM, UNREACHED = range(6)
LAYER_STAT_NAMES = ("error_ratio", "l0", "mass", "in_norm", "out_norm", "unreached")
# Columns of RowSignature.heads.
ENTROPY, SELF, LOCAL, SINK, SPAN_START, SPAN_LEN_COL, SPAN_MASS = range(7)
HEAD_STAT_NAMES = ("entropy", "self_frac", "local_frac", "sink_frac", "span_start", "span_len", "span_mass")
LOGIT_STAT_NAMES = ("entropy", "top1_prob", "margin", "eos_prob")


@dataclass(frozen=True, eq=False)
class RowSignature:
    """The residue of one sampled position."""

    position: int
    phase: Phase
    feature_ids: I32
    """(L, k) top-k feature ids per layer, strongest first; slots past the active count hold 0."""
    feature_values: F32
    """(L, k) their activations; 0 marks an empty slot."""
    layer_stats: F32
    """(L, 6) per layer: error_ratio, l0, mass, in_norm, out_norm, unreached (column constants above)."""
    heads: F32
    """(L, H, 7) per head: entropy, self, local, sink, span start, span len, span mass; (L, 0, 7) if none."""
    logits: F32
    """(4,) entropy, top1_prob, margin, eos_prob of the next-token distribution (NaN when not captured)."""

    @property
    def n_layers(self) -> int:
        return int(self.layer_stats.shape[0])

    def column(self, name: str) -> F32:
        """One per-layer statistic by name: (L,)."""
        return self.layer_stats[:, LAYER_STAT_NAMES.index(name)]


@dataclass(frozen=True, eq=False)
class ResidueSignature:
    """A request's residue: its sampled rows plus what is known about the request."""

    rows: tuple[RowSignature, ...]
    """In position order."""
    model: str = ""
    clt_id: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    empty_output: bool = False
    """Nothing (or only EOS) was generated: a null output."""
    stopped: bool = False
    """Generation ended on a stop token (rather than a length limit)."""
    meta: dict[str, Any] = field(default_factory=dict[str, Any])
    """Free-form context (e.g. sampling settings); never text."""

    def row(self, phase: Phase) -> RowSignature | None:
        """The first row of ``phase`` (PROMPT_LAST and FINAL occur at most once)."""
        return next((r for r in self.rows if r.phase == phase), None)

    @property
    def last_row(self) -> RowSignature:
        """The row closest to the end of the request (FINAL if sampled, else the last one)."""
        return self.row("final") or self.rows[-1]

    @property
    def n_layers(self) -> int:
        return self.rows[0].n_layers if self.rows else 0


def logit_stats(logits: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """(n, V) logits → (n, 4): entropy (nats), top-1 prob, margin top1 − top2, EOS prob."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top = p.topk(2, dim=-1).values
    ent = -(p * logp).nan_to_num().sum(-1)
    eos = p[:, eos_id] if eos_id is not None else torch.zeros(p.shape[0], device=p.device)
    return torch.stack([ent.clamp_min(0.0), top[:, 0], top[:, 0] - top[:, 1], eos], dim=-1)


def head_stats(
    probs: torch.Tensor, positions: torch.Tensor, window: int = LOCAL_WINDOW, span: int = SPAN_LEN
) -> torch.Tensor:
    """Attention summaries: probs (L, H, n, T_k) causal → (L, H, n, 7) (columns as RowSignature.heads).

    ``span``: the short window of consecutive keys holding the most mass (attention *trapping* reads it).
    """
    L, H, n, T_k = probs.shape
    p = probs.float()
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (L, H, n)
    idx = positions.long().to(p.device)
    self_frac = p.gather(-1, idx.view(1, 1, n, 1).expand(L, H, n, 1))[..., 0]
    keys = torch.arange(T_k, device=p.device)
    local = ((keys[None, :] < idx[:, None]) & (keys[None, :] >= idx[:, None] - window)).float()  # (n, T_k)
    local_frac = (p * local).sum(-1)
    sink = p[..., 0]
    s = min(span, T_k)
    # A span may not reach past the row's own position: only keys 0..pos count, no span starts after
    # pos - s + 1 (the argmax of a tie must land on a real span), and a row earlier than the span length
    # gets the shorter span 0..pos (its reported length says so).
    causal = (keys[None, :] <= idx[:, None]).float()  # (n, T_k)
    sums = (p * causal).unfold(-1, s, 1).sum(-1)  # (L, H, n, T_k - s + 1)
    starts = torch.arange(sums.shape[-1], device=p.device)
    valid = starts[None, :] <= (idx[:, None] - s + 1).clamp_min(0)  # (n, ·)
    sums = sums.masked_fill(~valid, -1.0)
    mass, start = sums.max(-1)
    span_len = (idx + 1).clamp(max=s).float().view(1, 1, n).expand(L, H, n)  # (L, H, n)
    return torch.stack(
        [ent.clamp_min(0.0), self_frac, local_frac, sink, start.float(), span_len, mass.clamp(0.0, 1.0)],
        dim=-1,
    )


class SignatureBuilder:
    """Builds signatures for one (model, CLT) pair; holds what is precomputed once.

    ``readout`` (V, D): the unembedding as seen from the residual stream, ``W_U ⊙ γ_final`` (the final
    RMSNorm's scale folded in; its per-token denominator does not change a cosine).
    """

    def __init__(
        self,
        clt: CrossLayerTranscoder,
        readout: torch.Tensor,
        *,
        k: int = 32,
        eos_id: int | None = None,
        model: str = "",
        with_heads: bool = True,
    ) -> None:
        if readout.ndim != 2 or readout.shape[1] != clt.cfg.d_model:
            raise ArtifactMismatch(
                f"readout is {tuple(readout.shape)}; the transcoder's d_model is {clt.cfg.d_model}"
            )
        self.clt = clt
        self.clt_id = clt.clt_id()
        self.k = k
        self.eos_id = eos_id
        self.model = model
        self.with_heads = with_heads
        self.readout = readout.detach().float()
        # Each feature's total write into the residual stream: its decoder summed over target layers.
        with torch.no_grad():
            total = [
                sum((clt.decoder(s, t) for t in range(s, clt.n_layers if clt.is_cross_layer else s + 1)),
                    torch.zeros(()))
                for s in range(clt.n_layers)
            ]  # fmt: skip
            self._dec_unit = torch.stack(
                [d.float() / d.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) for d in total]
            )  # (L, F, D): one gather serves every layer (``unreached``)

    @classmethod
    def for_model(cls, hf_model: Any, clt: CrossLayerTranscoder, **kw: Any) -> SignatureBuilder:
        """A builder reading the readout (lm_head ⊙ final norm weight) and EOS id off an HF causal LM."""
        w = hf_model.get_output_embeddings().weight.detach().float()  # (V, D)
        norm = getattr(getattr(hf_model, "model", hf_model), "norm", None)
        gamma = getattr(norm, "weight", None)
        readout = w * gamma.detach().float()[None, :] if gamma is not None else w
        kw.setdefault("eos_id", getattr(hf_model.config, "eos_token_id", None))
        if isinstance(kw["eos_id"], list):
            kw["eos_id"] = kw["eos_id"][0]
        return cls(clt, readout, **kw)

    @torch.no_grad()
    def unreached(self, ids: torch.Tensor, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Fraction of kept feature mass that does not reach each row's target logit: (L, n).

        ids/values (L, n, k); targets (n,). A feature reaches when |cos(decoder, readout[target])|·√D ≥
        REACH_SIGMAS; rows with no active feature get 0.
        """
        u = self.readout[targets]  # (n, D)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        L, D = ids.shape[0], u.shape[-1]
        layer = torch.arange(L, device=ids.device)[:, None, None]
        d = self._dec_unit[layer, ids]  # (L, n, k, D): every layer in one gather
        cos = torch.matmul(d, u[None, :, :, None])[..., 0].abs() * math.sqrt(D)  # (L, n, k)
        v = values.float().clamp_min(0.0)
        total = v.sum(-1)
        miss = (v * (cos < REACH_SIGMAS)).sum(-1)
        return torch.where(total > 0, miss / total.clamp_min(1e-12), torch.zeros_like(total))

    @torch.no_grad()
    def build_rows(
        self,
        positions: Sequence[int],
        phases: Sequence[Phase],
        mlp_in: torch.Tensor,
        mlp_out: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        heads: torch.Tensor,
    ) -> tuple[RowSignature, ...]:
        """Rows of any requests at once (the live plugin batches what its queue holds: one pass over the
        transcoder's weights for all of them). mlp_in / mlp_out (L, n, D), logits (n, V), targets (n,),
        heads (L, H, n, 7) (H may be 0)."""
        L, n = mlp_in.shape[:2]
        if self.clt.n_layers != L:
            raise ArtifactMismatch(f"activations have {L} layers; the transcoder has {self.clt.n_layers}")
        if heads.ndim != 4 or heads.shape[0] != L or heads.shape[2:] != (n, 7):
            raise InvalidInput(f"heads must be (L, H, n, 7) for L={L}, n={n}, got {tuple(heads.shape)}")
        if len(positions) != n or len(phases) != n or logits.shape[0] != n or targets.shape != (n,):
            raise InvalidInput(f"need {n} positions, phases, logits rows and targets")
        heads = heads.float()
        codes = encode_rows(self.clt, mlp_in, mlp_out, k=self.k)
        vals = codes.values.float() * (codes.values > 0)
        unreached = self.unreached(codes.ids, vals, targets)  # (L, n)
        stats = torch.stack(
            [codes.error_ratio, codes.l0.float(), codes.mass, codes.in_norm, codes.out_norm, unreached],
            dim=-1,
        )  # (L, n, 6)
        lstats = logit_stats(logits, self.eos_id)  # (n, 4)
        ids_np = codes.ids.to(torch.int32).cpu().numpy()
        vals_np = vals.cpu().numpy().astype(np.float32)
        ids_np = np.where(vals_np > 0, ids_np, 0).astype(np.int32)
        stats_np = stats.cpu().numpy().astype(np.float32)
        heads_np = heads.cpu().numpy().astype(np.float32)
        lstats_np = lstats.cpu().numpy().astype(np.float32)
        return tuple(
            RowSignature(
                position=int(pos),
                phase=ph,
                feature_ids=_ro(ids_np[:, r]),
                feature_values=_ro(vals_np[:, r]),
                layer_stats=_ro(stats_np[:, r]),
                heads=_ro(heads_np[:, :, r]),
                logits=_ro(lstats_np[r]),
            )
            for r, (pos, ph) in enumerate(zip(positions, phases, strict=True))
        )

    @torch.no_grad()
    def build(
        self,
        acts: Activations,
        *,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        empty_output: bool = False,
        stopped: bool = False,
        meta: dict[str, Any] | None = None,
        heads: torch.Tensor | None = None,
    ) -> ResidueSignature:
        """The signature of one request's captured rows.

        ``heads`` (L, H, n, 7): head statistics already computed where the keys live (the live plugin
        computes them next to vLLM's KV cache with ``head_stats(probs_from_qk(...))``); otherwise they are
        computed here from ``acts.q`` / ``acts.k``.
        """
        if acts.n_layers != self.clt.n_layers:
            raise ArtifactMismatch(
                f"activations have {acts.n_layers} layers; the transcoder has {self.clt.n_layers}"
            )
        if heads is None:
            if self.with_heads:
                heads = head_stats(attention_probs(acts), torch.tensor(acts.positions))  # (L, H, n, 7)
            else:
                heads = torch.zeros(acts.n_layers, 0, len(acts.positions), 7)
        rows = self.build_rows(acts.positions, acts.phases, acts.mlp_in, acts.mlp_out, acts.logits,
                               acts.targets, heads)  # fmt: skip
        return ResidueSignature(
            rows=rows,
            model=self.model,
            clt_id=self.clt_id,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            empty_output=empty_output,
            stopped=stopped,
            meta=dict(meta or {}),
        )


def _ro(a: np.ndarray[Any, Any]) -> Any:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def check_row(row: RowSignature) -> None:
    """Internal consistency of a row built elsewhere (e.g. decoded from frames): raises InvalidInput."""
    L = row.layer_stats.shape[0]
    if row.layer_stats.shape != (L, len(LAYER_STAT_NAMES)):
        raise InvalidInput(f"layer_stats must be (L, {len(LAYER_STAT_NAMES)}), got {row.layer_stats.shape}")
    if row.feature_ids.shape != row.feature_values.shape or row.feature_ids.shape[0] != L:
        raise InvalidInput(
            f"feature ids {row.feature_ids.shape} / values {row.feature_values.shape} vs L={L}"
        )
    if row.heads.ndim != 3 or row.heads.shape[0] != L or row.heads.shape[2] != len(HEAD_STAT_NAMES):
        raise InvalidInput(f"heads must be (L, H, {len(HEAD_STAT_NAMES)}), got {row.heads.shape}")
    if row.logits.shape != (len(LOGIT_STAT_NAMES),):
        raise InvalidInput(f"logits must be ({len(LOGIT_STAT_NAMES)},), got {row.logits.shape}")


# ---------------------------------------------------------------------------------------------- files
_ROW_FIELDS = ("feature_ids", "feature_values", "layer_stats", "heads", "logits")


def save_signatures(path: Any, sigs: Mapping[str, ResidueSignature]) -> None:
    """Write signatures keyed by id to one ``.npz`` (arrays) with a JSON header (ids, metadata)."""
    import json

    arrays: dict[str, np.ndarray[Any, Any]] = {}
    header: list[dict[str, Any]] = []
    for i, (key, sig) in enumerate(sigs.items()):
        header.append({
            "id": key, "model": sig.model, "clt_id": sig.clt_id, "prompt_tokens": sig.prompt_tokens,
            "output_tokens": sig.output_tokens, "empty_output": sig.empty_output, "stopped": sig.stopped,
            "meta": sig.meta, "rows": [[r.position, r.phase] for r in sig.rows],
        })  # fmt: skip
        for j, row in enumerate(sig.rows):
            for f in _ROW_FIELDS:
                arrays[f"s{i}r{j}{f}"] = getattr(row, f)
    arrays["header"] = np.array(json.dumps(header))
    np.savez_compressed(path, **arrays)  # pyright: ignore[reportArgumentType]


def load_signatures(path: Any) -> dict[str, ResidueSignature]:
    """Read what ``save_signatures`` wrote; a malformed file raises InvalidInput naming it."""
    import json

    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            out: dict[str, ResidueSignature] = {}
            for i, h in enumerate(header):
                rows = []
                for j, (pos, phase) in enumerate(h["rows"]):
                    a = {f: _ro(np.array(z[f"s{i}r{j}{f}"])) for f in _ROW_FIELDS}
                    rows.append(RowSignature(position=int(pos), phase=phase, **a))
                out[str(h["id"])] = ResidueSignature(
                    rows=tuple(rows), model=h["model"], clt_id=h["clt_id"], prompt_tokens=h["prompt_tokens"],
                    output_tokens=h["output_tokens"], empty_output=h["empty_output"], stopped=h["stopped"],
                    meta=h["meta"],
                )  # fmt: skip
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InvalidInput(f"{path}: not a signature file ({type(e).__name__}: {e})") from e
    return out
