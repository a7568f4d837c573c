"""Null-output residue at the final token: features that fire but never reach the output.

The papers trace a null or stopped output back to features active at the last position whose effect
never propagates to any output logit ("activation without propagation"). Live, the signature carries per
layer the *unreached* fraction: the share of the kept feature mass whose decoder direction has
|cos| · √D < 1 with the unembedding of the token the row emitted (EOS for a request that stopped; see
``signature.REACH_SIGMAS``). The score is the mass-weighted mean of that fraction over layers at the row
that ended the request (FINAL, or PROMPT_LAST when at most one token was generated). The offline,
exact version is the attribution graph with EOS / contrast targets (``detectors/attribution``).
"""

from __future__ import annotations

import numpy as np

from residue_monitor.detectors.base import DetectorResult, frozen
from residue_monitor.detectors.signature import MASS, UNREACHED, ResidueSignature, RowSignature

NAME = "nullout"


def unreached_share(row: RowSignature) -> float:
    """Mass-weighted mean unreached fraction over layers; 0 when no feature is active."""
    mass = np.clip(row.layer_stats[:, MASS].astype(np.float64), 0.0, None)
    frac = np.nan_to_num(row.layer_stats[:, UNREACHED].astype(np.float64))
    total = mass.sum()
    return float((mass * frac).sum() / total) if total > 0 else 0.0


def detect_nullout(sig: ResidueSignature) -> DetectorResult | None:
    """Unreached feature mass at the row that ended the request."""
    if not sig.rows:
        return None
    end = sig.row("final") or sig.row("prompt_last") or sig.rows[-1]
    score = unreached_share(end)
    ev = {
        "empty_output": float(sig.empty_output),
        "stopped": float(sig.stopped),
        "eos_prob": float(end.logits[3]),
        "end_position": float(end.position),
    }
    first = sig.row("prompt_last")
    if first is not None and first is not end:
        ev["prompt_last_unreached"] = unreached_share(first)
    return DetectorResult(NAME, score, frozen(ev))
