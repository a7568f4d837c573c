"""`residue eval` end to end on the tiny model: generate labelled items, resume an interrupted run, score
every predictor, fit failure fingerprints the sidecar can load, draw the maps and write the document.

Labels are planted so that something real can be learned: items of "answerable" templates get their own
greedy output as the accepted answer (right), items of the other templates an answer the model never
writes (wrong). The two template styles differ in their prompt text, so the model's internals see the
difference, and groups (templates) never straddle a fold, so a probe has to generalise to new templates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from residue_monitor.detectors import evaluation as ev
from residue_monitor.detectors.exceptions import ArtifactMismatch
from residue_monitor.detectors.forecast import load_forecast, prefill_row
from residue_monitor.detectors.request import analyze_prompt
from residue_monitor.service import evaluation
from residue_monitor.service.engine import Engine
from residue_monitor.service.eval_report import score_run, write_markdown
from residue_monitor.service.eval_scoring import (
    FORECAST,
    FORECAST_POOLED,
    FORECAST_RESIDUE_ONLY,
    HEADLINE,
    ScoreConfig,
)
from residue_monitor.service.evaluation import EvalConfig, generate_runs, load_runs
from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.scoring import default_scorers
from residue_monitor.shells.fingerprint import load_fingerprints
from residue_monitor.shells.match import normalize

CFG = EvalConfig(max_new_tokens=4, decode_every=2, raw_layers=(0, 1))
WORDS = ["river", "stone", "cloud", "apple", "lamp", "tiger", "maple", "ocean", "violin", "copper"]


def _items(engine: Engine, n_groups: int = 30, per_group: int = 5) -> list[dict[str, Any]]:
    """Items in 3 tasks; even groups are answerable (answer = the model's own output), odd ones not."""
    rng = random.Random(0)
    items = []
    for g in range(n_groups):
        task = ("gen_task", "real_a", "real_b")[g % 3]
        right = g % 2 == 0
        for j in range(per_group):
            prompt, out = "", None
            for _ in range(50):  # answerable: an output with words in it (some outputs are only symbols)
                words = " ".join(rng.choice(WORDS) for _ in range(6))
                prompt = f"{g} {j} {'1 2 3 4 5 6 7 8' if right else 'zebra yak xylophone wolf'} {words}"
                out = analyze_prompt(engine.model, engine.tok, engine.builder, prompt, CFG.generation(True))
                if not right or normalize(out.output_text):
                    break
            assert out is not None
            answer = out.output_text if right else "qqqq never said"
            items.append({"id": f"{task}-{g}-{j}", "task": task, "group": f"t{g}", "prompt": prompt,
                          "answers": [answer], "match": "contains", "chat": True})  # fmt: skip
    return items


@pytest.fixture(scope="module")
def run(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    items = _items(engine)
    out = tmp_path_factory.mktemp("eval-run")
    generate_runs(engine, items, out, CFG)
    return out, items


def test_runs_are_labelled_and_stored(run: tuple[Path, list[dict[str, Any]]]) -> None:
    """Every item has one line with an outcome by its match rule, a failure class, baselines, and a
    signature plus raw activations aligned with it."""
    out, items = run
    runs = load_runs(out)
    assert [x["id"] for x in runs.lines] == [it["id"] for it in items]
    assert len(runs.sigs) == len(items) and runs.raw.shape[:2] == (len(items), 2)
    by_id = {it["id"]: it for it in items}
    for line in runs.lines:
        answer = by_id[line["id"]]["answers"][0]
        right = not answer.startswith("qqqq") and bool(normalize(answer))  # symbols only: never matches
        assert (line["outcome"] == "right") == right or line["outcome"] == "null"
        assert (line["failure_class"] is None) == (line["outcome"] == "right")
        assert set(line["baselines"]) >= {"first_token_entropy", "mean_token_entropy", "perplexity"}
    assert 0.3 < runs.y.mean() < 0.7


def test_an_interrupted_run_resumes_from_its_last_complete_chunk(
    engine: Engine, run: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash mid-chunk loses only that chunk: the resumed run regenerates it and ends with the same
    lines and signatures as an uninterrupted run; another item set in the same folder is refused."""
    _, items = run
    items = items[:25]
    monkeypatch.setattr(evaluation, "CHUNK", 10)
    calls = {"n": 0}
    real = evaluation._run_one  # pyright: ignore[reportPrivateUsage]

    def crashing(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(evaluation, "_run_one", crashing)
    with pytest.raises(KeyboardInterrupt):
        generate_runs(engine, items, tmp_path, CFG)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 14
    monkeypatch.setattr(evaluation, "_run_one", real)
    generate_runs(engine, items, tmp_path, CFG)
    runs = load_runs(tmp_path)
    assert [x["id"] for x in runs.lines] == [it["id"] for it in items]
    with pytest.raises(ArtifactMismatch, match="other items"):
        generate_runs(engine, items[:5], tmp_path, CFG)


@pytest.fixture(scope="module")
def scored(run: tuple[Path, list[dict[str, Any]]]) -> tuple[Path, dict[str, Any]]:
    out, _ = run
    doc = score_run(out, out / "results", None, ScoreConfig(folds=4, n_boot=100))
    return out / "results", doc


def test_every_predictor_is_scored_with_intervals_and_the_planted_signal_is_found(
    scored: tuple[Path, dict[str, Any]],
) -> None:
    """Each predictor has AUROC inside its bootstrap interval, AUPRC, TPR at 1 % FPR, LOTO and calibration;
    the residue probe and the raw probe find the planted template signal in new groups."""
    _, doc = scored
    p = doc["predictors"]
    assert {HEADLINE, "residue.prefill", "internal.raw_probe", "output.logit_stats"} <= set(p)
    for name, r in p.items():
        lo, hi = r["auroc_ci"]
        assert lo <= r["auroc"] <= hi, name
        assert 0 <= r["tpr_at_1pct_fpr"] <= 1 and r["auprc"] is not None
        assert set(r["calibration"]) >= {"0.01", "0.05", "ece"}
    assert p[HEADLINE]["auroc"] > 0.8
    assert p["internal.raw_probe"]["auroc"] > 0.8
    assert doc["n_generations"] == 150 and doc["n_tasks"] == 3
    assert doc["auroc_residue"] == p[HEADLINE]["auroc"]
    assert doc["best_baseline_name"].startswith("output.")


def test_failure_fingerprints_load_in_the_sidecar(
    scored: tuple[Path, dict[str, Any]], engine: Engine
) -> None:
    """The wrong-answer fingerprint is fitted, calibrated and measured on held-out groups; the artifact
    loads with the CLT id check and the sidecar builds a scorer for it from RESIDUE_FINGERPRINTS."""
    results, doc = scored
    row = doc["failure_fingerprints"]["wrong_answer"]
    assert row["heldout_failing"] > 0 and row["heldout_succeeding"] > 0
    assert 0 <= row["fpr"] <= 1 and 0 <= row["detection_rate"] <= 1
    fps = load_fingerprints(results / "fingerprints-all.json", clt_id=engine.clt_id)
    assert "failure_wrong_answer" in {f.name for f in fps}
    scorers = default_scorers(ServerConfig(fingerprints_path=str(results / "fingerprints-all.json")))
    assert "failure_wrong_answer" in scorers.names()


def test_prefill_forecast_is_scored_and_its_artifact_matches_the_run(
    scored: tuple[Path, dict[str, Any]], engine: Engine, run: tuple[Path, list[dict[str, Any]]]
) -> None:
    """The forecast variants are scored beside first-token entropy; the shipped one is the variant with the
    higher leave-one-task-out AUROC; its artifact, fitted on the run, loads for this CLT only and gives
    each stored signature's prompt row a probability in [0, 1]."""
    results, doc = scored
    p = doc["predictors"]
    assert {FORECAST, FORECAST_POOLED, FORECAST_RESIDUE_ONLY, "output.first_token_entropy"} <= set(p)
    assert p[FORECAST]["inputs"] == p[FORECAST_POOLED]["inputs"] == 8 * engine.clt.n_layers + 4
    assert p[FORECAST_RESIDUE_ONLY]["inputs"] == 8 * engine.clt.n_layers
    f = doc["prefill_forecast"]
    chosen = f["predictor"]
    assert chosen == max((FORECAST, FORECAST_POOLED), key=lambda k: p[k]["auroc_loto"])
    assert f["auroc_prefill_forecast"] == p[chosen]["auroc"]
    assert f["auroc_first_token_entropy"] == p["output.first_token_entropy"]["auroc"]
    assert f["n_generations"] == 150 and f["best_post_generation_name"].startswith("output.")
    fc = load_forecast(results / f["artifact"], clt_id=engine.clt_id, n_layers=engine.clt.n_layers)
    assert fc.id == f["artifact_id"] and fc.with_logits
    assert fc.report["task_balanced"] == (chosen == FORECAST)
    with pytest.raises(ArtifactMismatch):
        load_forecast(results / f["artifact"], clt_id="another-clt")
    runs = load_runs(run[0])
    probs = np.array([fc.predict_row(prefill_row(s)) for s in runs.sigs])
    assert ((probs >= 0) & (probs <= 1)).all() and probs.std() > 0
    # Fitted on these runs with a planted signal: it ranks their failures above their successes.
    assert ev.auroc(probs, runs.y) > 0.7


def test_maps_comparison_and_document(scored: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The generalization map, alignment matrix and ROC plot are PNGs; the cross-run comparison covers
    every task; the markdown names every predictor and embeds every plot."""
    results, doc = scored
    for name in doc["plots"].values():
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gen = doc["generalization"]
    assert len(gen["match_rate"]) == len(gen["fingerprints"]) and gen["columns"][-1] == "successes"
    assert set(doc["cross_run_comparison"]) == {"gen_task", "real_a", "real_b"}
    assert doc["shell_failure_similarity"]["shells"] == ["gen_task"]
    md = write_markdown(doc, tmp_path / "EVALUATION.md").read_text()
    for name in doc["predictors"]:
        assert f"`{name}`" in md
    assert "## Prefill forecast" in md and doc["prefill_forecast"]["artifact_id"] in md
    for name in doc["plots"].values():
        assert f"eval/{name}" in md
    json.dumps(doc, allow_nan=False)
    assert np.isfinite(doc["auroc_residue"])


def test_item_files_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    """A prompt containing U+2028 (legal inside a JSON string, written raw with ensure_ascii=False) stays one
    item: str.splitlines() would have cut the line in two (seen in TriviaQA)."""
    from residue_monitor.service.evaldata import read_items

    item = {"id": "a", "task": "t", "prompt": "one\u2028two", "answers": ["x"], "match": "contains"}
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(item, ensure_ascii=False) + "\n")
    assert [it["prompt"] for it in read_items(path)] == ["one\u2028two"]
