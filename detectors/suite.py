"""The registry of the built-in residue detectors, and running them all on a signature."""

from __future__ import annotations

from collections.abc import Callable

from residue_monitor.detectors.attention import detect_attention
from residue_monitor.detectors.base import DetectorResult
from residue_monitor.detectors.errors import detect_errors
from residue_monitor.detectors.nullout import detect_nullout
from residue_monitor.detectors.registry import Registry
from residue_monitor.detectors.signature import ResidueSignature

Detector = Callable[[ResidueSignature], DetectorResult | None]


def detector_registry() -> Registry[Detector]:
    """Three of the papers' four methods, the ones that score a single request; the fourth, cross-run
    comparison, works on groups of requests (``detectors.compare``)."""
    items: dict[str, Detector] = {
        "attention": detect_attention,
        "errors": detect_errors,
        "nullout": detect_nullout,
    }
    return Registry("detector", items)


def run_detectors(
    sig: ResidueSignature, registry: Registry[Detector] | None = None
) -> dict[str, DetectorResult]:
    """Every detector's result on ``sig`` (detectors that return None are left out)."""
    reg = registry or detector_registry()
    out: dict[str, DetectorResult] = {}
    for name in reg.names():
        res = reg.get(name)(sig)
        if res is not None:
            out[name] = res
    return out
