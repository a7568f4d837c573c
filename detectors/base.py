"""What every detector returns.

STYLE.md rule 2: a detector is a pure function ``ResidueSignature -> DetectorResult | None`` (None when
the signature lacks what it reads, e.g. no sampled row of the phase it needs); only the exporter turns
results into metrics. The registry (``detectors.suite``) key is the detector's name everywhere: in
records, in fingerprint feature names and as the Prometheus label value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class DetectorResult:
    """One detector's verdict on one request."""

    name: str
    score: float
    """Higher = more of the residue the detector looks for (units are the detector's own)."""
    evidence: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """A few named numbers that explain the score (shown by `residue analyze` and in its JSONL output;
    the sidecar's records keep the score only)."""


def frozen(d: Mapping[str, float]) -> Mapping[str, float]:
    """An immutable evidence mapping with plain floats."""
    return MappingProxyType({k: float(v) for k, v in d.items()})
