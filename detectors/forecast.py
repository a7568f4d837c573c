"""The prefill failure forecast: a calibrated probability that a request will fail, from the residue of
its last prompt token alone, before the first token is generated (issue 13).

Inputs (``prefill_names``): per layer at the last prompt token the CLT reconstruction-error ratio, log
feature mass, L0, unreached share and four attention aggregates (mean head entropy, self, sink and
trapped mass): 8 numbers a layer, 240 for SmolLM2. ``with_logits`` adds the four statistics of the
first-token distribution (entropy, top-1 probability, margin, EOS probability), the only output signal
that exists at that moment. No sparse CLT features: thousands of them transfer worse across tasks than
these compact statistics (FACTS-signals.md).

Fitting (``fit_forecast``), pure numpy:

* an L2 logistic regression on standardised inputs, trained **task-balanced** by default
  (``evaluation.stratum_weights``: failures and successes weigh the same inside every task), so the model
  cannot score by recognising the task and its base rate; the ridge strength is picked by grouped inner
  cross-validation on the mean within-task AUROC. ``balance_tasks=False`` trains on the pooled mix
  instead (prompt types that usually fail then count as signal);
* **calibrated** by Platt scaling of the out-of-fold scores (grouped folds), so the probability means
  the failure rate of the training mix; the flag **threshold** is the conformal quantile of the
  successes' out-of-fold calibrated probabilities at ``target_fpr``.

The artifact (``save_forecast`` / ``load_forecast``, JSON) records the model, the CLT id and the layer
count it was fitted for, and an ``id`` that is a digest of its content; loading it for another CLT raises
``ArtifactMismatch``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from residue_monitor.detectors import evaluation as ev
from residue_monitor.detectors.attention import trapped_mass
from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput
from residue_monitor.detectors.signature import (
    ENTROPY,
    ERROR_RATIO,
    L0,
    LOGIT_STAT_NAMES,
    MASS,
    SELF,
    SINK,
    UNREACHED,
    ResidueSignature,
    RowSignature,
)

F64 = npt.NDArray[np.float64]
FORMAT_VERSION = 1
PER_LAYER = (
    "error_ratio",
    "log_mass",
    "l0",
    "unreached",
    "head_entropy",
    "head_self",
    "head_sink",
    "head_trap",
)
"""The per-layer statistics of ``layer_block``, in order (each a block of L entries)."""
FLAG_NAME = "prefill_forecast"
"""The flag (and WatchFlags ``fingerprint``) a forecast raises when it crosses its threshold."""


def layer_block(row: RowSignature) -> F64:
    """(8·L,) per-layer statistics of one row (``PER_LAYER`` blocks, layer order inside each); the four
    attention blocks are 0 when the row carries no head statistics."""
    s = row.layer_stats.astype(np.float64)
    L = s.shape[0]
    if row.heads.shape[1]:
        h = row.heads.astype(np.float64)
        heads = [
            h[..., ENTROPY].mean(1),
            h[..., SELF].mean(1),
            h[..., SINK].mean(1),
            trapped_mass(row).mean(1),
        ]
    else:
        heads = [np.zeros(L)] * 4
    cols = [s[:, ERROR_RATIO], np.log1p(np.clip(s[:, MASS], 0, None)), s[:, L0], s[:, UNREACHED], *heads]
    return np.concatenate(cols)


def prefill_names(n_layers: int, with_logits: bool) -> tuple[str, ...]:
    """Names of ``prefill_vector``'s entries."""
    names = [f"L{layer}.{s}" for s in PER_LAYER for layer in range(n_layers)]
    if with_logits:
        names += [f"first.{s}" for s in LOGIT_STAT_NAMES]
    return tuple(names)


def prefill_row(sig: ResidueSignature) -> RowSignature:
    """The signature's last-prompt-token row; ``InvalidInput`` when it was not sampled."""
    row = sig.row("prompt_last")
    if row is None:
        raise InvalidInput("the signature has no prompt_last row: a prefill forecast needs one")
    return row


