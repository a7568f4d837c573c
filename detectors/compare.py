"""Cross-run comparison: which transcoder features separate failing runs from succeeding ones.

The papers compare runs of similar prompts that end differently (a shell that fires vs. a control
that does not, a failing vs. a succeeding answer) and ask which features are reliably more active in
one group. Per feature (column) this module reports:

- the rank-biserial correlation ``r = 2U / (n_a n_b) − 1`` from the Mann-Whitney U statistic of group A
  (``r = P(a > b) − P(a < b)``, in [−1, 1], positive = higher in A); rank based, so it suits the skewed,
  mostly-zero distributions of sparse features;
- Cohen's d with a pooled standard deviation, for readers used to it;
- the two-sided Mann-Whitney U p-value and its Benjamini-Hochberg q-value.

Testing 46,000 columns where most are almost never active would inflate the multiple-comparison burden
with hopeless tests, so columns active (value > 0) in fewer than ``min_active`` of the rows of *both*
groups are not tested, and neither are constant columns (no rank information). The BH correction runs
over the tested columns only, and every statistic is computed for all columns at once (no Python loop
per column): scipy's ``mannwhitneyu`` is vectorized along ``axis=0``.

``feature_matrix`` turns per-run top-k readouts ``(L, k)`` into the dense ``(n_runs, L * n_features)``
matrix the comparison takes, with column ``layer * n_features + feature``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats  # pyright: ignore[reportMissingTypeStubs]

from residue_monitor.detectors.exceptions import InvalidInput

Direction = Literal["a", "b", "both"]
DIRECTIONS: tuple[Direction, ...] = ("a", "b", "both")


@dataclass(frozen=True, slots=True)
class FeatureDifference:
    """How one feature (column) differs between group A and group B."""

    key: int
    """Column index in the input matrices."""
    layer: int
    """Layer from ``keys`` (−1 when no keys were given)."""
    feature: int
    """Feature id from ``keys`` (equal to ``key`` when no keys were given)."""
    mean_a: float
    """Mean activation in group A (e.g. failing / shell runs)."""
    mean_b: float
    """Mean activation in group B (e.g. succeeding / control runs)."""
    frac_active_a: float
    """Fraction of A rows where the value is > 0."""
    frac_active_b: float
    """Fraction of B rows where the value is > 0."""
    effect_size: float
    """Rank-biserial correlation ``2U / (n_a n_b) − 1`` in [−1, 1]; positive = higher in A."""
    cohens_d: float
    """``(mean_a − mean_b) / pooled SD`` (0 when both groups have zero spread)."""
    p_value: float
    """Two-sided Mann-Whitney U p-value."""
    q_value: float
    """Benjamini-Hochberg adjusted p-value over the tested columns."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """The result of :func:`compare_runs`: one :class:`FeatureDifference` per tested column."""

    n_a: int
    """Rows (runs) in group A."""
    n_b: int
    """Rows (runs) in group B."""
    tested: int
    """Columns actually tested (after the activity and constant-column filters)."""
    alpha: float
    """False-discovery rate that :meth:`significant` and :meth:`top` apply to the q-values."""
    differences: tuple[FeatureDifference, ...]
    """Every tested column, sorted by q-value, then by −|effect size|, then by key."""

    def significant(self) -> tuple[FeatureDifference, ...]:
        """The differences with ``q_value <= alpha``, in the order of :attr:`differences`."""
        return tuple(d for d in self.differences if d.q_value <= self.alpha)

    def top(self, n: int, direction: Direction = "both") -> tuple[FeatureDifference, ...]:
        """Up to ``n`` significant differences, strongest |effect size| first.

        ``direction`` keeps those higher in A (``"a"``, effect > 0), higher in B (``"b"``, effect < 0),
        or both signs (``"both"``).
        """
        if n < 0:
            raise InvalidInput(f"n must be >= 0, got {n}")
        if direction not in DIRECTIONS:
            raise InvalidInput(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        sig = self.significant()
        if direction == "a":
            sig = tuple(d for d in sig if d.effect_size > 0)
        elif direction == "b":
            sig = tuple(d for d in sig if d.effect_size < 0)
        ranked = sorted(sig, key=lambda d: (-abs(d.effect_size), d.q_value, d.key))
        return tuple(ranked[:n])


def _as_matrix(x: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    """``x`` as a finite 2-D float64 array; ``InvalidInput`` naming ``name`` otherwise."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{name} must be a numeric (n_runs, n_columns) array: {e}") from e
    if arr.ndim != 2:
        raise InvalidInput(f"{name} must be 2-D (n_runs, n_columns), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise InvalidInput(f"{name} needs at least 2 rows (runs), got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{name} must contain only finite values (found NaN or inf)")
    return arr


def _key_columns(keys: Sequence[tuple[int, int]] | None, m: int) -> tuple[npt.NDArray[np.int64], ...]:
    """``(layer, feature)`` per column, each (M,); ``(-1, column)`` when ``keys`` is None."""
    if keys is None:
        return np.full(m, -1, dtype=np.int64), np.arange(m, dtype=np.int64)
    if len(keys) != m:
        raise InvalidInput(
            f"keys must label every column: expected {m} (layer, feature) pairs, got {len(keys)}"
        )
    try:
        arr = np.asarray(keys, dtype=np.int64).reshape(m, 2) if m else np.zeros((0, 2), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"keys must be (layer, feature) integer pairs: {e}") from e
    return arr[:, 0], arr[:, 1]


def _mann_whitney(
    ta: npt.NDArray[np.float64], tb: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Two-sided Mann-Whitney U per column: (n_a, m), (n_b, m) → U of A (m,), p-value (m,).

    scipy's ``method="auto"`` picks exact vs. asymptotic once for the whole call (exact only when a group
    has ≤ 8 rows and *no column anywhere* has ties), which would make one column's p-value depend on the
    others. Here the choice is made per column: exact for tie-free columns of small groups, asymptotic
    (tie-corrected) otherwise, as a single-column call would do.
    """
    n_a, n_b = ta.shape[0], tb.shape[0]
    if n_a > 8 and n_b > 8:
        return _mwu(ta, tb, "asymptotic")
    pooled = np.sort(np.concatenate([ta, tb], axis=0), axis=0)  # (n_a + n_b, m)
    tied = (pooled[1:] == pooled[:-1]).any(axis=0)  # (m,)
    u_a, p = np.empty(ta.shape[1]), np.empty(ta.shape[1])
    methods: tuple[tuple[npt.NDArray[np.bool_], Literal["exact", "asymptotic"]], ...] = (
        (~tied, "exact"),
        (tied, "asymptotic"),
    )
    for mask, method in methods:
        if mask.any():
            u_a[mask], p[mask] = _mwu(ta[:, mask], tb[:, mask], method)
    return u_a, p


def _mwu(
    ta: npt.NDArray[np.float64], tb: npt.NDArray[np.float64], method: Literal["exact", "asymptotic"]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """One vectorized scipy call (scipy ships no type stubs, hence the ``Any``)."""
    res: Any = stats.mannwhitneyu(  # pyright: ignore[reportUnknownMemberType]
        ta, tb, alternative="two-sided", axis=0, method=method
    )
    return np.asarray(res.statistic, dtype=np.float64), np.asarray(res.pvalue, dtype=np.float64)


def compare_runs(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    keys: Sequence[tuple[int, int]] | None = None,
    alpha: float = 0.05,
    min_active: float = 0.1,
) -> Comparison:
    """Features that separate group A runs from group B runs.

    a: (n_a, M), b: (n_b, M) — rows are runs, columns features (0 = inactive). ``keys[i] = (layer,
    feature)`` labels column i. A column is tested when it is active (> 0) in at least ``min_active`` of
    the rows of A or of B, and not constant over all rows of both; with ``min_active=0`` (dense
    statistics) every non-constant column is tested. Raises ``InvalidInput`` on malformed inputs.
    """
    xa, xb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if xa.shape[1] != xb.shape[1]:
        raise InvalidInput(
            f"a and b must have the same number of columns, got {xa.shape[1]} and {xb.shape[1]}"
        )
    if not 0.0 < alpha < 1.0:
        raise InvalidInput(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 <= min_active <= 1.0:
        raise InvalidInput(f"min_active must be in [0, 1], got {min_active}")
    (n_a, m), n_b = xa.shape, xb.shape[0]
    layers, features = _key_columns(keys, m)

    # Filters on all columns first, so the heavy statistics only see the tested ones.
    frac_a = (xa > 0).mean(axis=0)  # (M,)
    frac_b = (xb > 0).mean(axis=0)  # (M,)
    first = xa[0]  # (M,)
    constant = (xa == first).all(axis=0) & (xb == first).all(axis=0)  # (M,)
    tested = ((frac_a >= min_active) | (frac_b >= min_active)) & ~constant  # (M,)
    cols = np.flatnonzero(tested)  # (m_t,)
    if cols.size == 0:
        return Comparison(n_a=n_a, n_b=n_b, tested=0, alpha=alpha, differences=())

    ta, tb = xa[:, cols], xb[:, cols]  # (n_a, m_t), (n_b, m_t)
    u_a, p = _mann_whitney(ta, tb)  # (m_t,) each
    q_raw: Any = stats.false_discovery_control(p, method="bh")  # pyright: ignore[reportUnknownMemberType]
    q = np.asarray(q_raw, dtype=np.float64)  # (m_t,)
    r = 2.0 * u_a / (n_a * n_b) - 1.0  # (m_t,)

    mean_a, mean_b = ta.mean(axis=0), tb.mean(axis=0)  # (m_t,)
    pooled_var = ((n_a - 1) * ta.var(axis=0, ddof=1) + (n_b - 1) * tb.var(axis=0, ddof=1)) / (
        n_a + n_b - 2
    )  # (m_t,)
    sd = np.sqrt(pooled_var)
    d = np.divide(mean_a - mean_b, sd, out=np.zeros_like(sd), where=sd > 0)  # (m_t,)

    order = np.lexsort((cols, -np.abs(r), q))  # last key is primary: q, then −|r|, then column
    fa, fb = frac_a[cols], frac_b[cols]
    diffs = tuple(
        FeatureDifference(
            key=int(cols[i]),
            layer=int(layers[cols[i]]),
            feature=int(features[cols[i]]),
            mean_a=float(mean_a[i]),
            mean_b=float(mean_b[i]),
            frac_active_a=float(fa[i]),
            frac_active_b=float(fb[i]),
            effect_size=float(r[i]),
            cohens_d=float(d[i]),
            p_value=float(p[i]),
            q_value=float(q[i]),
        )
        for i in order.tolist()
    )
    return Comparison(n_a=n_a, n_b=n_b, tested=int(cols.size), alpha=alpha, differences=diffs)


def feature_keys(n_layers: int, n_features: int) -> list[tuple[int, int]]:
    """``(layer, feature)`` for every column of :func:`feature_matrix`'s output, in column order."""
    if n_layers < 1 or n_features < 1:
        raise InvalidInput(f"n_layers and n_features must be >= 1, got {n_layers} and {n_features}")
    return [(layer, feature) for layer in range(n_layers) for feature in range(n_features)]


def feature_matrix(
    ids: Sequence[npt.ArrayLike], values: Sequence[npt.ArrayLike], n_layers: int, n_features: int
) -> npt.NDArray[np.float32]:
    """Per-run top-k readouts → the dense matrix :func:`compare_runs` takes.

    ``ids[r]`` (L, k) int feature ids and ``values[r]`` (L, k) activations of run r (k may differ between
    runs; a value of 0 marks an empty slot, whose id is ignored) → (n_runs, L * n_features) float32 with
    column ``layer * n_features + feature``. A feature listed twice in one run's layer keeps its largest
    value. Values must be non-negative (transcoder activations) and ids of filled slots in range.
    """
    if n_layers < 1 or n_features < 1:
        raise InvalidInput(f"n_layers and n_features must be >= 1, got {n_layers} and {n_features}")
    if len(ids) != len(values):
        raise InvalidInput(f"ids and values must have one entry per run, got {len(ids)} and {len(values)}")
    out = np.zeros((len(ids), n_layers * n_features), dtype=np.float32)  # (n_runs, L * F)
    for r, (run_ids, run_values) in enumerate(zip(ids, values, strict=True)):
        i = np.asarray(run_ids)
        v = np.asarray(run_values, dtype=np.float32)
        if i.ndim != 2 or i.shape[0] != n_layers or v.shape != i.shape:
            raise InvalidInput(
                f"run {r}: ids and values must both be ({n_layers}, k), got {i.shape} and {v.shape}"
            )
        if not np.issubdtype(i.dtype, np.integer):
            raise InvalidInput(f"run {r}: ids must be integers, got dtype {i.dtype}")
        if not np.isfinite(v).all() or (v < 0).any():
            raise InvalidInput(f"run {r}: values must be finite and >= 0")
        layer, slot = np.nonzero(v)  # filled slots, (n_filled,) each
        feat = i[layer, slot].astype(np.int64)
        if feat.size and (feat.min() < 0 or feat.max() >= n_features):
            raise InvalidInput(
                f"run {r}: feature ids must be in [0, {n_features}), got {feat.min()}..{feat.max()}"
            )
        # ufunc.at so that duplicate ids within a layer keep the maximum instead of the last write.
        np.maximum.at(out[r], layer * n_features + feat, v[layer, slot])
    return out
