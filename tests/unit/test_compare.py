"""Cross-run comparison: planted differences found, nulls not, BH applied, filters and inputs checked."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from residue_monitor.detectors.compare import compare_runs, feature_keys, feature_matrix
from residue_monitor.detectors.exceptions import InvalidInput

N_NULL, N_UP, N_DOWN = 500, 4, 2


def _sparse(rng: np.random.Generator, n: int, m: int, p_active: float, shift: float = 0.0) -> np.ndarray:
    """(n, m) sparse non-negative activations: active with probability p_active, Exp(1) + shift."""
    active = rng.random((n, m)) < p_active
    return np.where(active, rng.exponential(1.0, (n, m)) + shift, 0.0)


def _planted(seed: int = 0, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Columns [0, N_UP) higher in A, [N_UP, N_UP+N_DOWN) higher in B, the rest identically distributed."""
    rng = np.random.default_rng(seed)
    m = N_UP + N_DOWN + N_NULL
    a, b = _sparse(rng, n, m, 0.5), _sparse(rng, n, m, 0.5)
    a[:, :N_UP] = _sparse(rng, n, N_UP, 0.9, shift=2.0)
    b[:, N_UP : N_UP + N_DOWN] = _sparse(rng, n, N_DOWN, 0.9, shift=2.0)
    return a, b


def _pairwise_r(x: np.ndarray, y: np.ndarray) -> float:
    """Rank-biserial correlation by brute force: P(x > y) − P(x < y) over all pairs."""
    return float(np.sign(x[:, None] - y[None, :]).mean())


