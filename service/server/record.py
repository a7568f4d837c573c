"""An assembled request → its outcome: per-layer summaries, scores, fingerprint matches, flags.

Pure: the same ``AssembledRequest`` and scorers give the same ``Outcome`` (frames arrive sorted by
sequence, so sums run in one order however the frames arrived). ``convert.py`` turns an outcome into the
stored ``ResidueRecord`` and its ``FlagEvent``s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from residue_monitor.detectors.signature import ERROR_RATIO, L0, MASS
from residue_monitor.service.server.events import AssembledRequest, Frame
from residue_monitor.service.server.forecasting import ForecastResult
from residue_monitor.service.server.residue import to_signature
from residue_monitor.service.server.scoring import DetectorResult, Registry, Scorer, SignatureView

logger = logging.getLogger(__name__)
SCORED_PHASES = ("prompt_last", "final")
"""The rows detectors and fingerprints read (``detectors/``, ``shells/fingerprint.py``); DECODE rows only
feed the per-layer summaries, so the signature the scorers see is built from these two alone."""


class LayerSummary(NamedTuple):
    """Means of one layer's statistics over a set of frames (a NamedTuple: built 60 times per request)."""

    layer: int
    mean_error_ratio: float
    mean_l0: float
    mean_mass: float


@dataclass(frozen=True, slots=True)
class Summary:
    """Per-layer means over ``frame_count`` frames, in layer order."""

    layers: tuple[LayerSummary, ...]
    frame_count: int


@dataclass(frozen=True, slots=True)
class Match:
    """How one thresholded scorer (a fingerprint) judged the request."""

    name: str
    score: float
    threshold: float

    @property
    def matched(self) -> bool:
        return self.score >= self.threshold


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything the sidecar derives from one assembled request."""

    request: AssembledRequest
    overall: Summary
    """Over all accepted frames."""
    prefill: Summary
    """Over the PROMPT_LAST frame(s) only: what was known before generating."""
    results: tuple[DetectorResult, ...]
    matches: tuple[Match, ...]
    head_entropy: tuple[float, ...] = ()
    """Mean attention entropy (nats) of each (layer, head) the frames summarized, over the frames."""
    forecast: ForecastResult | None = None
    """The prefill forecast (made live when the PROMPT_LAST frame arrived), or why there is none."""

    @property
    def flags(self) -> tuple[Match, ...]:
        """The matches that crossed their threshold."""
        return tuple(m for m in self.matches if m.matched)


def summarize(frames: Sequence[Frame]) -> Summary:
    """Per-layer means of error ratio, L0 and mass; a layer missing from some frames averages the rest."""
    if not frames:
        return Summary((), 0)
    first = frames[0].layers
    key = first.tobytes()
    if all(f.layers.tobytes() == key for f in frames[1:]):
        # Every frame carries the same layers (what the plugin sends): one mean over a stacked array.
        m = np.stack([f.layer_stats for f in frames]).mean(axis=0)[:, [ERROR_RATIO, L0, MASS]]  # (L, 3)
        e, l0, mass = m.T.tolist()
        return Summary(tuple(map(LayerSummary, first.tolist(), e, l0, mass)), len(frames))
    layers = np.concatenate([f.layers for f in frames])  # (sum L,)
    stats = np.concatenate([f.layer_stats[:, [ERROR_RATIO, L0, MASS]] for f in frames])  # (sum L, 3)
    ids, inverse = np.unique(layers, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids))  # (n_ids,)
    means = np.stack([np.bincount(inverse, weights=stats[:, j], minlength=len(ids)) for j in range(3)], 1)
    means /= counts[:, None]  # (n_ids, 3)
    rows = tuple(
        LayerSummary(int(layer), float(m[0]), float(m[1]), float(m[2]))
        for layer, m in zip(ids, means, strict=True)
    )
    return Summary(rows, len(frames))


def head_entropy_means(frames: Sequence[Frame]) -> tuple[float, ...]:
    """Per (layer, head) mean of the heads' attention entropy over ``frames`` (ordered by layer, head)."""
    heads = [f.head_stats for f in frames if len(f.head_stats)]
    if not heads:
        return ()
    if all(h.shape == heads[0].shape and np.array_equal(h[:, :2], heads[0][:, :2]) for h in heads[1:]):
        # The same (layer, head) grid in every frame, sorted as the plugin sends it: a plain mean.
        keys = heads[0][:, 0] * 65536 + heads[0][:, 1]
        if keys.size < 2 or bool((keys[1:] > keys[:-1]).all()):
            return tuple(np.mean([h[:, 2] for h in heads], axis=0).tolist())
    h = np.concatenate(heads)  # (sum H, 9): layer, head, entropy, …
    _, inverse = np.unique(h[:, 0] * 65536 + h[:, 1], return_inverse=True)
    means = np.bincount(inverse, weights=h[:, 2]) / np.bincount(inverse)
    return tuple(means.tolist())


def score_request(
    request: AssembledRequest,
    scorers: Registry[Scorer],
    n_layers: int | None = None,
    forecast: ForecastResult | None = None,
) -> Outcome:
    """Summaries plus every applicable scorer's result; a scorer that fails is logged and left out.
    ``n_layers``: the transcoder's layer count, when known (else read off the frames); ``forecast``: the
    request's prefill forecast, carried into the record."""
    results: list[DetectorResult] = []
    matches: list[Match] = []
    start = request.start
    view = SignatureView(to_signature(request, n_layers, SCORED_PHASES))
    for scorer in scorers:
        info = scorer.info
        if not info.applies_to(start.model, start.clt_id):
            continue
        try:
            result = scorer.score(request, view)
        except Exception:
            logger.exception(
                "scorer %r failed on request %r; left out of its record", info.name, start.request_id
            )
            continue
        if result is None:
            continue
        if not math.isfinite(result.score):
            logger.warning(
                "scorer %r gave %r for request %r; ignored", info.name, result.score, start.request_id
            )
            continue
        results.append(result)
        if info.threshold is not None:
            matches.append(Match(info.name, result.score, info.threshold))
    prefill = [f for f in request.frames if f.phase == "prompt_last"]
    return Outcome(
        request,
        summarize(request.frames),
        summarize(prefill),
        tuple(results),
        tuple(matches),
        head_entropy_means(request.frames),
        forecast,
    )
