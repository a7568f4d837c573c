"""Fingerprints: fit, calibrate, save, load and match the residue of a failure family.

A fingerprint separates one shell family's signatures from benign controls. Its inputs are

* **compact statistics** of the request (``compact_vector``): per layer at the last prompt token the
  CLT error ratio, log feature mass, L0, unreached fraction and four attention aggregates; logit
  statistics at the first and the final row; the residue detectors' scores. Tens to a few hundred
  numbers that transfer across prompts (FACTS-signals.md);
* **a few sparse CLT features** (``n_sparse``) at the last prompt token: the ones the cross-run
  comparison (``detectors.compare``) finds most different between the family and the controls, with a
  Benjamini-Hochberg-corrected Mann-Whitney test.

The model is an L2-regularised logistic regression on standardised inputs (Newton's method: the problem
is small and convex). The score is its probability. The threshold is calibrated on *out-of-fold* scores
of the fitting controls (k-fold, feature selection redone inside each fold) with the conformal quantile,
so the false-positive rate on new controls is at most ``target_fpr`` in expectation; the report then
measures it on held-out controls and the detection rate on held-out family members, never the ones
used to fit.

A fingerprint records the model and the CLT id it was fitted with; scoring a signature from another CLT
or loading the artifact for another CLT raises ``ArtifactMismatch``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from residue_monitor.detectors.base import DetectorResult
from residue_monitor.detectors.compare import compare_runs, feature_matrix
from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput
from residue_monitor.detectors.forecast import PER_LAYER, layer_block
from residue_monitor.detectors.signature import (
    ERROR_RATIO,
    UNREACHED,
    ResidueSignature,
)
from residue_monitor.detectors.suite import run_detectors

F64 = npt.NDArray[np.float64]
FORMAT_VERSION = 1
DETECTOR_NAMES = ("attention", "errors", "nullout")


# ---------------------------------------------------------------------------------------------- inputs
@lru_cache(maxsize=16)  # compact_vector checks its length on every request
def compact_names(n_layers: int) -> tuple[str, ...]:
    """Names of ``compact_vector``'s entries, in order."""
    names = [f"L{layer}.{s}" for s in PER_LAYER for layer in range(n_layers)]
    names += [f"first.{s}" for s in ("entropy", "top1_prob", "margin", "eos_prob")]
    names += [
        f"final.{s}" for s in ("entropy", "top1_prob", "margin", "eos_prob", "error_ratio", "unreached")
    ]
    names += [f"detector.{d}" for d in DETECTOR_NAMES]
    names += ["output_tokens_log", "empty_output"]
    return tuple(names)


def compact_vector(sig: ResidueSignature, detectors: Mapping[str, DetectorResult] | None = None) -> F64:
    """The compact statistics of ``sig`` (see ``compact_names``); NaN where a row is missing.
    ``detectors``: the signature's detector results when already computed (the sidecar shares them)."""
    first = sig.row("prompt_last") or (sig.rows[0] if sig.rows else None)
    if first is None:
        raise InvalidInput("signature has no rows")
    L = first.n_layers
    parts = [layer_block(first), first.logits.astype(np.float64)]
    final = sig.row("final")
    if final is not None:
        s = final.layer_stats.astype(np.float64)
        parts.append(
            np.concatenate(
                [final.logits.astype(np.float64), [s[:, ERROR_RATIO].mean(), s[:, UNREACHED].mean()]]
            )
        )
    else:
        parts.append(np.full(6, np.nan))
    det = run_detectors(sig) if detectors is None else detectors
    parts.append(np.array([det[d].score if d in det else np.nan for d in DETECTOR_NAMES]))
    parts.append(np.array([math.log1p(sig.output_tokens), float(sig.empty_output)]))
    v = np.concatenate(parts)
    assert v.shape[0] == len(compact_names(L))
    return v


def sparse_vector(sig: ResidueSignature, keys: Sequence[tuple[int, int]] | npt.NDArray[np.int64]) -> F64:
    """Activations of the features ``keys`` [(layer, feature)] at the last prompt token (0 if not kept)."""
    row = sig.row("prompt_last") or sig.rows[0]
    if len(keys) == 0:
        return np.zeros(0)
    k = np.asarray(keys, dtype=np.int64)  # (n, 2): layer, feature
    hit = row.feature_ids[k[:, 0]] == k[:, 1:2]  # (n, k): where each wanted feature sits, if kept
    vals = np.where(hit, row.feature_values[k[:, 0]], 0.0)  # (n, k)
    return vals.max(axis=1).astype(np.float64)  # values are ≥ 0; a feature appears at most once a layer


