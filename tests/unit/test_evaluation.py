"""Failure-prediction metrics and the grouped probe protocol (detectors.evaluation), against brute-force
definitions and planted signals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from residue_monitor.detectors import evaluation as ev
from residue_monitor.detectors.exceptions import InvalidInput


def _brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg))
    return wins / (pos.size * neg.size)


def _brute_ap(s: np.ndarray, y: np.ndarray) -> float:
    # Σ over distinct thresholds t (descending) of (recall(t) − recall(prev)) · precision(t)
    ap, prev = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = float((pred & (y == 1)).sum())
        rec = tp / y.sum()
        ap += (rec - prev) * tp / pred.sum()
        prev = rec
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_auprc_match_brute_force_with_ties(seed: int) -> None:
    """AUROC counts ties half and AUPRC is the step-wise average precision, on data with many ties."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, 80).astype(float)
    y = (rng.random(80) < 0.3).astype(float)
    assert ev.auroc(s, y) == pytest.approx(_brute_auroc(s, y))
    assert ev.auprc(s, y) == pytest.approx(_brute_ap(s, y))


def test_auroc_edges() -> None:
    """Perfect, reversed and single-class inputs; mismatched or non-finite input is a named error."""
    y = np.array([0, 0, 1, 1.0])
    assert ev.auroc(np.array([0, 1, 2, 3.0]), y) == 1.0
    assert ev.auroc(np.array([3, 2, 1, 0.0]), y) == 0.0
    assert math.isnan(ev.auroc(np.array([1, 2.0]), np.array([1, 1.0])))
    with pytest.raises(InvalidInput, match="length"):
        ev.auroc(np.zeros(3), np.zeros(2))
    with pytest.raises(InvalidInput, match="finite"):
        ev.auroc(np.array([np.nan, 1.0]), np.array([0, 1.0]))
    with pytest.raises(InvalidInput, match="0 \\(success\\) or 1"):
        ev.auroc(np.array([0, 1.0]), np.array([0, 2.0]))


def test_tpr_at_fpr_keeps_the_false_positive_budget() -> None:
    """At 1 % FPR over 200 negatives at most 2 negatives may reach the threshold; ties at the cut count
    as positives, so a threshold never sits inside a tie that would break the budget."""
    neg = np.arange(200, dtype=float)  # 0..199
    pos = np.array([198.5, 197.0, 150.0, 300.0])
    s = np.r_[neg, pos]
    y = np.r_[np.zeros(200), np.ones(4)]
    # 2 negatives allowed (198, 199): threshold just above 197 → positives 198.5 and 300 pass.
    assert ev.tpr_at_fpr(s, y, 0.01) == pytest.approx(0.5)
    # Empirical FPR at the chosen threshold is within budget for random data.
    rng = np.random.default_rng(1)
    s = rng.normal(size=500)
    y = (rng.random(500) < 0.4).astype(float)
    s[y == 1] += 1
    for fpr in (0.01, 0.05, 0.2):
        tpr = ev.tpr_at_fpr(s, y, fpr)
        neg_s = np.sort(s[y == 0])[::-1]
        thr = neg_s[math.floor(fpr * neg_s.size)]
        assert ((s[y == 0] > thr).mean()) <= fpr
        assert tpr == pytest.approx((s[y == 1] > thr).mean())


def test_conformal_threshold_certifies_fpr() -> None:
    """Over many calibration/test draws the share of new negatives at or above the threshold is ≤ α."""
    rng = np.random.default_rng(0)
    hits = [
        float((rng.normal(size=1000) >= ev.conformal_threshold(rng.normal(size=300), 0.05)).mean())
        for _ in range(50)
    ]
    assert np.mean(hits) <= 0.05 + 0.01
    assert ev.conformal_threshold(np.zeros(5), 0.01) == math.inf


def test_bootstrap_ci_brackets_the_estimate_and_is_deterministic() -> None:
    """The 95 % interval contains the point estimate, narrows with more data, and repeats for one seed."""
    rng = np.random.default_rng(2)

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.5).astype(float)
        return rng.normal(size=n) + y, y

    s, y = data(200)
    lo, hi = ev.bootstrap_ci(ev.auroc, s, y, n_boot=300)
    assert lo <= ev.auroc(s, y) <= hi
    assert (lo, hi) == ev.bootstrap_ci(ev.auroc, s, y, n_boot=300)
    s2, y2 = data(2000)
    lo2, hi2 = ev.bootstrap_ci(ev.auroc, s2, y2, n_boot=300)
    assert hi2 - lo2 < hi - lo


