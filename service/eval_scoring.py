"""``residue eval``, part 2: does residue predict the failures of a run folder better than output-only
signals? Scores, failure fingerprints, cross-run comparison and the generalization maps.

Every predictor is an input matrix (runs × columns) turned into out-of-fold failure probabilities by the
same protocol (``detectors.evaluation``): L2 logistic regression, ridge strength chosen inside the
training folds, grouped folds. One-column predictors (a single baseline, a detector score) go through
the same protocol, so their direction is learned on training folds, never read off the test labels.

Predictors, by kind:

* ``output``: the output-only baselines of the same generations (first-token entropy and top-1
  probability, mean token entropy, min / mean top-1 probability, log perplexity, log output length) one by
  one, and all of them together (``output.logit_stats``);
* ``internal``: ``internal.raw_probe``, the raw MLP inputs of layers 10/15/20 at the last prompt token
  (the strongest non-residue internal baseline in the literature and in FACTS-signals.md);
* ``residue``: the detector scores; the mean CLT error ratio; the shell fingerprints' scores;
  ``residue.prefill`` (per-layer CLT error, mass, L0, unreached share and attention aggregates at the last
  prompt token: what exists before the first token); ``residue.signature`` (the whole compact signature,
  its logit statistics included, plus the CLT features active in ≥ 5 % of runs: the headline, fixed
  before any result was seen); ``residue.internals`` (the same without any logit, length or output entry).

Guards against the field's traps: labels come only from the match rule on the output, and no input
column is computed from the answer text (label leakage); folds are grouped by template family /
subtask within a task, so near-duplicates never straddle a split (same-source leakage);
leave-one-task-out scores each task with probes that never saw it; within-task AUROC (mean of per-task
AUROCs) removes what base-rate differences between tasks add to a pooled AUROC; length-stratified AUROC
(mean AUROC within output-length quartiles) shows how much of a score is output length in disguise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from residue_monitor.detectors import evaluation as ev
from residue_monitor.detectors.compare import compare_runs
from residue_monitor.detectors.forecast import (
    ForecastConfig,
    PrefillForecast,
    fit_forecast,
    prefill_row,
    prefill_vector,
)
from residue_monitor.detectors.signature import ERROR_RATIO, ResidueSignature
from residue_monitor.service.evaluation import FAILURE_CLASSES, Runs
from residue_monitor.shells.fingerprint import (
    Fingerprint,
    FitConfig,
    compact_names,
    compact_vector,
    fit_fingerprint,
    prompt_feature_matrix,
)
from residue_monitor.shells.maps import (
    AlignmentMatrix,
    GeneralizationMap,
    alignment_values,
    draw_alignment_matrix,
    draw_generalization_map,
)

F64 = np.ndarray
HEADLINE = "residue.signature"
FORECAST = "forecast.prefill"
"""The prefill forecast trained task-balanced (residue + first-token logit statistics)."""
FORECAST_POOLED = "forecast.prefill_pooled"
"""The same inputs trained on the pooled mix."""
FORECAST_RESIDUE_ONLY = "forecast.prefill_residue_only"
"""Task-balanced, without the first-token logit statistics."""
FORECAST_CANDIDATES = (FORECAST, FORECAST_POOLED)
"""The variants the shipped forecast is chosen from (``forecast_choice``: rule fixed before the run)."""
POST_GENERATION = ("output.mean_token_entropy", "output.min_max_prob", "output.mean_max_prob",
                   "output.perplexity", "output.output_tokens", "output.logit_stats")  # fmt: skip
"""Output-only baselines that need the whole generation (the forecast's 'best post-generation')."""
BASELINE_COLUMNS = (
    "first_token_entropy",
    "first_token_max_prob",
    "mean_token_entropy",
    "min_max_prob",
    "mean_max_prob",
    "perplexity",
    "output_tokens",
)
_OUTPUT_ENTRIES = ("first.", "final.", "output_tokens_log", "empty_output", "detector.nullout")
"""Compact entries that read the output distribution or the output itself (left out of residue.internals)."""


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    folds: int = 5
    """Outer grouped cross-validation folds."""
    n_boot: int = 1000
    """Bootstrap resamples per confidence interval."""
    target_fpr: float = 0.05
    """False-positive rate the failure fingerprints and the flag threshold are calibrated for."""
    min_active: float = 0.05
    """CLT feature columns active in at least this share of runs enter the residue probes (no labels used;
    5 % keeps a few hundred columns of SmolLM2's 46,080, enough for a probe on a few thousand runs)."""
    fit_fraction: float = 0.7
    """Share of groups the failure fingerprints are fitted on (the rest measures them)."""
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Predictor:
    name: str
    kind: str
    """output | internal | residue"""
    X: F64
    """(n, d) inputs."""
    description: str
    balance_tasks: bool = False
    """Train task-balanced (``evaluation.stratum_weights``), as the prefill forecast is."""


# ---------------------------------------------------------------------------------------------- inputs
def _baseline_matrix(runs: Runs) -> F64:
    cols = []
    for name in BASELINE_COLUMNS:
        v = np.array([np.nan if (b := x["baselines"].get(name)) is None else b for x in runs.lines], float)
        if name == "perplexity":
            v = np.log(np.clip(v, 1e-12, None))
        if name == "output_tokens":
            v = np.log1p(v)
        cols.append(v)
    return np.stack(cols, axis=1)


def sparse_columns(
    sigs: Sequence[ResidueSignature], n_features: int, min_active: float
) -> tuple[F64, list[str]]:
    """log1p activations (n, m) at the last prompt token of the CLT features active in ≥ ``min_active`` of
    the runs, and their labels ``L{layer}/F{feature}`` (selection by activity only: no labels involved)."""
    dense = prompt_feature_matrix(sigs, n_features)  # (n, L·F)
    keep = np.flatnonzero((dense > 0).mean(axis=0) >= min_active)
    return np.log1p(dense[:, keep].astype(np.float64)), [
        f"L{c // n_features}/F{c % n_features}" for c in keep
    ]


def predictors(
    runs: Runs, n_features: int, shell_fps: Sequence[Fingerprint], cfg: ScoreConfig
) -> list[Predictor]:
    """Every predictor's input matrix, in report order."""
    base = _baseline_matrix(runs)
    out = [
        Predictor(f"output.{name}", "output", base[:, [i]], f"output-only baseline: {name}")
        for i, name in enumerate(BASELINE_COLUMNS)
    ]
    out.append(Predictor("output.logit_stats", "output", base, "all output-only baselines, one probe"))
    out.append(
        Predictor(
            "internal.raw_probe",
            "internal",
            runs.raw.reshape(len(runs.lines), -1).astype(np.float64),
            f"raw MLP inputs of layers {runs.config['config']['raw_layers']} at the last prompt token",
        )
    )
    compact = np.stack([compact_vector(s) for s in runs.sigs])
    names = compact_names(runs.sigs[0].n_layers)
    for d in ("attention", "errors", "nullout"):
        j = names.index(f"detector.{d}")
        out.append(
            Predictor(f"residue.detector.{d}", "residue", compact[:, [j]], f"the {d} detector's score")
        )
    err = np.stack([(s.row("prompt_last") or s.rows[0]).layer_stats[:, ERROR_RATIO] for s in runs.sigs])
    out.append(
        Predictor(
            "residue.error_ratio_mean",
            "residue",
            err.mean(axis=1, keepdims=True).astype(np.float64),
            "mean CLT reconstruction-error ratio over layers at the last prompt token",
        )
    )
    if shell_fps:
        fp = np.stack([[f.score(s, c) for f in shell_fps] for s, c in zip(runs.sigs, compact, strict=True)])
        out.append(Predictor("residue.shell_fingerprints", "residue", fp, "the shell fingerprints' scores"))
    prefill = [i for i, n in enumerate(names) if n.startswith("L")]
    out.append(
        Predictor(
            "residue.prefill",
            "residue",
            compact[:, prefill],
            "per-layer CLT and attention statistics at the last prompt token (before the first token)",
        )
    )
    rows = [prefill_row(s) for s in runs.sigs]
    for name, logits, balanced, what in (
        (FORECAST, True, True, "residue + first-token logit statistics, trained task-balanced"),
        (FORECAST_POOLED, True, False, "residue + first-token logit statistics, trained on the pooled mix"),
        (FORECAST_RESIDUE_ONLY, False, True, "residue only, trained task-balanced"),
    ):
        out.append(
            Predictor(
                name,
                "forecast",
                np.stack([prefill_vector(r, logits) for r in rows]),
                f"prefill forecast at the last prompt token: {what}",
                balance_tasks=balanced,
            )
        )
    sparse, _ = sparse_columns(runs.sigs, n_features, cfg.min_active)
    out.append(
        Predictor(
            HEADLINE,
            "residue",
            np.hstack([compact, sparse]),
            f"the compact signature + {sparse.shape[1]} CLT features active in ≥ {cfg.min_active:.0%} "
            "of runs",
        )
    )
    internals = [i for i, n in enumerate(names) if not n.startswith(_OUTPUT_ENTRIES)]
    out.append(
        Predictor(
            "residue.internals",
            "residue",
            np.hstack([compact[:, internals], sparse]),
            "residue.signature without any logit, length or output-derived entry",
        )
    )
    return out


# ---------------------------------------------------------------------------------------------- metrics
def _length_strata(runs: Runs) -> list[str]:
    n = np.array([x["output_tokens"] for x in runs.lines], dtype=float)
    q = np.quantile(n, [0.25, 0.5, 0.75])
    return [f"q{int(np.searchsorted(q, v, side='right'))}" for v in n]


def _r(v: float) -> float | None:
    return round(float(v), 4) if math.isfinite(v) else None


def _calibration(
    scores: F64, y: F64, groups: Sequence[str], fprs: Sequence[float], seed: int
) -> dict[str, Any]:
    """Flag thresholds calibrated (conformal) on one half of the groups' successes, measured on the other."""
    half = ev.group_folds(groups, y, 2, seed + 7)
    out: dict[str, Any] = {}
    for fpr in fprs:
        cal, test = half == 0, half == 1
        thr = ev.conformal_threshold(scores[cal & (y == 0)], fpr)
        flagged = scores >= thr
        out[f"{fpr:g}"] = {
            "threshold": _r(thr),
            "fpr_measured": _r(float(flagged[test & (y == 0)].mean())),
            "tpr_measured": _r(float(flagged[test & (y == 1)].mean())),
        }
    rel = ev.reliability(scores, y)
    out["ece"] = _r(rel.ece)
    out["reliability"] = {
        "edges": list(rel.edges),
        "count": list(rel.count),
        "predicted": [_r(v) for v in rel.predicted],
        "observed": [_r(v) for v in rel.observed],
    }
    return out


def evaluate_predictor(p: Predictor, runs: Runs, cfg: ScoreConfig) -> tuple[dict[str, Any], F64]:
    """Metrics of one predictor; also returns its out-of-fold scores."""
    y, tasks, groups = runs.y, runs.tasks, runs.groups
    strata = tasks if p.balance_tasks else None
    oof, chosen = ev.cross_val(p.X, y, groups, cfg.folds, seed=cfg.seed, strata=strata)
    # LOTO reuses the ridge strength the cross-validation's training folds chose most often (the median
    # of their choices): picked without any held-out task's labels, and 10× cheaper than a nested search.
    loto = ev.leave_one_task_out(
        p.X, y, tasks, groups, grid=(float(np.median(chosen)),), seed=cfg.seed, balance_tasks=p.balance_tasks
    )
    ci = ev.bootstrap_ci(ev.auroc, oof, y, cfg.n_boot, seed=cfg.seed)
    tpr_ci = ev.bootstrap_ci(lambda s, t: ev.tpr_at_fpr(s, t, 0.01), oof, y, cfg.n_boot, seed=cfg.seed)
    per_task = ev.per_task_auroc(oof, y, tasks)
    per_task_loto = ev.per_task_auroc(loto, y, tasks)
    return {
        "name": p.name,
        "kind": p.kind,
        "description": p.description,
        "inputs": int(p.X.shape[1]),
        "auroc": _r(ev.auroc(oof, y)),
        "auroc_ci": [_r(ci[0]), _r(ci[1])],
        "auprc": _r(ev.auprc(oof, y)),
        "tpr_at_1pct_fpr": _r(ev.tpr_at_fpr(oof, y, 0.01)),
        "tpr_at_1pct_fpr_ci": [_r(tpr_ci[0]), _r(tpr_ci[1])],
        "tpr_at_5pct_fpr": _r(ev.tpr_at_fpr(oof, y, 0.05)),
        "auroc_within_task": _r(ev.within_task_auroc(oof, y, tasks)),
        "auroc_length_stratified": _r(ev.within_task_auroc(oof, y, _length_strata(runs))),
        "auroc_loto": _r(ev.within_task_auroc(loto, y, tasks)),
        "auroc_loto_pooled": _r(ev.auroc(loto, y)),
        "per_task": {t: _r(v) for t, v in per_task.items()},
        "per_task_loto": {t: _r(v) for t, v in per_task_loto.items()},
        "calibration": _calibration(oof, y, groups, (0.01, 0.05), cfg.seed),
    }, oof


# ---------------------------------------------------------------------------------------------- fingerprints
def fit_split(groups: Sequence[str], fraction: float) -> np.ndarray:
    """(n,) True for runs whose group is in the fit split (a hash of the group name: stable, grouped)."""
    h = [int(hashlib.sha1(g.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for g in groups]
    return np.array(h) < fraction


def failure_fingerprints(
    runs: Runs, n_features: int, cfg: ScoreConfig
) -> tuple[list[Fingerprint], dict[str, Any], np.ndarray]:
    """One fingerprint per failure class (its failing runs vs succeeding runs of the fit split), calibrated
    to ``cfg.target_fpr`` on out-of-fold successes; measured on the held-out groups."""
    fit = fit_split(runs.groups, cfg.fit_fraction)
    classes = [x["failure_class"] for x in runs.lines]
    ok = [i for i, c in enumerate(classes) if c is None]
    fps: list[Fingerprint] = []
    table: dict[str, Any] = {}
    fit_cfg = FitConfig(target_fpr=cfg.target_fpr, seed=cfg.seed)
    for c in FAILURE_CLASSES:
        pos = [i for i, k in enumerate(classes) if k == c]
        p_fit = [runs.sigs[i] for i in pos if fit[i]]
        c_fit = [runs.sigs[i] for i in ok if fit[i]]
        if len(p_fit) < 10 or len(c_fit) < 10:
            table[c] = {"skipped": f"too few runs to fit ({len(p_fit)} failing, {len(c_fit)} succeeding)"}
            continue
        fp = fit_fingerprint(f"failure_{c}", c, p_fit, c_fit, n_features, fit_cfg)
        p_held = np.array([fp.score(runs.sigs[i]) for i in pos if not fit[i]])
        c_held = np.array([fp.score(runs.sigs[i]) for i in ok if not fit[i]])
        y = np.r_[np.ones(p_held.size), np.zeros(c_held.size)]
        s = np.r_[p_held, c_held]
        table[c] = {
            "fit_failing": len(p_fit),
            "fit_succeeding": len(c_fit),
            "heldout_failing": int(p_held.size),
            "heldout_succeeding": int(c_held.size),
            "threshold": _r(fp.threshold),
            "detection_rate": _r(float((p_held >= fp.threshold).mean())) if p_held.size else None,
            "fpr": _r(float((c_held >= fp.threshold).mean())) if c_held.size else None,
            "heldout_auroc": _r(ev.auroc(s, y)) if p_held.size and c_held.size else None,
            "sparse_features": fp.report["sparse_features"],
        }
        fps.append(fp)
    return fps, table, fit


# ---------------------------------------------------------------------------------------------- comparison
def cross_run_comparison(runs: Runs, n_features: int, top: int = 8) -> dict[str, Any]:
    """Per task: the CLT features and the compact residue statistics that separate failing from succeeding
    runs (rank-biserial effect size, Benjamini-Hochberg q-value), strongest first."""
    y = runs.y
    tasks = np.array(runs.tasks)
    feats = prompt_feature_matrix(runs.sigs, n_features)
    compact = np.stack([compact_vector(s) for s in runs.sigs])
    names = compact_names(runs.sigs[0].n_layers)
    out: dict[str, Any] = {}
    for t in sorted(set(runs.tasks)):
        m = tasks == t
        a, b = m & (y == 1), m & (y == 0)
        if a.sum() < 5 or b.sum() < 5:
            out[t] = {"skipped": f"{int(a.sum())} failing / {int(b.sum())} succeeding runs"}
            continue
        cf = compare_runs(feats[a], feats[b], alpha=0.05, min_active=0.05)
        cs = compare_runs(np.nan_to_num(compact[a]), np.nan_to_num(compact[b]), alpha=0.05, min_active=0.0)
        out[t] = {
            "failing": int(a.sum()),
            "succeeding": int(b.sum()),
            "features_tested": cf.tested,
            "features_significant": len(cf.significant()),
            "top_features": [
                {
                    "feature": f"L{d.key // n_features}/F{d.key % n_features}",
                    "effect": _r(d.effect_size),
                    "q": float(f"{d.q_value:.3g}"),
                }
                for d in cf.top(top, "both")
            ],
            "stats_significant": len(cs.significant()),
            "top_stats": [
                {"stat": names[d.key], "effect": _r(d.effect_size), "q": float(f"{d.q_value:.3g}")}
                for d in cs.top(top, "both")
            ],
        }
    return out


# ---------------------------------------------------------------------------------------------- maps
def generalization(runs: Runs, fps: Sequence[Fingerprint], heldout: np.ndarray) -> GeneralizationMap:
    """Every fingerprint's match rate on the failing held-out runs of every task, and on held-out
    successes (the last column: its false-positive rate)."""
    y = runs.y
    tasks = np.array(runs.tasks)
    cols = sorted(set(runs.tasks))
    rate = np.zeros((len(fps), len(cols) + 1))
    compact = [compact_vector(s) for s in runs.sigs]
    for i, fp in enumerate(fps):
        hit = np.array([fp.score(s, c) >= fp.threshold for s, c in zip(runs.sigs, compact, strict=True)])
        for j, t in enumerate(cols):
            m = heldout & (tasks == t) & (y == 1)
            rate[i, j] = hit[m].mean() if m.any() else 0.0
        ok = heldout & (y == 0)
        rate[i, -1] = hit[ok].mean() if ok.any() else 0.0
    return GeneralizationMap(tuple(fp.name for fp in fps), (*cols, "successes"), rate)


def alignment(
    runs: Runs, n_features: int, top: int = 30
) -> tuple[AlignmentMatrix | None, AlignmentMatrix | None]:
    """The feature alignment matrix (top features × failure groups, Cohen's d of each group's failing runs
    against all succeeding runs) and the shell ↔ real-failure similarity (correlation of those d vectors
    over the union of the groups' top features). Failure groups: the failing runs of each shell-generated
    task (``gen_*``: failures the shells' templates provoke) and each failure class on the other tasks."""
    y = runs.y
    feats = prompt_feature_matrix(runs.sigs, n_features).astype(np.float64)
    keep = np.flatnonzero((feats > 0).mean(axis=0) >= 0.01)
    feats = feats[:, keep]
    keys = [f"L{c // n_features}/F{c % n_features}" for c in keep]
    tasks = runs.tasks
    classes = [x["failure_class"] for x in runs.lines]
    groups: dict[str, np.ndarray] = {}
    for t in sorted({t for t in tasks if t.startswith("gen_")}):
        m = np.array([tt == t and yy == 1 for tt, yy in zip(tasks, y, strict=True)])
        if m.sum() >= 5:
            groups[t] = feats[m]
    shells = list(groups)
    for c in FAILURE_CLASSES:
        m = np.array([not tt.startswith("gen_") and cc == c for tt, cc in zip(tasks, classes, strict=True)])
        if m.sum() >= 5:
            groups[c] = feats[m]
    ctrl = feats[y == 0]
    if not groups or ctrl.shape[0] < 2 or not keys:
        return None, None
    matrix = alignment_values(groups, ctrl, keys, top=top)
    full = alignment_values(groups, ctrl, keys, top=min(10 * top, len(keys)))
    d = {name: full.values[:, j] for j, name in enumerate(full.shells)}
    real = [g for g in groups if g not in shells]
    if not shells or not real:
        return matrix, None
    sim = np.array([[float(np.corrcoef(d[s], d[r])[0, 1]) for r in real] for s in shells])
    return matrix, AlignmentMatrix(tuple(shells), tuple(real), np.nan_to_num(sim))


def draw_maps(
    gen: GeneralizationMap | None, align: AlignmentMatrix | None, sim: AlignmentMatrix | None, out: Path
) -> dict[str, str]:
    """The maps that could be computed, as PNG (+ JSON beside each); name → path."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    if gen is not None:
        paths["generalization_map"] = str(draw_generalization_map(gen, out / "eval-generalization-map.png"))
    if align is not None:
        paths["alignment_matrix"] = str(draw_alignment_matrix(align, out / "eval-alignment-matrix.png"))
    if sim is not None:
        paths["shell_failure_similarity"] = str(
            draw_alignment_matrix(sim, out / "eval-shell-failure-similarity.png")
        )
    return paths


def summary_keys(table: Mapping[str, Mapping[str, Any]], n: int, n_tasks: int) -> dict[str, Any]:
    """The headline keys of benchmarks/results/eval.json."""
    outputs = {k: v for k, v in table.items() if v["kind"] == "output"}
    best = max(outputs, key=lambda k: outputs[k]["auroc"] or 0.0)
    head = table[HEADLINE]
    return {
        "auroc_residue": head["auroc"],
        "auroc_residue_ci": head["auroc_ci"],
        "auroc_best_baseline": outputs[best]["auroc"],
        "best_baseline_name": best,
        "auroc_raw_probe": table["internal.raw_probe"]["auroc"],
        "auroc_loto_residue": head["auroc_loto"],
        "tpr_at_1pct_fpr_residue": head["tpr_at_1pct_fpr"],
        "tpr_at_1pct_fpr_best_baseline": outputs[best]["tpr_at_1pct_fpr"],
        "n_generations": n,
        "n_tasks": n_tasks,
    }


# ---------------------------------------------------------------------------------------------- forecast
def forecast_choice(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The forecast variant to ship: the higher leave-one-task-out AUROC of ``FORECAST_CANDIDATES``
    (transfer to unseen prompt types is what a live forecast needs most; ties go to the first)."""
    return max(FORECAST_CANDIDATES, key=lambda k: table[k]["auroc_loto"] or 0.0)


def forecast_artifact(
    runs: Runs, cfg: ScoreConfig, report: Mapping[str, Any], balance_tasks: bool = True
) -> PrefillForecast:
    """The prefill forecast the sidecar loads, fitted on every run (its held-out figures, measured by
    ``evaluate_predictor`` under grouped CV and leave-one-task-out, travel in its ``report``)."""
    conf = runs.config
    rows = [prefill_row(s) for s in runs.sigs]
    X = np.stack([prefill_vector(r, True) for r in rows])
    fcfg = ForecastConfig(
        with_logits=True,
        balance_tasks=balance_tasks,
        target_fpr=cfg.target_fpr,
        folds=cfg.folds,
        seed=cfg.seed,
    )
    return fit_forecast(
        X,
        runs.y,
        runs.tasks,
        runs.groups,
        model=str(conf["model"]),
        clt_id=str(conf["clt_id"]),
        n_layers=rows[0].n_layers,
        cfg=fcfg,
        report=report,
    )


def forecast_keys(table: Mapping[str, Mapping[str, Any]], n: int, n_tasks: int) -> dict[str, Any]:
    """The accuracy keys of benchmarks/results/prefill_forecast.json (latency comes from the benchmark),
    for the variant ``forecast_choice`` ships."""
    post = {k: table[k] for k in POST_GENERATION if k in table}
    best = max(post, key=lambda k: post[k]["auroc"] or 0.0)
    chosen = forecast_choice(table)
    f, fte = table[chosen], table["output.first_token_entropy"]
    return {
        "predictor": chosen,
        "auroc_prefill_forecast": f["auroc"],
        "auroc_prefill_forecast_ci": f["auroc_ci"],
        "auroc_prefill_forecast_task_balanced": table[FORECAST]["auroc"],
        "auroc_prefill_forecast_pooled": table[FORECAST_POOLED]["auroc"],
        "auroc_prefill_forecast_residue_only": table[FORECAST_RESIDUE_ONLY]["auroc"],
        "auroc_first_token_entropy": fte["auroc"],
        "auroc_best_post_generation": post[best]["auroc"],
        "best_post_generation_name": best,
        "auroc_loto_prefill_forecast": f["auroc_loto"],
        "auroc_loto_pooled_prefill_forecast": f["auroc_loto_pooled"],
        "auroc_within_task_prefill_forecast": f["auroc_within_task"],
        "auroc_within_task_first_token_entropy": fte["auroc_within_task"],
        "auroc_loto_first_token_entropy": fte["auroc_loto"],
        "tpr_at_1pct_fpr_prefill_forecast": f["tpr_at_1pct_fpr"],
        "tpr_at_1pct_fpr_first_token_entropy": fte["tpr_at_1pct_fpr"],
        "n_generations": n,
        "n_tasks": n_tasks,
    }


def abort_policy(
    scores: F64, runs: Runs, fprs: Sequence[float] = (0.01, 0.05), seed: int = 0
) -> dict[str, Any]:
    """What a gateway that aborts every request the forecast flags would do (examples/forecast_gateway.py),
    from out-of-fold forecasts: thresholds calibrated (conformal) on the successes of half the groups,
    measured on the other half. Per FPR: failures caught, correct answers lost, and output tokens saved
    (an abort when the forecast arrives, right after the first token, saves every later token)."""
    y = runs.y
    tokens = np.array([x["output_tokens"] for x in runs.lines], dtype=np.float64)
    half = ev.group_folds(runs.groups, y, 2, seed + 7)
    cal, test = half == 0, half == 1
    out: dict[str, Any] = {"measured_on_runs": int(test.sum())}
    for fpr in fprs:
        thr = ev.conformal_threshold(scores[cal & (y == 0)], fpr)
        flag = test & (scores >= thr)
        fail_t, ok_t = test & (y == 1), test & (y == 0)
        saved = float(np.clip(tokens[flag] - 1, 0, None).sum())
        out[f"{fpr:g}"] = {
            "threshold": _r(thr),
            "failures_caught": int((flag & fail_t).sum()),
            "failures": int(fail_t.sum()),
            "correct_answers_lost": int((flag & ok_t).sum()),
            "correct_answers": int(ok_t.sum()),
            "tokens_saved": int(saved),
            "output_tokens": int(tokens[test].sum()),
            "tokens_saved_share": _r(saved / max(float(tokens[test].sum()), 1.0)),
        }
    return out