def _bh(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Benjamini-Hochberg by hand: q_(i) = min_{j >= i} p_(j) · m / j."""
    m = p.size
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q


def test_planted_differences_are_found_with_the_right_sign() -> None:
    """Planted columns are significant with the right sign and a large effect; nulls rarely are."""
    a, b = _planted()
    cmp = compare_runs(a, b)
    assert (cmp.n_a, cmp.n_b, cmp.alpha) == (40, 40, 0.05)
    by_key = {d.key: d for d in cmp.differences}
    for k in range(N_UP):
        d = by_key[k]
        assert d.q_value <= cmp.alpha
        assert d.effect_size > 0.5 and d.cohens_d > 0.5 and d.mean_a > d.mean_b
    for k in range(N_UP, N_UP + N_DOWN):
        d = by_key[k]
        assert d.q_value <= cmp.alpha
        assert d.effect_size < -0.5 and d.cohens_d < -0.5 and d.mean_a < d.mean_b
    false_discoveries = [d for d in cmp.significant() if d.key >= N_UP + N_DOWN]
    assert len(false_discoveries) <= 1  # of 500 nulls
    assert {d.key for d in cmp.top(N_UP, "a")} == set(range(N_UP))
    assert {d.key for d in cmp.top(10, "b")} == set(range(N_UP, N_UP + N_DOWN))


def test_statistics_match_brute_force_and_scipy_per_column() -> None:
    """Effect size = pairwise P(a>b) − P(a<b), d = pooled-SD Cohen's d, p = scipy on the single column."""
    a, b = _planted(seed=1, n=25)
    cmp = compare_runs(a, b)
    for d in cmp.differences[:3] + cmp.differences[-3:]:
        x, y = a[:, d.key], b[:, d.key]
        assert d.effect_size == pytest.approx(_pairwise_r(x, y))
        pooled = np.sqrt(
            ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
        )
        assert d.cohens_d == pytest.approx((x.mean() - y.mean()) / pooled)
        assert d.p_value == pytest.approx(stats.mannwhitneyu(x, y).pvalue)
        assert d.frac_active_a == pytest.approx((x > 0).mean())
        assert d.mean_b == pytest.approx(y.mean())


def test_differences_sorted_by_q_then_effect() -> None:
    """``differences`` is ordered by q-value, ties broken by larger |effect| first."""
    a, b = _planted()
    diffs = compare_runs(a, b).differences
    pairs = [(d.q_value, -abs(d.effect_size)) for d in diffs]
    assert pairs == sorted(pairs)


def test_benjamini_hochberg_matches_hand_computation() -> None:
    """q-values are BH over the tested columns: q ≥ p, and equal to a hand computation."""
    a = np.array([[5.0, 1.0, 3.0, 2.0], [6.0, 2.0, 1.0, 1.0], [7.0, 3.0, 2.0, 3.0], [8.0, 1.0, 4.0, 2.0]])
    b = np.array([[1.0, 2.0, 2.0, 2.0], [2.0, 1.0, 3.0, 1.0], [3.0, 3.0, 1.0, 3.0], [4.0, 2.0, 5.0, 1.0]])
    cmp = compare_runs(a, b, min_active=0.0)
    assert cmp.tested == 4
    p = np.array([d.p_value for d in sorted(cmp.differences, key=lambda d: d.key)])
    q = np.array([d.q_value for d in sorted(cmp.differences, key=lambda d: d.key)])
    np.testing.assert_allclose(q, _bh(p))
    assert (q >= p).all()
    # Column 0 separates completely (exact two-sided p = 2 / C(8, 4)); with 4 tests BH multiplies by 4 / 1.
    assert p[0] == pytest.approx(2 / 70)
    assert q[0] == pytest.approx(min(p[0] * 4, *(p[1:] * 4 / np.arange(2, 5))))


@pytest.mark.parametrize(("higher", "expected"), [("a", 1.0), ("b", -1.0)])
def test_complete_separation_gives_extreme_effect(higher: str, expected: float) -> None:
    """All of A above all of B gives effect +1; the reverse gives −1."""
    lo, hi = np.arange(1.0, 6.0)[:, None], np.arange(10.0, 15.0)[:, None]
    a, b = (hi, lo) if higher == "a" else (lo, hi)
    (d,) = compare_runs(a, b).differences
    assert d.effect_size == expected
    assert d.p_value == pytest.approx(2 / 252)  # exact test: 2 of C(10, 5) orderings are this extreme


def test_min_active_excludes_rare_columns() -> None:
    """Columns active in fewer than min_active of the rows of both groups are not tested."""
    rng = np.random.default_rng(3)
    a, b = _sparse(rng, 20, 6, 0.6), _sparse(rng, 20, 6, 0.6)
    a[:, 0], b[:, 0] = 0.0, 0.0
    a[0, 0] = 1.0  # active in 1/20 of A, 0/20 of B
    a[:, 1] = 0.0
    a[:3, 1] = 1.0  # active in 3/20 = 0.15 of A only: still tested at min_active=0.1
    b[:, 1] = 0.0
    keys = {d.key for d in compare_runs(a, b, min_active=0.1).differences}
    assert 0 not in keys and 1 in keys
    assert compare_runs(a, b, min_active=0.1).tested == 5
    assert compare_runs(a, b, min_active=0.2).tested == 4
    assert compare_runs(a, b, min_active=0.0).tested == 6


def test_min_active_zero_tests_every_non_constant_dense_column() -> None:
    """Dense statistics with min_active=0: every non-constant column is tested, constant ones never."""
    rng = np.random.default_rng(4)
    a, b = rng.random((10, 5)) + 1.0, rng.random((12, 5)) + 1.0
    a[:, 2], b[:, 2] = 7.0, 7.0  # constant over both groups: no rank information
    a[:, 4], b[:, 4] = 0.0, 0.0  # all zero
    cmp = compare_runs(a, b, min_active=0.0)
    assert cmp.tested == 3
    assert {d.key for d in cmp.differences} == {0, 1, 3}
    assert all(np.isfinite(d.p_value) for d in cmp.differences)


def test_nothing_testable_gives_an_empty_comparison() -> None:
    """All-zero inputs test nothing and report nothing (no NaN p-values, no crash)."""
    cmp = compare_runs(np.zeros((3, 4)), np.zeros((5, 4)))
    assert cmp.tested == 0 and cmp.differences == () and cmp.significant() == () and cmp.top(3) == ()


def test_keys_label_layer_and_feature() -> None:
    """With keys, layer/feature come from them; without, layer is −1 and feature is the column."""
    a, b = _planted(seed=2, n=10)
    keys = [(c // 100, c % 100) for c in range(a.shape[1])]
    for d in compare_runs(a, b, keys=keys).differences[:5]:
        assert (d.layer, d.feature) == keys[d.key]
    for d in compare_runs(a, b).differences[:5]:
        assert (d.layer, d.feature) == (-1, d.key)


def test_top_filters_by_direction_and_orders_by_strength() -> None:
    """top() returns only significant differences of the asked sign, strongest |effect| first, at most n."""
    a, b = _planted()
    cmp = compare_runs(a, b)
    both = cmp.top(100)
    assert set(both) == set(cmp.significant())
    strengths = [abs(d.effect_size) for d in both]
    assert strengths == sorted(strengths, reverse=True)
    assert all(d.effect_size > 0 for d in cmp.top(100, "a"))
    assert all(d.effect_size < 0 for d in cmp.top(100, "b"))
    assert len(cmp.top(2)) == 2 and cmp.top(0) == ()
    with pytest.raises(InvalidInput, match="direction"):
        cmp.top(1, "up")  # type: ignore[arg-type]


_OK = np.ones((3, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a": np.ones(4), "b": _OK}, "2-D"),
        ({"a": _OK, "b": np.ones((3, 5))}, "same number of columns"),
        ({"a": np.ones((1, 4)), "b": _OK}, "at least 2 rows"),
        ({"a": _OK, "b": np.full((3, 4), np.nan)}, "finite"),
        ({"a": _OK, "b": np.full((3, 4), np.inf)}, "finite"),
        ({"a": _OK, "b": _OK, "keys": [(0, 0)] * 3}, "keys"),
        ({"a": _OK, "b": _OK, "alpha": 0.0}, "alpha"),
        ({"a": _OK, "b": _OK, "alpha": 1.0}, "alpha"),
        ({"a": _OK, "b": _OK, "min_active": 1.5}, "min_active"),
    ],
)
def test_invalid_inputs_raise(kwargs: dict[str, Any], match: str) -> None:
    """Malformed inputs raise InvalidInput naming what was wrong."""
    with pytest.raises(InvalidInput, match=match):
        compare_runs(**kwargs)


def test_feature_matrix_round_trips_top_k_readouts() -> None:
    """Dense → per-layer top-k (ids, values) → feature_matrix gives the dense matrix back."""
    rng = np.random.default_rng(5)
    n_runs, L, F, k = 4, 3, 10, 4
    dense = _sparse(rng, n_runs, L * F, 0.25).astype(np.float32)  # (n_runs, L * F)
    per_layer = dense.reshape(n_runs, L, F)
    for r in range(n_runs):  # keep at most k active per layer so top-k is lossless
        for layer in range(L):
            row = per_layer[r, layer]
            row[np.argsort(-row)[k:]] = 0.0
    ids = [np.argsort(-per_layer[r], axis=1)[:, :k] for r in range(n_runs)]  # (L, k) each
    values = [np.take_along_axis(per_layer[r], ids[r], axis=1) for r in range(n_runs)]
    out = feature_matrix(ids, values, L, F)
    assert out.dtype == np.float32 and out.shape == (n_runs, L * F)
    np.testing.assert_array_equal(out, dense)
    keys = feature_keys(L, F)
    assert len(keys) == L * F and keys[2 * F + 7] == (2, 7)


def test_feature_matrix_ignores_empty_slots_and_keeps_the_max_of_duplicates() -> None:
    """A 0 value marks an empty slot (its id, even out of range, is ignored); duplicate ids keep the max."""
    ids = [np.array([[1, 1, 999], [0, 2, 2]])]
    values = [np.array([[0.5, 2.0, 0.0], [3.0, 1.0, 0.0]])]
    out = feature_matrix(ids, values, n_layers=2, n_features=3)
    np.testing.assert_array_equal(out, [[0.0, 2.0, 0.0, 3.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("ids", "values", "match"),
    [
        ([np.array([[0, 1]])], [np.array([[1.0, 1.0]])], r"\(2, k\)"),
        ([np.zeros((2, 2), int)], [np.ones((2, 3))], r"\(2, k\)"),
        ([np.array([[0, 5], [0, 1]])], [np.ones((2, 2))], "feature ids"),
        ([np.zeros((2, 2), int)], [-np.ones((2, 2))], ">= 0"),
        ([np.zeros((2, 2))], [np.ones((2, 2))], "integers"),
        ([np.zeros((2, 2), int)], [], "one entry per run"),
    ],
)
def test_feature_matrix_rejects_malformed_runs(ids: list[Any], values: list[Any], match: str) -> None:
    """Wrong shapes, out-of-range ids, negative values and non-integer ids raise InvalidInput."""
    with pytest.raises(InvalidInput, match=match):
        feature_matrix(ids, values, n_layers=2, n_features=3)