def prompt_feature_matrix(sigs: Sequence[ResidueSignature], n_features: int) -> npt.NDArray[np.float32]:
    """(n, L·F) dense feature activations at the last prompt token; column = layer·F + feature."""
    rows = [s.row("prompt_last") or s.rows[0] for s in sigs]
    return feature_matrix(
        [r.feature_ids for r in rows], [r.feature_values for r in rows], sigs[0].n_layers, n_features
    )


# ---------------------------------------------------------------------------------------------- model
def _fit_logistic(X: F64, y: F64, l2: float, iters: int = 50) -> tuple[F64, float]:
    """L2-regularised logistic regression by Newton's method; X standardised (n, d), y in {0, 1}."""
    n, d = X.shape
    A = np.hstack([X, np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0  # the bias is not penalised
    # Balance the classes: each class carries half of the loss.
    pos = max(y.sum(), 1.0)
    neg = max(n - y.sum(), 1.0)
    sw = np.where(y > 0, n / (2 * pos), n / (2 * neg))
    for _ in range(iters):
        z = np.clip(A @ w, -30, 30)
        p = 1 / (1 + np.exp(-z))
        g = A.T @ (sw * (p - y)) + reg * w
        H = (A * (sw * p * (1 - p))[:, None]).T @ A + np.diag(reg + 1e-9)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    return w[:-1], float(w[-1])


def conformal_threshold(control_scores: F64, target_fpr: float) -> float:
    """The smallest threshold such that a new control's score is ≥ it with probability ≤ target_fpr
    (split-conformal: the ⌈(1−α)(n+1)⌉-th smallest calibration score, nudged up so ≥ means 'above')."""
    s = np.sort(np.asarray(control_scores, dtype=np.float64))
    n = s.shape[0]
    r = math.ceil((1 - target_fpr) * (n + 1))
    if r > n:
        return math.inf  # too few controls to certify this FPR: never match
    return float(np.nextafter(s[r - 1], np.inf))


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """A fitted, calibrated fingerprint of one failure family."""

    name: str
    """Registry key and metric label, e.g. ``v1_memtrace``."""
    family: str
    """The shell family it was fitted on (e.g. ``v1.MEMTRACE``)."""
    model: str
    clt_id: str
    n_layers: int
    compact: tuple[str, ...]
    sparse_keys: tuple[tuple[int, int], ...]
    mean: F64
    """(d,) standardisation of [compact | sparse] inputs."""
    scale: F64
    weights: F64
    """(d,) logistic weights on the standardised inputs."""
    bias: float
    threshold: float
    """Probability at or above which a request matches."""
    target_fpr: float
    version: str = "1"
    report: dict[str, Any] = field(default_factory=dict[str, Any])
    """Fit and held-out measurements (detection rate, FPR, sizes)."""

    def check(self, sig: ResidueSignature) -> None:
        """Raise ArtifactMismatch when ``sig`` was not encoded with this fingerprint's CLT."""
        if sig.clt_id and self.clt_id and sig.clt_id != self.clt_id:
            raise ArtifactMismatch(
                f"fingerprint {self.name} was fitted with CLT {self.clt_id}; the signature used {sig.clt_id}"
            )
        if sig.n_layers != self.n_layers:
            raise ArtifactMismatch(
                f"fingerprint {self.name} expects {self.n_layers} layers, got {sig.n_layers}"
            )

    def inputs(self, sig: ResidueSignature, compact: F64 | None = None) -> F64:
        """[compact | sparse] inputs of ``sig``; ``compact``: ``compact_vector(sig)`` when already known."""
        c = compact_vector(sig) if compact is None else compact
        return np.concatenate([c, sparse_vector(sig, self._keys)])

    @cached_property
    def _keys(self) -> npt.NDArray[np.int64]:
        """``sparse_keys`` as an (n, 2) array, converted once rather than per request."""
        return np.asarray(self.sparse_keys, dtype=np.int64).reshape(-1, 2)

    def score_inputs(self, X: F64) -> F64:
        """Probabilities for raw input rows X (n, d) (NaN inputs count as the training mean)."""
        Z = (X - self.mean) / self.scale
        Z[~np.isfinite(Z)] = 0.0
        z = np.clip(Z @ self.weights + self.bias, -30, 30)
        return 1 / (1 + np.exp(-z))

    def score(self, sig: ResidueSignature, compact: F64 | None = None) -> float:
        """Probability that ``sig`` belongs to the fingerprinted family (``compact`` as in ``inputs``).
        ``score_inputs`` for one row, with a third of its numpy calls (the sidecar runs it for every
        fingerprint on every request)."""
        self.check(sig)
        z = (self.inputs(sig, compact) - self.mean) / self.scale
        ok = np.isfinite(z)
        if not ok.all():
            z = np.where(ok, z, 0.0)  # NaN inputs count as the training mean
        t = min(max(float(z @ self.weights) + self.bias, -30.0), 30.0)
        return 1 / (1 + math.exp(-t))

    def matches(self, sig: ResidueSignature) -> tuple[float, bool]:
        s = self.score(sig)
        return s, s >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "family": self.family,
            "version": self.version,
            "model": self.model,
            "clt_id": self.clt_id,
            "n_layers": self.n_layers,
            "compact": list(self.compact),
            "sparse_keys": [list(k) for k in self.sparse_keys],
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "target_fpr": self.target_fpr,
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "fingerprint") -> Fingerprint:
        try:
            if d.get("format") != FORMAT_VERSION:
                raise InvalidInput(
                    f"{where}: format {d.get('format')!r}, this version reads {FORMAT_VERSION}"
                )
            fp = cls(
                name=str(d["name"]),
                family=str(d["family"]),
                version=str(d["version"]),
                model=str(d["model"]),
                clt_id=str(d["clt_id"]),
                n_layers=int(d["n_layers"]),
                compact=tuple(str(x) for x in d["compact"]),
                sparse_keys=tuple((int(a), int(b)) for a, b in d["sparse_keys"]),
                mean=np.asarray(d["mean"], dtype=np.float64),
                scale=np.asarray(d["scale"], dtype=np.float64),
                weights=np.asarray(d["weights"], dtype=np.float64),
                bias=float(d["bias"]),
                threshold=math.inf if d["threshold"] is None else float(d["threshold"]),
                target_fpr=float(d["target_fpr"]),
                report=dict(d.get("report", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"{where}: malformed fingerprint ({type(e).__name__}: {e})") from e
        dim = len(fp.compact) + len(fp.sparse_keys)
        if not (fp.mean.shape == fp.scale.shape == fp.weights.shape == (dim,)):
            raise InvalidInput(f"{where}: weights/mean/scale must have {dim} entries")
        if fp.compact != compact_names(fp.n_layers):
            raise InvalidInput(
                f"{where}: compact inputs differ from this version's ({len(fp.compact)} names)"
            )
        if not np.isfinite(fp.weights).all() or not (fp.scale > 0).all():
            raise InvalidInput(f"{where}: non-finite weights or non-positive scales")
        return fp


# ---------------------------------------------------------------------------------------------- fitting
@dataclass(frozen=True, slots=True)
class FitConfig:
    target_fpr: float = 0.05
    """False-positive rate the threshold is calibrated for."""
    l2: float = 1.0
    """Ridge penalty on standardised weights."""
    n_sparse: int = 16
    """Sparse CLT features kept (the strongest FDR-significant differences)."""
    folds: int = 5
    """Folds for the out-of-fold calibration scores (fewer when a side has fewer instances)."""
    seed: int = 0


def _select_sparse(
    pos: npt.NDArray[np.float32], neg: npt.NDArray[np.float32], n_features: int, n: int
) -> tuple[tuple[int, int], ...]:
    if n <= 0:
        return ()
    cmp = compare_runs(pos, neg, alpha=0.05, min_active=0.2)
    top = cmp.top(n, "both")
    return tuple((d.key // n_features, d.key % n_features) for d in top)


def _inputs(sigs: Sequence[ResidueSignature], keys: Sequence[tuple[int, int]]) -> F64:
    return np.stack([np.concatenate([compact_vector(s), sparse_vector(s, keys)]) for s in sigs])


def _train(
    pos: Sequence[ResidueSignature],
    neg: Sequence[ResidueSignature],
    n_features: int,
    cfg: FitConfig,
) -> tuple[tuple[tuple[int, int], ...], F64, F64, F64, float]:
    keys = _select_sparse(
        prompt_feature_matrix(pos, n_features),
        prompt_feature_matrix(neg, n_features),
        n_features,
        cfg.n_sparse,
    )
    X = np.vstack([_inputs(pos, keys), _inputs(neg, keys)])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    mean = np.nanmean(X, axis=0)
    mean = np.nan_to_num(mean)
    sd = np.nanstd(X, axis=0)
    scale = np.where(np.isfinite(sd) & (sd > 1e-8), sd, 1.0)
    Z = np.nan_to_num((X - mean) / scale)
    w, b = _fit_logistic(Z, y, cfg.l2)
    return keys, mean, scale, w, b


def fit_fingerprint(
    name: str,
    family: str,
    positives: Sequence[ResidueSignature],
    controls: Sequence[ResidueSignature],
    n_features: int,
    cfg: FitConfig | None = None,
) -> Fingerprint:
    """Fit one family's fingerprint on ``positives`` vs ``controls`` and calibrate its threshold.

    ``n_features``: the CLT's features per layer (for the sparse feature columns).
    """
    cfg = cfg or FitConfig()
    # Fewer folds when a side is small (quick runs keep a few instances per shell): every fold needs at
    # least one positive and one control to score out of fold.
    folds = min(cfg.folds, len(positives), len(controls))
    if folds < 2:
        raise InvalidInput(f"{name}: need ≥ 2 positives and controls, got {len(positives)}/{len(controls)}")
    clt_ids = {s.clt_id for s in (*positives, *controls)}
    models = {s.model for s in (*positives, *controls)}
    if len(clt_ids) != 1:
        raise ArtifactMismatch(f"{name}: signatures come from several CLTs: {sorted(clt_ids)}")
    L = positives[0].n_layers
    rng = np.random.default_rng(cfg.seed)
    pf = rng.permutation(len(positives)) % folds
    cf = rng.permutation(len(controls)) % folds
    oof_controls = np.empty(len(controls))
    oof_pos = np.empty(len(positives))
    for f in range(folds):
        p_tr = [s for s, k in zip(positives, pf, strict=True) if k != f]
        c_tr = [s for s, k in zip(controls, cf, strict=True) if k != f]
        keys, mean, scale, w, b = _train(p_tr, c_tr, n_features, cfg)
        tmp = Fingerprint(
            name, family, "", "", L, compact_names(L), keys, mean, scale, w, b, 0.5, cfg.target_fpr
        )
        c_te = [i for i, k in enumerate(cf) if k == f]
        p_te = [i for i, k in enumerate(pf) if k == f]
        oof_controls[c_te] = tmp.score_inputs(_inputs([controls[i] for i in c_te], keys))
        oof_pos[p_te] = tmp.score_inputs(_inputs([positives[i] for i in p_te], keys))
    threshold = conformal_threshold(oof_controls, cfg.target_fpr)
    keys, mean, scale, w, b = _train(positives, controls, n_features, cfg)
    return Fingerprint(
        name=name,
        family=family,
        model=models.pop() if len(models) == 1 else "",
        clt_id=clt_ids.pop(),
        n_layers=L,
        compact=compact_names(L),
        sparse_keys=keys,
        mean=mean,
        scale=scale,
        weights=w,
        bias=b,
        threshold=threshold,
        target_fpr=cfg.target_fpr,
        report={
            "fit_positives": len(positives),
            "fit_controls": len(controls),
            "folds": folds,
            "oof_detection_rate": float((oof_pos >= threshold).mean()),
            "oof_fpr": float((oof_controls >= threshold).mean()),
            "sparse_features": [f"L{a}/F{b}" for a, b in keys],
        },
    )


def rates(
    fp: Fingerprint, positives: Sequence[ResidueSignature], controls: Sequence[ResidueSignature]
) -> dict[str, float]:
    """Detection rate on ``positives`` and false-positive rate on ``controls`` (held-out sets)."""
    p = np.array([fp.score(s) for s in positives]) if positives else np.zeros(0)
    c = np.array([fp.score(s) for s in controls]) if controls else np.zeros(0)
    return {
        "detection_rate": float((p >= fp.threshold).mean()) if p.size else math.nan,
        "fpr": float((c >= fp.threshold).mean()) if c.size else math.nan,
        "n_positives": float(p.size),
        "n_controls": float(c.size),
    }


# ---------------------------------------------------------------------------------------------- files
def save_fingerprints(path: Path, fps: Sequence[Fingerprint], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"format", "fingerprints": [...], "meta"}`` as JSON (written to a temp file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT_VERSION, "meta": dict(meta or {}), "fingerprints": [f.to_dict() for f in fps]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_fingerprints(path: Path, clt_id: str | None = None, model: str | None = None) -> list[Fingerprint]:
    """Read fingerprints; ``clt_id`` / ``model`` given: every fingerprint must have been fitted with them
    (ArtifactMismatch otherwise). A malformed file raises InvalidInput naming the file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path}: cannot read fingerprints ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("fingerprints"), list):
        raise InvalidInput(f"{path}: expected an object with a 'fingerprints' list")
    fps = [Fingerprint.from_dict(d, f"{path}[{i}]") for i, d in enumerate(doc["fingerprints"])]
    for fp in fps:
        if clt_id is not None and fp.clt_id != clt_id:
            raise ArtifactMismatch(
                f"{path}: fingerprint {fp.name} was fitted with CLT {fp.clt_id}, not {clt_id}"
            )
        if model is not None and fp.model and fp.model != model:
            raise ArtifactMismatch(
                f"{path}: fingerprint {fp.name} was fitted on model {fp.model}, not {model}"
            )
    return fps
