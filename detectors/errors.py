"""Error-node accumulation: how the CLT's reconstruction error grows across layers, and where it breaks.

The papers read the replacement model's error nodes layer by layer; a failing computation leaves error
that grows with depth. Per row we read the error ratio ‖mlp_out − CLT recon‖ / ‖mlp_out‖ of every layer:

* ``growth`` (the score): mean ratio over the last third of the layers minus the first third;
* ``slope``: least-squares slope of the ratio against depth (0 → 1 over the stack);
* ``break_layer`` / ``max_jump``: the layer with the largest one-step increase, and that increase.

Measured on SmolLM2 (FACTS-signals.md) the sign is task-dependent, so the detector reports the growth and
leaves the direction to the fingerprints, which learn it from data.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from residue_monitor.detectors.base import DetectorResult, frozen
from residue_monitor.detectors.signature import ERROR_RATIO, ResidueSignature, RowSignature

NAME = "errors"


def accumulation(ratios: np.ndarray) -> dict[str, float]:
    """Growth statistics of one row's per-layer error ratios (L,); NaN layers are ignored.

    Plain Python over the L values (tens): for arrays this small it is several times faster than numpy's
    per-call overhead, and the sidecar runs it twice for every request it stores."""
    e = np.asarray(ratios, dtype=np.float64)
    vals: list[float] = e.tolist()
    finite = [i for i, x in enumerate(vals) if math.isfinite(x)]
    L = len(vals)
    if len(finite) < 2:
        ok = np.isfinite(e)
        return {
            "growth": 0.0,
            "slope": 0.0,
            "break_layer": -1.0,
            "max_jump": 0.0,
            "mean": float(np.nanmean(e)) if ok.any() else 0.0,
            "max": float(np.nanmax(e)) if ok.any() else 0.0,
        }
    third = max(1, L // 3)
    first = [x for x in vals[:third] if math.isfinite(x)]
    last = [x for x in vals[-third:] if math.isfinite(x)]
    # Growth needs both ends: a third with no finite layer says nothing about accumulation.
    growth = sum(last) / len(last) - sum(first) / len(first) if last and first else 0.0
    y = [vals[i] for i in finite]
    depth = [i / (L - 1) for i in finite]  # 0 → 1 over the stack
    d_mean, y_mean = sum(depth) / len(depth), sum(y) / len(y)
    d = [x - d_mean for x in depth]
    slope = sum(a * (b - y_mean) for a, b in zip(d, y, strict=True)) / sum(a * a for a in d)  # least squares
    # One-step increases between consecutive finite layers: a NaN layer is skipped, not allowed to hide
    # a jump across it; the jump is credited to the later layer.
    diffs = [b - a for a, b in itertools.pairwise(y)]
    j = max(range(len(diffs)), key=diffs.__getitem__)  # the first largest, as argmax
    return {
        "growth": float(growth),
        "slope": float(slope),
        "break_layer": float(finite[j + 1]),
        "max_jump": float(diffs[j]),
        "mean": float(y_mean),
        "max": float(max(y)),
    }


def _row(sig: ResidueSignature) -> RowSignature | None:
    return sig.row("prompt_last") or (sig.rows[0] if sig.rows else None)


def detect_errors(sig: ResidueSignature) -> DetectorResult | None:
    """Error accumulation at the last prompt token (the prefill residue), plus the final row's growth."""
    row = _row(sig)
    if row is None:
        return None
    ev = accumulation(row.layer_stats[:, ERROR_RATIO])
    final = sig.row("final")
    if final is not None:
        ev["final_growth"] = accumulation(final.layer_stats[:, ERROR_RATIO])["growth"]
    return DetectorResult(NAME, ev["growth"], frozen(ev))
