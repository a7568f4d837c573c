"""Scorers: the residue detectors and fitted fingerprints that turn an assembled request into scores
and flags.

The sidecar depends only on the ``Scorer`` protocol and the registry shape of STYLE.md rule 4 (duplicate
names raise, an unknown name raises listing the known ones, the name is also the Prometheus
``fingerprint`` label value). Built in: the three per-request residue detectors of ``detectors/``
(``attention``, ``errors``, ``nullout``: scores only) and ``prompt_error_ratio`` (the mean CLT error ratio
at the last prompt token, with a configured threshold). Fingerprints fitted by ``residue shells run``
are loaded from ``RESIDUE_FINGERPRINTS`` and flag requests whose score reaches their calibrated
threshold. Every scorer reads the same ``ResidueSignature``, rebuilt once per request from its frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from residue_monitor.detectors.base import DetectorResult
from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.detectors.registry import Registry
from residue_monitor.detectors.signature import ERROR_RATIO, ResidueSignature
from residue_monitor.detectors.suite import detector_registry, run_detectors
from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.events import AssembledRequest
from residue_monitor.shells.fingerprint import Fingerprint, compact_vector, load_fingerprints

__all__ = ["DetectorResult", "Registry", "Scorer", "ScorerInfo", "SignatureView"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ScorerInfo:
    """What a scorer is; scorers with a ``threshold`` are fingerprints (ListFingerprints, flags)."""

    name: str
    """Registry key and metric label."""
    description: str
    """One line on what it detects."""
    version: str = "1"
    threshold: float | None = None
    """Score at or above which the request is flagged; None: a detector that only reports a score."""
    target_fpr: float = 0.0
    """False-positive rate the threshold was calibrated for (0: not calibrated)."""
    model: str = ""
    """Only requests of this served model are scored ('' = any)."""
    clt_id: str = ""
    """Only requests encoded with this transcoder are scored ('' = any)."""

    def applies_to(self, model: str, clt_id: str) -> bool:
        return (not self.model or self.model == model) and (not self.clt_id or self.clt_id == clt_id)


class SignatureView:
    """A request's signature plus what several scorers read, computed once per request: every detector's
    result (fingerprints use the scores as inputs) and the fingerprints' compact statistics."""

    def __init__(self, sig: ResidueSignature) -> None:
        self.sig = sig

    @cached_property
    def detectors(self) -> dict[str, DetectorResult]:
        return run_detectors(self.sig) if self.sig.rows else {}

    @cached_property
    def compact(self) -> npt.NDArray[np.float64]:
        return compact_vector(self.sig, self.detectors)


@runtime_checkable
class Scorer(Protocol):
    """Scores an assembled request; must be pure, cheap (milliseconds) and never raise on valid input."""

    @property
    def info(self) -> ScorerInfo: ...

    def score(self, request: AssembledRequest, view: SignatureView) -> DetectorResult | None:
        """The result, or None when the request lacks what the scorer needs (e.g. no prompt frame).
        ``view`` holds the request's signature (``residue.to_signature``), built once for all scorers."""
        ...


class PromptErrorRatio:
    """Mean reconstruction error ratio over layers at the request's PROMPT_LAST frame.

    A CLT that explains a prompt's last position badly means the model is computing something its
    transcoder has not seen; the ratio's mean over layers is the simplest scalar of that signal.
    """

    def __init__(self, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise InvalidInput(f"prompt_error_ratio threshold must be finite, got {threshold}")
        self._info = ScorerInfo(
            name="prompt_error_ratio",
            description="mean CLT reconstruction error ratio over layers at the last prompt token",
            threshold=threshold,
        )

    @property
    def info(self) -> ScorerInfo:
        return self._info

    def score(self, request: AssembledRequest, view: SignatureView) -> DetectorResult | None:
        frame = next((f for f in request.frames if f.phase == "prompt_last"), None)
        if frame is None:
            return None
        ratios = frame.layer_stats[:, ERROR_RATIO]  # (L,)
        return DetectorResult(
            self._info.name,
            float(ratios.mean()),
            MappingProxyType(
                {"max_error_ratio": float(ratios.max()), "layer_of_max": float(np.argmax(ratios))}
            ),
        )


class DetectorScorer:
    """One residue detector of ``detectors/`` (a score, never a flag); the view runs every detector once."""

    def __init__(self, name: str, description: str) -> None:
        detector_registry().get(name)  # an unknown name raises, listing the known ones
        self._info = ScorerInfo(name=name, description=description)

    @property
    def info(self) -> ScorerInfo:
        return self._info

    def score(self, request: AssembledRequest, view: SignatureView) -> DetectorResult | None:
        return view.detectors.get(self._info.name)


class FingerprintScorer:
    """A fitted fingerprint: its probability, flagged at its calibrated threshold, for its CLT only."""

    def __init__(self, fp: Fingerprint) -> None:
        self.fingerprint = fp
        self._info = ScorerInfo(
            name=fp.name,
            description=f"fingerprint of the {fp.family} failure family",
            version=fp.version,
            threshold=fp.threshold,
            target_fpr=fp.target_fpr,
            model=fp.model,
            clt_id=fp.clt_id,
        )

    @property
    def info(self) -> ScorerInfo:
        return self._info

    def score(self, request: AssembledRequest, view: SignatureView) -> DetectorResult | None:
        sig = view.sig
        if not sig.rows or sig.n_layers != self.fingerprint.n_layers:
            return None
        return DetectorResult(self._info.name, self.fingerprint.score(sig, view.compact))


DETECTOR_DESCRIPTIONS = {
    "attention": "attention disruption: mean trapped attention mass over heads at the last prompt token",
    "errors": "error accumulation: CLT error ratio growth from the first to the last third of the layers",
    "nullout": "null-output residue: feature mass that does not reach the emitted token's logit",
}


def _detector_factory(name: str) -> Callable[[ServerConfig], Scorer]:
    return lambda cfg: DetectorScorer(name, DETECTOR_DESCRIPTIONS[name])


ScorerFactory = Callable[[ServerConfig], Scorer]
BUILTIN_SCORERS: Registry[ScorerFactory] = Registry(
    "scorer",
    {
        **{name: _detector_factory(name) for name in detector_registry().names()},
        "prompt_error_ratio": lambda cfg: PromptErrorRatio(cfg.prompt_error_threshold),
    },
)
"""Scorers the sidecar can build from its config, by name."""


def scorer_registry(scorers: Iterable[Scorer]) -> Registry[Scorer]:
    """A registry keyed by each scorer's own ``info.name`` (so the key, the record and the label agree)."""
    reg: Registry[Scorer] = Registry("scorer")
    for s in scorers:
        reg.register(s.info.name, s)
    return reg


def default_scorers(cfg: ServerConfig, names: Iterable[str] | None = None) -> Registry[Scorer]:
    """The built-in scorers ``names`` (default: all), configured from ``cfg``, plus the fingerprints of
    ``cfg.fingerprints_path`` when set (a malformed file raises ``InvalidInput`` naming it)."""
    chosen = BUILTIN_SCORERS.names() if names is None else tuple(names)
    scorers: list[Scorer] = [BUILTIN_SCORERS.get(n)(cfg) for n in chosen]
    if cfg.fingerprints_path:
        scorers += [FingerprintScorer(fp) for fp in load_fingerprints(Path(cfg.fingerprints_path))]
    return scorer_registry(scorers)
