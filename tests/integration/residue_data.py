"""Test data for the engine, CLI and sidecar fingerprint tests: the tiny model's transcoder on disk, and
hand-built residue signatures (no model) from which fingerprints are fitted in milliseconds.

A synthetic signature either has the shapes a real tiny-model signature has (4 layers, top-k feature
slots, 4 heads, a PROMPT_LAST and a FINAL row) with random but plausible statistics, where ``err_shift``
moves one compact statistic (the error ratio of ``SHIFT_LAYER``) and ``hot`` plants chosen (layer,
feature) activations, so a family can differ from its controls in a compact or in a sparse input; or it
is a jittered copy of a real signature (``jittered_family``), so that a fingerprint fitted on such copies
gives the real signature a score well inside (0, 1) rather than a saturated 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from residue_monitor.detectors import forecast
from residue_monitor.detectors.capture import Phase
from residue_monitor.detectors.clt.io import save_clt
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, random_clt
from residue_monitor.detectors.forecast import PrefillForecast
from residue_monitor.detectors.signature import (
    ERROR_RATIO,
    SPAN_LEN_COL,
    SPAN_START,
    ResidueSignature,
    RowSignature,
)
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.residue import row_of
from residue_monitor.service.server.validate import FrameLimits, check_frame
from residue_monitor.shells.fingerprint import Fingerprint, FitConfig, fit_fingerprint

N_LAYERS, D_MODEL, N_FEATURES, K = 4, 64, 128, 8
N_HEADS = 4
SHIFT_LAYER = 2
PROMPT_POS = 24
"""Position of the synthetic PROMPT_LAST row (past the attention detector's local window)."""


def tiny_transcoder() -> CrossLayerTranscoder:
    """The random per-layer TopK transcoder every test here runs on the tiny model (deterministic)."""
    cfg = CLTConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_features=N_FEATURES,
        model_kind="transcoder_set",
        activation="topk",
        k=K,
    )
    return random_clt(cfg)


def save_tiny_transcoder(folder: Path) -> tuple[Path, str]:
    """``tiny_transcoder()`` written to ``folder``; returns (folder, its clt_id)."""
    clt = tiny_transcoder()
    return save_clt(clt, folder), clt.clt_id()


def _row(
    rng: np.random.Generator,
    position: int,
    phase: Phase,
    err_shift: float,
    hot: Sequence[tuple[int, int]],
    p_hot: float,
) -> RowSignature:
    ids = np.stack([rng.choice(N_FEATURES, K, replace=False) for _ in range(N_LAYERS)]).astype(np.int32)
    vals = np.sort(rng.exponential(1.0, (N_LAYERS, K)), axis=1)[:, ::-1].astype(np.float32)  # (L, k)
    for layer, feat in hot:
        if rng.random() < p_hot and feat not in ids[layer]:
            ids[layer, K - 1] = feat  # the weakest slot: values stay sorted, ids stay unique
    err = 0.3 + 0.05 * rng.standard_normal(N_LAYERS)
    err[SHIFT_LAYER] += err_shift
    stats = np.stack(
        [
            err,
            np.full(N_LAYERS, K),
            vals.sum(1),
            1 + 0.1 * rng.standard_normal(N_LAYERS),
            1 + 0.1 * rng.standard_normal(N_LAYERS),
            rng.uniform(0, 1, N_LAYERS),
        ],
        axis=1,
    ).astype(np.float32)  # (L, 6)
    heads = np.stack(
        [
            rng.uniform(0.5, 2.0, (N_LAYERS, N_HEADS)),
            rng.uniform(0, 0.3, (N_LAYERS, N_HEADS)),
            rng.uniform(0, 0.5, (N_LAYERS, N_HEADS)),
            rng.uniform(0, 0.5, (N_LAYERS, N_HEADS)),
            rng.integers(0, position + 1, (N_LAYERS, N_HEADS)),
            rng.integers(1, 5, (N_LAYERS, N_HEADS)),
            rng.uniform(0, 1, (N_LAYERS, N_HEADS)),
        ],
        axis=-1,
    ).astype(np.float32)  # (L, H, 7)
    logits = np.array(
        [rng.uniform(1, 3), rng.uniform(0.1, 0.6), rng.uniform(0, 0.3), rng.uniform(0, 0.1)], np.float32
    )
    return RowSignature(position, phase, ids, vals, stats, heads, logits)


def synthetic_signature(
    rng: np.random.Generator,
    *,
    clt_id: str,
    model: str = "tiny",
    err_shift: float = 0.0,
    hot: Sequence[tuple[int, int]] = (),
    p_hot: float = 0.0,
) -> ResidueSignature:
    """One hand-built request signature (PROMPT_LAST + FINAL rows, 4 output tokens)."""
    rows = (
        _row(rng, PROMPT_POS, "prompt_last", err_shift, hot, p_hot),
        _row(rng, PROMPT_POS + 4, "final", 0.0, (), 0.0),
    )
    return ResidueSignature(
        rows=rows, model=model, clt_id=clt_id, prompt_tokens=PROMPT_POS + 1, output_tokens=4
    )


