"""The prefill forecast (detectors.forecast): task-balanced fitting, calibration, threshold, artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from residue_monitor.detectors import evaluation as ev
from residue_monitor.detectors import forecast as fc
from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput
from residue_monitor.detectors.signature import RowSignature

L = 3  # layers
D = len(fc.prefill_names(L, True))  # 8·3 + 4 = 28


def _planted(n_per_task: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Three tasks with base rates 0.2 / 0.5 / 0.8. Column 0 names the task (it predicts the base rate,
    nothing inside a task); column 1 carries a weak signal *within* every task; the rest is noise."""
    rng = np.random.default_rng(seed)
    X, y, tasks, groups = [], [], [], []
    for k, rate in enumerate((0.2, 0.5, 0.8)):
        t = (rng.random(n_per_task) < rate).astype(float)
        x = rng.normal(size=(n_per_task, D))
        x[:, 0] = k + 0.05 * rng.normal(size=n_per_task)
        x[:, 1] += 0.8 * t
        X.append(x)
        y.append(t)
        tasks += [f"task{k}"] * n_per_task
        groups += [f"task{k}/g{i % 30}" for i in range(n_per_task)]
    return np.vstack(X), np.concatenate(y), tasks, groups


def test_stratum_weights_equalise_every_task_and_class() -> None:
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 1.0])
    strata = ["a", "a", "a", "a", "b", "b", "b", "b", "b", "c"]
    w = ev.stratum_weights(y, strata)
    cells: dict[tuple[str, float], float] = {}
    for wi, yi, si in zip(w, y, strata, strict=True):
        cells[(si, yi)] = cells.get((si, yi), 0.0) + wi
    # Two-class strata: each class carries n / (2 · 3); the one-class stratum c carries its full n / 3.
    assert cells[("a", 1.0)] == pytest.approx(10 / 6) and cells[("a", 0.0)] == pytest.approx(10 / 6)
    assert cells[("b", 1.0)] == pytest.approx(10 / 6) and cells[("b", 0.0)] == pytest.approx(10 / 6)
    assert cells[("c", 1.0)] == pytest.approx(10 / 3)
    assert w.sum() == pytest.approx(y.size)
    with pytest.raises(InvalidInput, match="one entry per run"):
        ev.stratum_weights(y, strata[:-1])


def test_task_balanced_probe_ignores_the_task_and_keeps_the_within_task_signal() -> None:
    """Pooled training leans on the task column (it predicts base rates); task-balanced training does not,
    and still scores within a task it never saw."""
    X, y, tasks, groups = _planted()
    pooled = ev.train_probe(X, y, 10.0)
    balanced = ev.train_probe(X, y, 10.0, strata=tasks)
    assert abs(pooled.weights[0]) > 0.5
    assert abs(balanced.weights[0]) < 0.25 * abs(pooled.weights[0])
    assert balanced.weights[1] > 0.3
    loto_bal = ev.leave_one_task_out(X, y, tasks, groups, balance_tasks=True)
    assert ev.within_task_auroc(loto_bal, y, tasks) > 0.65


def test_fit_forecast_is_calibrated_and_its_threshold_holds_on_new_runs() -> None:
    X, y, tasks, groups = _planted(400, seed=1)
    model = fc.fit_forecast(X, y, tasks, groups, model="m", clt_id="c", n_layers=L)
    Xn, yn, _, _ = _planted(400, seed=2)
    p = model.probability(Xn)
    assert ((p >= 0) & (p <= 1)).all()
    # Calibrated on the training mix: the mean prediction matches the failure rate, and ECE is small.
    assert p.mean() == pytest.approx(yn.mean(), abs=0.05)
    assert ev.reliability(p, yn).ece < 0.08
    flagged = p >= model.threshold
    fpr = flagged[yn == 0].mean()
    assert fpr <= model.target_fpr + 0.04
    assert flagged[yn == 1].mean() > fpr  # it flags failures more often than successes
    assert model.report["n_runs"] == y.size and model.tasks == ("task0", "task1", "task2")


def _row(seed: int, n_layers: int = L) -> RowSignature:
    rng = np.random.default_rng(seed)
    stats = rng.random((n_layers, 6)).astype(np.float32)
    heads = rng.random((n_layers, 2, 7)).astype(np.float32)
    heads[..., 4] = 0
    heads[..., 5] = 1
    logits = rng.random(4).astype(np.float32)
    ids = np.zeros((n_layers, 4), np.int32)
    return RowSignature(10, "prompt_last", ids, np.zeros((n_layers, 4), np.float32), stats, heads, logits)


def test_prefill_vector_reads_the_row_in_name_order() -> None:
    row = _row(3)
    v = fc.prefill_vector(row, with_logits=True)
    names = fc.prefill_names(L, True)
    assert v.shape == (len(names),)
    assert v[names.index("L2.error_ratio")] == pytest.approx(float(row.layer_stats[2, 0]))
    assert v[names.index("L1.l0")] == pytest.approx(float(row.layer_stats[1, 1]))
    assert v[names.index("L0.head_entropy")] == pytest.approx(float(row.heads[0, :, 0].mean()))
    assert v[names.index("first.top1_prob")] == pytest.approx(float(row.logits[1]))
    assert fc.prefill_vector(row, with_logits=False).shape == (8 * L,)


def test_artifact_round_trip_id_and_refusals(tmp_path: Path) -> None:
    X, y, tasks, groups = _planted(200, seed=4)
    model = fc.fit_forecast(X, y, tasks, groups, model="m", clt_id="clt-a", n_layers=L)
    path = fc.save_forecast(tmp_path / "f.json", model)
    back = fc.load_forecast(path, clt_id="clt-a", n_layers=L)
    assert back.id == model.id and len(model.id) == 16
    row = _row(5)
    assert back.predict_row(row) == pytest.approx(model.predict_row(row))
    with pytest.raises(ArtifactMismatch, match=r"clt-a.*clt-b"):
        fc.load_forecast(path, clt_id="clt-b")
    with pytest.raises(ArtifactMismatch, match="layers"):
        fc.load_forecast(path, n_layers=L + 1)
    with pytest.raises(ArtifactMismatch, match="layers"):
        model.predict_row(_row(6, n_layers=L + 2))
    doc = json.loads(path.read_text())
    doc["weights"][0] += 1.0  # edited: no longer matches its id
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="does not match its id"):
        fc.load_forecast(tmp_path / "edited.json")
    doc["weights"] = doc["weights"][:-1]
    del doc["id"]
    (tmp_path / "short.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="entries"):
        fc.load_forecast(tmp_path / "short.json")
    (tmp_path / "junk.json").write_bytes(b"\xff\x00{")
    with pytest.raises(InvalidInput, match=r"junk\.json"):
        fc.load_forecast(tmp_path / "junk.json")
    with pytest.raises(InvalidInput, match="not a prefill forecast"):
        fc.PrefillForecast.from_dict({"format": 1, "kind": "fingerprint"})
    nan = dict(json.loads(path.read_text()), bias=math.nan)
    with pytest.raises(InvalidInput, match="non-finite"):
        fc.PrefillForecast.from_dict(nan)


def test_fit_forecast_refuses_one_class_and_wrong_width() -> None:
    X, y, tasks, groups = _planted(100)
    with pytest.raises(InvalidInput, match="both"):
        fc.fit_forecast(X, np.zeros_like(y), tasks, groups, model="m", clt_id="c", n_layers=L)
    with pytest.raises(InvalidInput, match="must be"):
        fc.fit_forecast(X[:, :-1], y, tasks, groups, model="m", clt_id="c", n_layers=L)