def prefill_vector(row: RowSignature, with_logits: bool) -> F64:
    """The forecast's inputs from the last prompt token's row (``prefill_names``)."""
    v = layer_block(row)
    if with_logits:
        v = np.concatenate([v, row.logits.astype(np.float64)])
    return v


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True, eq=False)
class PrefillForecast:
    """A fitted, calibrated prefill failure forecast."""

    model: str
    clt_id: str
    n_layers: int
    with_logits: bool
    mean: F64
    """(d,) standardisation of the inputs."""
    scale: F64
    weights: F64
    """(d,) logistic weights on standardised inputs (the uncalibrated score is their dot product + bias)."""
    bias: float
    platt_a: float
    """Calibration: probability = σ(platt_a · score + platt_b), score the uncalibrated logit."""
    platt_b: float
    threshold: float
    """Probability at or above which a request is flagged."""
    target_fpr: float
    tasks: tuple[str, ...] = ()
    """The tasks it was fitted on."""
    report: Mapping[str, Any] = field(default_factory=dict[str, Any])
    """Held-out figures measured when it was fitted (informational)."""

    @property
    def names(self) -> tuple[str, ...]:
        return prefill_names(self.n_layers, self.with_logits)

    @property
    def id(self) -> str:
        """16 hex digits of the SHA-256 of the artifact's content (without the report)."""
        body = {k: v for k, v in self.to_dict().items() if k != "report"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def logit(self, X: F64) -> F64:
        """Uncalibrated scores (n,) of input rows X (n, d); non-finite inputs count as the training mean."""
        Z = (np.atleast_2d(np.asarray(X, dtype=np.float64)) - self.mean) / self.scale
        Z[~np.isfinite(Z)] = 0.0
        return Z @ self.weights + self.bias

    def probability(self, X: F64) -> F64:
        """Calibrated failure probabilities (n,) of input rows X (n, d)."""
        z = np.clip(self.platt_a * self.logit(X) + self.platt_b, -30, 30)
        return 1 / (1 + np.exp(-z))

    def check_row(self, row: RowSignature) -> None:
        """``ArtifactMismatch`` when ``row`` does not have this forecast's layer count."""
        if row.n_layers != self.n_layers:
            raise ArtifactMismatch(
                f"prefill forecast {self.id} was fitted on {self.n_layers} layers, the row has {row.n_layers}"
            )

    def predict_row(self, row: RowSignature) -> float:
        """The calibrated failure probability of one last-prompt-token row."""
        self.check_row(row)
        return float(self.probability(prefill_vector(row, self.with_logits)[None])[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": "prefill_forecast",
            "model": self.model,
            "clt_id": self.clt_id,
            "n_layers": self.n_layers,
            "with_logits": self.with_logits,
            "inputs": list(self.names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias,
            "platt_a": self.platt_a,
            "platt_b": self.platt_b,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "target_fpr": self.target_fpr,
            "tasks": list(self.tasks),
            "report": dict(self.report),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "forecast") -> PrefillForecast:
        if not isinstance(d, Mapping):
            raise InvalidInput(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT_VERSION or d.get("kind") != "prefill_forecast":
            raise InvalidInput(
                f"{where}: not a prefill forecast of format {FORMAT_VERSION} "
                f"(format {d.get('format')!r}, kind {d.get('kind')!r})"
            )
        try:
            fc = cls(
                model=str(d["model"]),
                clt_id=str(d["clt_id"]),
                n_layers=int(d["n_layers"]),
                with_logits=bool(d["with_logits"]),
                mean=np.asarray(d["mean"], dtype=np.float64),
                scale=np.asarray(d["scale"], dtype=np.float64),
                weights=np.asarray(d["weights"], dtype=np.float64),
                bias=float(d["bias"]),
                platt_a=float(d["platt_a"]),
                platt_b=float(d["platt_b"]),
                threshold=math.inf if d["threshold"] is None else float(d["threshold"]),
                target_fpr=float(d["target_fpr"]),
                tasks=tuple(str(t) for t in d.get("tasks", ())),
                report=dict(d.get("report", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"{where}: malformed prefill forecast ({type(e).__name__}: {e})") from e
        dim = len(fc.names)
        if fc.n_layers < 1 or not (fc.mean.shape == fc.scale.shape == fc.weights.shape == (dim,)):
            raise InvalidInput(
                f"{where}: mean/scale/weights must have {dim} entries for {fc.n_layers} layers"
            )
        if list(d.get("inputs", fc.names)) != list(fc.names):
            raise InvalidInput(f"{where}: its inputs differ from this version's ({dim} names)")
        finite = np.isfinite(np.concatenate([fc.mean, fc.weights, [fc.bias, fc.platt_a, fc.platt_b]]))
        if not finite.all() or not (fc.scale > 0).all():
            raise InvalidInput(f"{where}: non-finite weights or non-positive scales")
        if not (0 <= fc.threshold <= 1 or fc.threshold == math.inf) or not 0 < fc.target_fpr < 1:
            raise InvalidInput(f"{where}: threshold must be a probability and target_fpr in (0, 1)")
        return fc


def random_forecast(
    model: str,
    clt_id: str,
    n_layers: int,
    *,
    threshold: float = 0.5,
    seed: int = 0,
    scale: float = 0.3,
    mean: F64 | None = None,
) -> PrefillForecast:
    """A forecast of the right shape (with logit statistics) whose weights are random normal × ``scale``:
    what it predicts means nothing. For plumbing tests and latency measurements, where only the shape and
    the cost of scoring matter; ``mean``: the inputs' centre (default 0)."""
    d = len(prefill_names(n_layers, True))
    rng = np.random.default_rng(seed)
    return PrefillForecast(
        model=model,
        clt_id=clt_id,
        n_layers=n_layers,
        with_logits=True,
        mean=np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64),
        scale=np.ones(d),
        weights=scale * rng.normal(size=d),
        bias=0.0,
        platt_a=1.0,
        platt_b=0.0,
        threshold=threshold,
        target_fpr=0.05,
    )


def save_forecast(path: Path, fc: PrefillForecast) -> Path:
    """Write the artifact as JSON (a temp file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**fc.to_dict(), "id": fc.id}, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_forecast(path: Path, clt_id: str | None = None, n_layers: int | None = None) -> PrefillForecast:
    """Read an artifact; ``clt_id`` / ``n_layers`` given: it must have been fitted for them
    (``ArtifactMismatch`` naming both otherwise). A malformed file raises ``InvalidInput`` naming it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path}: cannot read the prefill forecast ({e})") from e
    fc = PrefillForecast.from_dict(doc, str(path))
    if isinstance(doc, dict) and "id" in doc and doc["id"] != fc.id:
        raise InvalidInput(f"{path}: its content does not match its id {doc['id']!r} (edited or corrupt)")
    if clt_id is not None and fc.clt_id != clt_id:
        raise ArtifactMismatch(
            f"{path}: prefill forecast {fc.id} was fitted for CLT {fc.clt_id!r}, the loaded CLT is {clt_id!r}"
        )
    if n_layers is not None and fc.n_layers != n_layers:
        raise ArtifactMismatch(
            f"{path}: prefill forecast {fc.id} has {fc.n_layers} layers, the loaded CLT {n_layers}"
        )
    return fc


# ---------------------------------------------------------------------------------------------- fitting
@dataclass(frozen=True, slots=True)
class ForecastConfig:
    with_logits: bool = True
    """Add the first-token logit statistics to the residue inputs."""
    balance_tasks: bool = True
    """Train task-balanced (``evaluation.stratum_weights``); False: the two classes balanced over all runs,
    so differences in failure rate between prompt types count as signal."""
    target_fpr: float = 0.05
    """False-positive rate (share of succeeding requests flagged) the threshold is calibrated for."""
    folds: int = 5
    """Grouped folds of the out-of-fold scores that calibration and the threshold use."""
    grid: tuple[float, ...] = ev.L2_GRID
    seed: int = 0


def platt(scores: F64, y: F64) -> tuple[float, float]:
    """(a, b) of σ(a·score + b) fitted to labels y by (unweighted) logistic regression."""
    s = np.asarray(scores, dtype=np.float64)
    mu, sd = float(s.mean()), float(s.std()) or 1.0
    w, b = ev.fit_logistic(((s - mu) / sd)[:, None], np.asarray(y, dtype=np.float64), 1e-6, balance=False)
    a = float(w[0]) / sd
    return a, float(b) - a * mu


def fit_forecast(
    X: F64,
    y: F64,
    tasks: Sequence[str],
    groups: Sequence[str],
    *,
    model: str,
    clt_id: str,
    n_layers: int,
    cfg: ForecastConfig = ForecastConfig(),
    report: Mapping[str, Any] | None = None,
) -> PrefillForecast:
    """Fit, calibrate and threshold a forecast on inputs X (n, d) (``prefill_vector`` rows) with failure
    labels y; ``tasks`` are the strata of the task balance, ``groups`` keep near-duplicates in one fold."""
    A = np.asarray(X, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    want = len(prefill_names(n_layers, cfg.with_logits))
    if A.ndim != 2 or A.shape != (t.size, want):
        raise InvalidInput(f"X must be ({t.size}, {want}) for {n_layers} layers, got {A.shape}")
    if t.sum() == 0 or t.sum() == t.size:
        raise InvalidInput("a forecast needs both failing and succeeding runs")
    strata = tasks if cfg.balance_tasks else None
    oof, chosen = ev.cross_val(A, t, groups, cfg.folds, cfg.grid, cfg.seed, strata=strata)
    # Out-of-fold probabilities → logits of the same probes, for calibration.
    oof_logit = np.log(np.clip(oof, 1e-12, 1)) - np.log(np.clip(1 - oof, 1e-12, 1))
    a, b = platt(oof_logit, t)
    calibrated = 1 / (1 + np.exp(-np.clip(a * oof_logit + b, -30, 30)))
    threshold = ev.conformal_threshold(calibrated[t == 0], cfg.target_fpr)
    l2 = float(np.median(chosen))
    probe = ev.train_probe(A, t, l2, strata=strata)
    return PrefillForecast(
        model=model,
        clt_id=clt_id,
        n_layers=n_layers,
        with_logits=cfg.with_logits,
        mean=probe.mean,
        scale=probe.scale,
        weights=probe.weights,
        bias=probe.bias,
        platt_a=a,
        platt_b=b,
        threshold=min(threshold, 1.0) if math.isfinite(threshold) else math.inf,
        target_fpr=cfg.target_fpr,
        tasks=tuple(sorted(set(tasks))),
        report={
            "l2": l2,
            "n_runs": int(t.size),
            "failure_rate": float(t.mean()),
            "task_balanced": cfg.balance_tasks,
            **dict(report or {}),
        },
    )
