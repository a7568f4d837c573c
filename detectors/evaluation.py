# pyright: strict
"""How well does a score predict failure? The metrics and the probe protocol of ``residue eval``.

Everything here takes plain arrays: ``y`` is 1 for a failing run (wrong or null output) and 0 for a
succeeding one; a *score* is higher for runs the predictor believes will fail.

Metrics
    ``auroc`` (Mann-Whitney, ties count half), ``auprc`` (average precision, the step-wise area used by
    scikit-learn), ``tpr_at_fpr`` (the threshold is the conformal quantile of the negatives' scores, so
    at most the target share of negatives reaches it), ``bootstrap_ci`` (stratified percentile bootstrap
    over runs), ``within_task_auroc`` (mean of per-task AUROCs, so a predictor that only recognises which
    task a prompt comes from, and so its base rate, earns nothing), ``reliability`` (calibration table and
    expected calibration error).

Probes
    ``fit_logistic``: L2-regularised logistic regression with class-balanced loss on standardised inputs
    (L-BFGS on the exact loss and gradient). ``cross_val_scores`` gives out-of-fold probabilities with
    *grouped* folds: every run of one group (a template family, a bigbench subtask) lands in one fold, so
    near-duplicates never sit on both sides of a split. The ridge strength is chosen inside each training
    fold by an inner grouped split, never on the test fold. ``leave_one_task_out`` trains on every task
    but one and scores the held-out task. A single-column input is the same machinery with one weight, so a
    scalar baseline's orientation is learned on the training folds, never read off the test labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats  # pyright: ignore[reportMissingTypeStubs]

from residue_monitor.detectors.exceptions import InvalidInput

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Metric = Callable[[F64, F64], float]

L2_GRID = (10.0, 100.0, 1000.0)
"""Ridge strengths tried inside each training fold: the penalty ½·l2·‖w‖² on standardised weights is added
to the *summed* class-balanced loss (l2 = 1/C in scikit-learn's terms)."""


# ---------------------------------------------------------------------------------------------- metrics
def _check(scores: F64, y: F64) -> tuple[F64, F64]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(y, dtype=np.float64).ravel()
    if s.shape != t.shape:
        raise InvalidInput(f"scores and labels differ in length: {s.shape[0]} vs {t.shape[0]}")
    if not np.isin(t, (0.0, 1.0)).all():
        raise InvalidInput("labels must be 0 (success) or 1 (failure)")
    if not np.isfinite(s).all():
        raise InvalidInput("scores must be finite (impute or drop missing runs first)")
    return s, t


def auroc(scores: F64, y: F64) -> float:
    """P(score of a failing run > score of a succeeding run), ties counted half; NaN if a class is empty."""
    s, t = _check(scores, y)
    n1 = int(t.sum())
    n0 = t.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = np.asarray(stats.rankdata(s), dtype=np.float64)  # pyright: ignore[reportUnknownMemberType]  # ties → average rank
    u = float(ranks[t == 1].sum()) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def auprc(scores: F64, y: F64) -> float:
    """Average precision: Σ_k (R_k − R_{k−1}) P_k over distinct thresholds, highest score first."""
    s, t = _check(scores, y)
    n1 = t.sum()
    if n1 == 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    fp = np.cumsum(1 - t)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each distinct score
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / n1
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def conformal_threshold(negative_scores: F64, target_fpr: float) -> float:
    """The smallest threshold such that a new negative scores ≥ it with probability ≤ ``target_fpr``
    (split conformal: the ⌈(1 − α)(n + 1)⌉-th smallest negative score, nudged up); +inf when there are
    too few negatives to certify ``target_fpr``."""
    if not 0 < target_fpr < 1:
        raise InvalidInput(f"target_fpr must be in (0, 1), got {target_fpr}")
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))
    n = s.shape[0]
    r = math.ceil((1 - target_fpr) * (n + 1))
    if r > n:
        return math.inf
    return float(np.nextafter(s[r - 1], np.inf))


def tpr_at_fpr(scores: F64, y: F64, fpr: float = 0.01) -> float:
    """True-positive rate at the largest threshold whose false-positive rate on these runs is ≤ ``fpr``
    (the empirical ROC read at ``fpr``; ties at the threshold count as positive predictions)."""
    s, t = _check(scores, y)
    neg = np.sort(s[t == 0])[::-1]
    pos = s[t == 1]
    if neg.size == 0 or pos.size == 0:
        return math.nan
    allowed = math.floor(fpr * neg.size)  # negatives that may score ≥ threshold
    # Threshold just above the (allowed+1)-th highest negative: every negative at or below it is excluded.
    thr = np.nextafter(neg[allowed], np.inf) if allowed < neg.size else -np.inf
    return float((pos >= thr).mean())


