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

import numpy as np

from residue_monitor.detectors.base import DetectorResult, frozen
from residue_monitor.detectors.signature import ERROR_RATIO, ResidueSignature, RowSignature

NAME = "errors"


def accumulation(ratios: np.ndarray) -> dict[str, float]:
    """Growth statistics of one row's per-layer error ratios (L,); NaN layers are ignored."""
    e = np.asarray(ratios, dtype=np.float64)
    ok = np.isfinite(e)
    L = e.shape[0]
    if ok.sum() < 2:
        return {
            "growth": 0.0,
            "slope": 0.0,
            "break_layer": -1.0,
            "max_jump": 0.0,
            "mean": float(np.nanmean(e)) if ok.any() else 0.0,
            "max": float(np.nanmax(e)) if ok.any() else 0.0,
        }
    third = max(1, L // 3)
    first, last = e[:third][ok[:third]], e[-third:][ok[-third:]]
    # Growth needs both ends: a third with no finite layer says nothing about accumulation.
    growth = float(last.mean() - first.mean()) if last.size and first.size else 0.0
    depth = np.linspace(0.0, 1.0, L)[ok]
    d = depth - depth.mean()
    slope = float((d * (e[ok] - e[ok].mean())).sum() / (d * d).sum())  # least squares, in closed form
    # One-step increases between consecutive finite layers: a NaN layer is skipped, not allowed to hide
    # a jump across it; the jump is credited to the later layer.
    finite = np.flatnonzero(ok)
    diffs = np.diff(e[finite])
    j = int(np.argmax(diffs))
    brk, jump = float(finite[j + 1]), float(diffs[j])
    return {
        "growth": float(growth),
        "slope": slope,
        "break_layer": brk,
        "max_jump": jump,
        "mean": float(e[ok].mean()),
        "max": float(e[ok].max()),
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