def family(
    seed: int,
    n: int,
    *,
    clt_id: str,
    model: str = "tiny",
    err_shift: float = 0.0,
    hot: Sequence[tuple[int, int]] = (),
    p_hot: float = 0.0,
) -> list[ResidueSignature]:
    """``n`` synthetic signatures from one distribution (see ``synthetic_signature``)."""
    rng = np.random.default_rng(seed)
    return [
        synthetic_signature(rng, clt_id=clt_id, model=model, err_shift=err_shift, hot=hot, p_hot=p_hot)
        for _ in range(n)
    ]


def fitted_fingerprints(
    clt_id: str,
    model: str,
    hot: Sequence[tuple[int, int]] = ((1, 5), (3, 17)),
    names: Sequence[str] = ("synthetic_a", "synthetic_b"),
) -> list[Fingerprint]:
    """Fingerprints fitted on synthetic families (error-ratio shift + planted ``hot`` features) against
    synthetic controls, for the given CLT id and model: stand-ins for ``residue shells run`` output."""
    controls = family(100, 60, clt_id=clt_id, model=model, hot=hot, p_hot=0.1)
    out = []
    for i, name in enumerate(names):
        pos = family(200 + i, 30, clt_id=clt_id, model=model, err_shift=0.3 * (i + 1), hot=hot, p_hot=0.9)
        out.append(fit_fingerprint(name, name, pos, controls, N_FEATURES, FitConfig(n_sparse=4)))
    return out


def _jitter_row(
    row: RowSignature,
    rng: np.random.Generator,
    scale: float,
    err_shift: float,
    hot: Sequence[tuple[int, int]],
    p_hot: float,
) -> RowSignature:
    def noisy(a: np.ndarray) -> np.ndarray:
        return (a * (1 + scale * rng.standard_normal(a.shape))).astype(np.float32)

    stats = noisy(row.layer_stats)
    if row.phase == "prompt_last":
        stats[SHIFT_LAYER, ERROR_RATIO] += err_shift
    heads = noisy(row.heads)
    heads[..., [SPAN_START, SPAN_LEN_COL]] = row.heads[..., [SPAN_START, SPAN_LEN_COL]]  # token counts
    ids = row.feature_ids.copy()
    vals = np.clip(noisy(row.feature_values), 0, None) * (row.feature_values > 0)
    for layer, feat in hot:
        slot = ids[layer] == feat
        if slot.any() and rng.random() >= p_hot:  # the planted feature stays active with prob p_hot
            vals[layer, slot] = 0.0
            ids[layer, slot] = 0
    return replace(
        row, feature_ids=ids, feature_values=vals, layer_stats=stats, heads=heads, logits=noisy(row.logits)
    )


def jittered_family(
    base: ResidueSignature,
    seed: int,
    n: int,
    *,
    err_shift: float = 0.0,
    hot: Sequence[tuple[int, int]] = (),
    p_hot: float = 1.0,
    scale: float = 0.1,
) -> list[ResidueSignature]:
    """``n`` copies of ``base`` with every statistic scaled by 1 + ``scale``·N(0, 1), layer
    ``SHIFT_LAYER``'s prompt error ratio moved by ``err_shift``, and each of ``hot`` (features active
    in ``base``) kept active with probability ``p_hot``."""
    rng = np.random.default_rng(seed)
    return [
        replace(base, rows=tuple(_jitter_row(r, rng, scale, err_shift, hot, p_hot) for r in base.rows))
        for _ in range(n)
    ]


def random_forecast(
    clt: CrossLayerTranscoder, threshold: float, seed: int = 0, **fields: object
) -> PrefillForecast:
    """A random-weight prefill forecast for ``clt`` (``detectors.forecast.random_forecast``: plumbing tests,
    what it predicts does not matter); ``fields`` override any artifact field."""
    fc = forecast.random_forecast("tiny", clt.clt_id(), clt.n_layers, threshold=threshold, seed=seed)
    return replace(fc, **fields)  # type: ignore[arg-type]


def prompt_row(msgs: Sequence[pb.IngestMessage], clt: CrossLayerTranscoder) -> RowSignature:
    """The PROMPT_LAST row of a request's messages as the sidecar rebuilds it (validated, then ``row_of``):
    what its prefill forecast reads, computed without a sidecar."""
    (f,) = [m.frame for m in msgs if m.HasField("frame") and m.frame.phase == pb.PHASE_PROMPT_LAST]
    limits = FrameLimits(clt.n_layers, clt.cfg.n_features, 256, 4096, clt.clt_id())
    return row_of(check_frame(f, limits), clt.n_layers)