def bootstrap_ci(
    metric: Metric, scores: F64, y: F64, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ``metric`` over ``n_boot`` stratified resamples of the runs (failures and
    successes resampled separately, so every resample has both classes)."""
    s, t = _check(scores, y)
    pos = np.flatnonzero(t == 1)
    neg = np.flatnonzero(t == 0)
    if pos.size == 0 or neg.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        vals[b] = metric(s[idx], t[idx])
    vals = vals[np.isfinite(vals)]
    a = (1 - level) / 2
    return (float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a)))


def per_task_auroc(scores: F64, y: F64, tasks: Sequence[str], min_per_class: int = 10) -> dict[str, float]:
    """AUROC within each task (NaN where a task has fewer than ``min_per_class`` runs of either class)."""
    s, t = _check(scores, y)
    task = np.asarray(tasks)
    out: dict[str, float] = {}
    for name in sorted(set(tasks)):
        m = task == name
        n1 = int(t[m].sum())
        ok = n1 >= min_per_class and int(m.sum()) - n1 >= min_per_class
        out[name] = auroc(s[m], t[m]) if ok else math.nan
    return out


def within_task_auroc(scores: F64, y: F64, tasks: Sequence[str], min_per_class: int = 10) -> float:
    """Mean of the per-task AUROCs over the tasks that have both classes (``per_task_auroc``)."""
    vals = [v for v in per_task_auroc(scores, y, tasks, min_per_class).values() if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


@dataclass(frozen=True, slots=True)
class Reliability:
    """Calibration of predicted failure probabilities: per bin, mean prediction vs observed failure rate."""

    edges: tuple[float, ...]
    """(B + 1,) bin edges in [0, 1]."""
    count: tuple[int, ...]
    """(B,) runs per bin."""
    predicted: tuple[float, ...]
    """(B,) mean predicted probability per bin (NaN for an empty bin)."""
    observed: tuple[float, ...]
    """(B,) failure rate per bin (NaN for an empty bin)."""
    ece: float
    """Expected calibration error: Σ_b (n_b / n) |observed_b − predicted_b|."""


def reliability(prob: F64, y: F64, bins: int = 10) -> Reliability:
    """Equal-width calibration table of probabilities ``prob`` in [0, 1]."""
    p, t = _check(prob, y)
    if ((p < 0) | (p > 1)).any():
        raise InvalidInput("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    count = np.bincount(b, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        pred = np.bincount(b, weights=p, minlength=bins) / count
        obs = np.bincount(b, weights=t, minlength=bins) / count
    nz = count > 0
    ece = float(np.sum(count[nz] / p.size * np.abs(obs[nz] - pred[nz])))
    return Reliability(
        tuple(float(e) for e in edges),
        tuple(int(c) for c in count),
        tuple(float(v) for v in pred),
        tuple(float(v) for v in obs),
        ece,
    )


# ---------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True, slots=True)
class LogisticModel:
    """A fitted probe: standardisation, weights, bias (probability = σ(((x − mean) / scale) · w + b))."""

    mean: F64
    scale: F64
    weights: F64
    bias: float
    l2: float

    def predict(self, X: F64) -> F64:
        """Failure probabilities of rows X (n, d); NaN inputs count as the training mean."""
        Z = (np.asarray(X, dtype=np.float64) - self.mean) / self.scale
        Z[~np.isfinite(Z)] = 0.0
        return 1 / (1 + np.exp(-np.clip(Z @ self.weights + self.bias, -30, 30)))


def standardise(X: F64) -> tuple[F64, F64]:
    """Column means (NaN-aware, 0 for an all-NaN column) and scales (1 for constant columns)."""
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(X, axis=0)) if X.shape[0] else np.zeros(X.shape[1])
        sd = np.nanstd(X, axis=0) if X.shape[0] else np.ones(X.shape[1])
    scale = np.where(np.isfinite(sd) & (sd > 1e-8), sd, 1.0)
    return mean, scale


def fit_logistic(
    Z: F64, y: F64, l2: float, balance: bool = True, weights: F64 | None = None
) -> tuple[F64, float]:
    """Weights and bias of an L2-regularised logistic regression on standardised inputs Z (n, d).

    Loss: (1/n) Σ w_i log(1 + exp(−(2y−1) z_i)) + (l2 / 2n) ‖w‖², bias unpenalised; with ``balance`` each
    class carries half of the loss; ``weights`` (n,), when given, replace that balancing (e.g.
    ``stratum_weights``). Convex; solved with L-BFGS on the exact gradient.
    """
    n, d = int(Z.shape[0]), int(Z.shape[1])
    if n == 0:
        raise InvalidInput("cannot fit a probe on zero runs")
    t = np.asarray(y, dtype=np.float64)
    pos = max(float(t.sum()), 1.0)
    neg = max(n - float(t.sum()), 1.0)
    sw: F64 = np.where(t > 0, n / (2 * pos), n / (2 * neg)) if balance else np.ones(n)
    if weights is not None:
        sw = np.asarray(weights, dtype=np.float64)
        if sw.shape != (n,) or not (np.isfinite(sw).all() and (sw >= 0).all()):
            raise InvalidInput(f"weights must be (n,) = ({n},), finite and >= 0")
    sign = 2 * t - 1

    def loss(theta: F64) -> tuple[float, F64]:
        w, b = theta[:d], theta[d]
        m = sign * (Z @ w + b)  # margins
        lo = np.logaddexp(0.0, -m)
        g_m: F64 = -sw * sign / (1 + np.exp(np.clip(m, -500, 500)))  # d loss_i / d z_i = −σ(−m)·sign
        f = float(sw @ lo) / n + 0.5 * l2 * float(w @ w) / n
        g = np.empty(d + 1)
        g[:d] = (Z.T @ g_m) / n + l2 * w / n
        g[d] = g_m.sum() / n
        return f, g

    res: Any = optimize.minimize(  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 300}
    )
    theta = np.asarray(res.x, dtype=np.float64)  # pyright: ignore[reportUnknownMemberType]
    return theta[:d], float(theta[d])


def stratum_weights(y: F64, strata: Sequence[str]) -> F64:
    """Sample weights (n,) that give every (stratum, class) cell the same total weight, n / (2 · strata).

    With tasks as strata, a probe gains nothing by recognising the task: inside each task failures and
    successes weigh the same, so base-rate differences between tasks stop paying, and what the probe
    learns has to separate failures from successes *within* tasks (the part that transfers to a task it
    never saw). A task with one class only gives that class its task's full share.
    """
    t = np.asarray(y, dtype=np.float64) > 0
    s = np.asarray(strata)
    if s.shape != t.shape:
        raise InvalidInput(f"strata must have one entry per run ({t.size}), got {s.size}")
    names, inv = np.unique(s, return_inverse=True)
    cell = inv * 2 + t  # (n,) cell index: stratum, class
    count = np.bincount(cell, minlength=2 * names.size).astype(np.float64)
    per_stratum = count.reshape(-1, 2)
    classes = (per_stratum > 0).sum(axis=1)  # 1 or 2 per stratum
    share = t.size / names.size / classes  # (S,) weight of each present cell
    with np.errstate(divide="ignore", invalid="ignore"):
        w = share[inv] / count[cell]
    return w


def train_probe(X: F64, y: F64, l2: float, strata: Sequence[str] | None = None) -> LogisticModel:
    """A standardised L2 logistic probe on X (n, d); ``strata`` given: weighted by ``stratum_weights``
    (else the two classes are balanced over all runs)."""
    mean, scale = standardise(X)
    Z = np.nan_to_num((X - mean) / scale)
    w, b = fit_logistic(Z, y, l2, weights=None if strata is None else stratum_weights(y, strata))
    return LogisticModel(mean, scale, w, b, l2)


def group_folds(groups: Sequence[str], y: F64, folds: int, seed: int = 0) -> I64:
    """Fold index per run; whole groups go to one fold, groups dealt largest first to the fold with the
    fewest failures so far, then the fewest runs (balanced classes and sizes, deterministic for ``seed``)."""
    g = np.asarray(groups)
    t = np.asarray(y, dtype=np.float64)
    names, inv = np.unique(g, return_inverse=True)
    if names.size < folds:
        raise InvalidInput(f"need at least {folds} groups for {folds} folds, got {names.size}")
    size = np.bincount(inv)
    fails = np.bincount(inv, weights=t)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(names.size), -size))  # largest first, random among equals
    fold_of = np.empty(names.size, dtype=np.int64)
    f_fail = np.zeros(folds)
    f_size = np.zeros(folds)
    total_rate = t.mean() if t.size else 0.0
    for gi in order:
        # Keep each fold's failure rate near the overall one: put the group where it helps most.
        expected = (f_size + size[gi]) * total_rate
        gap = np.abs(f_fail + fails[gi] - expected)
        k = int(np.lexsort((np.arange(folds), f_size, gap))[0])
        fold_of[gi] = k
        f_fail[k] += fails[gi]
        f_size[k] += size[gi]
    return fold_of[inv]


def _pick_l2(
    X: F64, y: F64, groups: Sequence[str], grid: Sequence[float], seed: int, strata: Sequence[str] | None
) -> float:
    """The ridge strength with the best inner grouped 3-fold AUROC on these (training) rows (with
    ``strata``: the mean AUROC within strata, the quantity a stratum-weighted probe is trained for)."""
    if len(grid) == 1:
        return grid[0]
    try:
        inner = group_folds(groups, y, 3, seed + 1)
    except InvalidInput:
        return grid[len(grid) // 2]
    st = None if strata is None else np.asarray(strata)
    best, best_l2 = -math.inf, grid[len(grid) // 2]
    for l2 in grid:
        oof = np.empty(y.size)
        for k in range(3):
            te = inner == k
            if te.all() or not te.any():
                continue
            oof[te] = train_probe(X[~te], y[~te], l2, None if st is None else list(st[~te])).predict(X[te])
        a = auroc(oof, y) if st is None else within_task_auroc(oof, y, list(st), min_per_class=3)
        if math.isfinite(a) and a > best + 1e-9:
            best, best_l2 = a, l2
    return best_l2


def cross_val_scores(
    X: F64,
    y: F64,
    groups: Sequence[str],
    folds: int = 5,
    grid: Sequence[float] = L2_GRID,
    seed: int = 0,
    strata: Sequence[str] | None = None,
) -> F64:
    """Out-of-fold failure probabilities (n,) from grouped ``folds``-fold cross-validation; the ridge
    strength is chosen inside each training fold. ``strata``: train stratum-weighted (``train_probe``)."""
    return cross_val(X, y, groups, folds, grid, seed, strata)[0]


def cross_val(
    X: F64,
    y: F64,
    groups: Sequence[str],
    folds: int = 5,
    grid: Sequence[float] = L2_GRID,
    seed: int = 0,
    strata: Sequence[str] | None = None,
) -> tuple[F64, list[float]]:
    """``cross_val_scores`` plus the ridge strength each training fold chose."""
    A = np.asarray(X, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != y.shape[0]:
        raise InvalidInput(f"X must be (n, d) with n = {y.shape[0]}, got {A.shape}")
    return _held_out(A, y, group_folds(groups, y, folds, seed), groups, grid, seed, strata)


def _held_out(
    A: F64,
    y: F64,
    part: npt.NDArray[Any],
    groups: Sequence[str],
    grid: Sequence[float],
    seed: int,
    strata: Sequence[str] | None = None,
) -> tuple[F64, list[float]]:
    """Scores (n,) where the runs of each distinct ``part`` value are scored by a probe trained on all
    the other runs (ridge strength picked on those), plus the ridge strength each probe used."""
    g = np.asarray(groups)
    st = None if strata is None else np.asarray(strata)
    out = np.empty(y.size)
    chosen: list[float] = []
    for value in np.unique(part):
        te = part == value
        tr = ~te
        s_tr = None if st is None else list(st[tr])
        l2 = _pick_l2(A[tr], y[tr], list(g[tr]), grid, seed, s_tr)
        chosen.append(l2)
        out[te] = train_probe(A[tr], y[tr], l2, s_tr).predict(A[te])
    return out, chosen


def leave_one_task_out(
    X: F64,
    y: F64,
    tasks: Sequence[str],
    groups: Sequence[str],
    grid: Sequence[float] = L2_GRID,
    seed: int = 0,
    balance_tasks: bool = False,
) -> F64:
    """Scores (n,) where each task's runs are scored by a probe trained on every other task
    (``balance_tasks``: trained with the tasks as strata, ``stratum_weights``)."""
    A = np.asarray(X, dtype=np.float64)
    return _held_out(A, y, np.asarray(tasks), groups, grid, seed, tasks if balance_tasks else None)[0]