def test_within_task_auroc_ignores_base_rate_differences() -> None:
    """A score that only knows the task (task A fails 90 %, task B 10 %) has a high pooled AUROC but a
    within-task AUROC of 0.5; tasks with too few runs of a class are left out."""
    rng = np.random.default_rng(3)
    n = 400
    tasks = ["a"] * n + ["b"] * n + ["tiny"] * 5
    y = np.r_[(rng.random(n) < 0.9), (rng.random(n) < 0.1), np.ones(5)].astype(float)
    s = np.r_[np.ones(n), np.zeros(n), np.ones(5)]
    assert ev.auroc(s, y) > 0.85
    per = ev.per_task_auroc(s, y, tasks)
    assert per["a"] == pytest.approx(0.5) and per["b"] == pytest.approx(0.5) and math.isnan(per["tiny"])
    assert ev.within_task_auroc(s, y, tasks) == pytest.approx(0.5)


def test_reliability_table() -> None:
    """Calibrated probabilities give a small ECE; constant over-confident ones a large, exact ECE."""
    rng = np.random.default_rng(4)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    assert ev.reliability(p, y).ece < 0.02
    r = ev.reliability(np.full(100, 0.95), np.r_[np.ones(50), np.zeros(50)])
    assert r.ece == pytest.approx(0.45)
    assert sum(r.count) == 100
    with pytest.raises(InvalidInput, match="\\[0, 1\\]"):
        ev.reliability(np.array([1.5]), np.array([1.0]))


def test_fit_logistic_matches_the_newton_solution() -> None:
    """L-BFGS reaches the same minimiser as the fingerprints' Newton solver for the same objective."""
    from residue_monitor.shells.fingerprint import _fit_logistic  # pyright: ignore[reportPrivateUsage]

    rng = np.random.default_rng(5)
    Z = rng.normal(size=(300, 6))
    y = (Z @ np.array([1.0, -2, 0, 0.5, 0, 0]) + rng.normal(size=300) > 0.5).astype(float)
    w1, b1 = ev.fit_logistic(Z, y, 3.0)
    w2, b2 = _fit_logistic(Z, y, 3.0)
    np.testing.assert_allclose(w1, w2, atol=1e-3)
    assert b1 == pytest.approx(b2, abs=1e-3)


def test_group_folds_keep_groups_together_and_balance_failures() -> None:
    """Every group sits in exactly one fold; folds have similar failure rates; too few groups is an error."""
    rng = np.random.default_rng(6)
    groups = [f"g{i % 40}" for i in range(600)]
    y = (rng.random(600) < 0.3).astype(float)
    fold = ev.group_folds(groups, y, 5)
    for g in set(groups):
        assert len({int(f) for f, gg in zip(fold, groups, strict=True) if gg == g}) == 1
    rates = [y[fold == k].mean() for k in range(5)]
    assert max(rates) - min(rates) < 0.1
    with pytest.raises(InvalidInput, match="groups"):
        ev.group_folds(["a", "b"], np.array([0, 1.0]), 5)


def test_cross_validation_finds_a_planted_signal_and_not_noise() -> None:
    """Out-of-fold AUROC is high for a planted linear signal and ≈ 0.5 for pure noise (no leakage)."""
    rng = np.random.default_rng(7)
    n, d = 600, 40
    X = rng.normal(size=(n, d))
    groups = [f"g{i}" for i in range(n)]
    y = (X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=n) > 0).astype(float)
    assert ev.auroc(ev.cross_val_scores(X, y, groups), y) > 0.9
    noise_y = (rng.random(n) < 0.5).astype(float)
    a = ev.auroc(ev.cross_val_scores(X, noise_y, groups), noise_y)
    assert 0.4 < a < 0.6


def test_grouped_folds_stop_duplicate_leakage() -> None:
    """Runs duplicated within a group with random labels per group: grouped CV stays near 0.5, while a
    split that ignores the groups would memorise the duplicates."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(300, 400))
    X = np.repeat(base, 4, axis=0) + 0.01 * rng.normal(size=(1200, 400))
    y = np.repeat((rng.random(300) < 0.5).astype(float), 4)
    grouped = ev.auroc(ev.cross_val_scores(X, y, [f"g{i // 4}" for i in range(1200)], grid=(0.01,)), y)
    leaky = ev.auroc(ev.cross_val_scores(X, y, [f"r{i}" for i in range(1200)], grid=(0.01,)), y)
    assert grouped < 0.6
    assert leaky > 0.75


def test_leave_one_task_out_scores_each_task_with_a_model_that_never_saw_it() -> None:
    """A signal shared by all tasks transfers; a signal that exists only in one task cannot be learned
    for that task when it is held out."""
    rng = np.random.default_rng(9)
    tasks = [t for t in "abcd" for _ in range(300)]
    X = rng.normal(size=(1200, 5))
    y = (X[:, 0] + 0.3 * rng.normal(size=1200) > 0).astype(float)
    d_only = np.array([t == "d" for t in tasks])
    y[d_only] = (X[d_only, 3] > 0).astype(float)  # task d follows another column
    s = ev.leave_one_task_out(X, y, tasks, [str(i) for i in range(1200)])
    per = ev.per_task_auroc(s, y, tasks)
    assert min(per["a"], per["b"], per["c"]) > 0.85
    assert per["d"] < 0.65
