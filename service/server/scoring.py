"""Scorers: pluggable detectors and fingerprints that turn an assembled request into scores and flags.

The residue-engine issue brings the real detectors and fitted fingerprints; the sidecar depends only on
the ``Scorer`` protocol and the registry shape of STYLE.md rule 4 (duplicate names raise, an unknown name
raises listing the known ones, the name is also the Prometheus ``fingerprint`` label value). One real
scorer ships now: ``prompt_error_ratio``, the mean CLT reconstruction error ratio over layers at the last
prompt token, the prefill-time form of the papers' error-node accumulation signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.detectors.registry import Registry
from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.events import ERROR_RATIO, AssembledRequest

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


@dataclass(frozen=True, slots=True)
class DetectorResult:
    """One scorer's verdict on one request (STYLE.md rule 2)."""

    name: str
    score: float
    evidence: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """A few named numbers that explain the score (for logs and, later, the record)."""


@runtime_checkable
class Scorer(Protocol):
    """Scores an assembled request; must be pure, cheap (milliseconds) and never raise on valid input."""

    @property
    def info(self) -> ScorerInfo: ...

    def score(self, request: AssembledRequest) -> DetectorResult | None:
        """The result, or None when the request lacks what the scorer needs (e.g. no prompt frame)."""
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

    def score(self, request: AssembledRequest) -> DetectorResult | None:
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


ScorerFactory = Callable[[ServerConfig], Scorer]
BUILTIN_SCORERS: Registry[ScorerFactory] = Registry(
    "scorer", {"prompt_error_ratio": lambda cfg: PromptErrorRatio(cfg.prompt_error_threshold)}
)
"""Scorers the sidecar can build from its config, by name."""


def scorer_registry(scorers: Iterable[Scorer]) -> Registry[Scorer]:
    """A registry keyed by each scorer's own ``info.name`` (so the key, the record and the label agree)."""
    reg: Registry[Scorer] = Registry("scorer")
    for s in scorers:
        reg.register(s.info.name, s)
    return reg


def default_scorers(cfg: ServerConfig, names: Iterable[str] | None = None) -> Registry[Scorer]:
    """A registry of the built-in scorers ``names`` (default: all), configured from ``cfg``."""
    chosen = BUILTIN_SCORERS.names() if names is None else tuple(names)
    return scorer_registry(BUILTIN_SCORERS.get(n)(cfg) for n in chosen)
