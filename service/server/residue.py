"""An assembled request → the ``ResidueSignature`` the detectors and fingerprints read.

The plugin ships a signature as frames (``service/frames.py``); this rebuilds it from the validated
frames, so the sidecar runs exactly the detectors and fingerprints the offline path runs. Frames carry
only active features (ragged per layer) and may leave layers or heads out; the signature has dense
(L, k) feature arrays padded with zeros, NaN statistics for a missing layer, and no head statistics when
the frame's heads do not form a complete (layer, head) grid.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from residue_monitor.detectors.signature import (
    HEAD_STAT_NAMES,
    LAYER_STAT_NAMES,
    ResidueSignature,
    RowSignature,
)
from residue_monitor.service.server.events import AssembledRequest, Frame

_FINISH_STOP = 1  # residue.v1.FINISH_REASON_STOP


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def row_of(frame: Frame, n_layers: int) -> RowSignature:
    """One frame as a signature row over ``n_layers`` layers."""
    counts = frame.feature_offsets[1:] - frame.feature_offsets[:-1]  # (L_f,)
    k = max(int(counts.max()) if counts.size else 0, 1)
    n_ids = frame.feature_ids.shape[0]
    if frame.layers.shape[0] == n_layers and n_ids == n_layers * k:
        # Every layer, each with k features (what the plugin sends; layer ids are validated strictly
        # increasing and below n_layers, so they are 0..n_layers-1): the arrays are already (L, k).
        ids = frame.feature_ids.reshape(n_layers, k)
        vals = frame.feature_values.reshape(n_layers, k)
        stats = frame.layer_stats.astype(np.float32)
    else:
        ids = np.zeros((n_layers, k), dtype=np.int32)
        vals = np.zeros((n_layers, k), dtype=np.float32)
        stats = np.full((n_layers, len(LAYER_STAT_NAMES)), np.nan, dtype=np.float32)
        # Scatter the ragged per-layer features into the padded (L, k) arrays in one indexing step.
        rows = np.repeat(frame.layers, counts)  # (N,) layer of each feature
        cols = np.arange(n_ids) - np.repeat(frame.feature_offsets[:-1], counts)  # slot
        ids[rows, cols] = frame.feature_ids
        vals[rows, cols] = frame.feature_values
        stats[frame.layers] = frame.layer_stats
    heads = np.zeros((n_layers, 0, len(HEAD_STAT_NAMES)), dtype=np.float32)
    h = frame.head_stats
    if len(h):
        n_heads = int(h[:, 1].max()) + 1
        grid = np.full((n_layers, n_heads, len(HEAD_STAT_NAMES)), np.nan, dtype=np.float32)
        grid[h[:, 0].astype(int), h[:, 1].astype(int)] = h[:, 2:]
        if not np.isnan(grid).any():
            heads = grid
    logits = np.array(frame.logits if frame.logits is not None else (np.nan,) * 4, dtype=np.float32)
    return RowSignature(
        position=frame.position,
        phase=frame.phase,
        feature_ids=_ro(ids),
        feature_values=_ro(vals),
        layer_stats=_ro(stats),
        heads=_ro(heads),
        logits=_ro(logits),
    )


def to_signature(
    request: AssembledRequest, n_layers: int | None = None, phases: Collection[str] | None = None
) -> ResidueSignature:
    """The request's signature; ``n_layers``: the transcoder's layer count (default: from the frames);
    ``phases``: only rows of these phases (the scorers read PROMPT_LAST and FINAL only)."""
    frames = sorted(request.frames, key=lambda f: (f.position, f.sequence))
    if phases is not None:
        frames = [f for f in frames if f.phase in phases]
    if n_layers is None:
        n_layers = max((int(f.layers.max()) + 1 for f in frames if f.layers.size), default=0)
    rows: list[RowSignature] = []
    seen: set[tuple[int, str]] = set()
    for f in frames:
        if (f.position, f.phase) in seen:
            continue
        seen.add((f.position, f.phase))
        rows.append(row_of(f, n_layers))
    end = request.end
    return ResidueSignature(
        rows=tuple(rows),
        model=request.start.model,
        clt_id=request.start.clt_id,
        prompt_tokens=request.start.prompt_tokens,
        output_tokens=end.output_tokens if end is not None else 0,
        empty_output=end.empty_output if end is not None else False,
        stopped=end is not None and end.finish_reason == _FINISH_STOP,
    )
