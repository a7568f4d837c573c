"""The residue engine's offline jobs on the tiny model and a random transcoder: ``run_shells`` (signatures,
fingerprints, report), ``draw_maps``, and the fingerprint maths on hand-built signatures (no model).

One ``run_shells`` call (6 instances per shell, 36 controls, 4 new tokens) is shared by the module: it
is the expensive part (~20 s on two cores). RESIDUE_HOME points at the session's temp home throughout,
so nothing touches the real cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput, NotFound
from residue_monitor.detectors.request import GenerationConfig
from residue_monitor.detectors.signature import ResidueSignature, load_signatures
from residue_monitor.service.engine import Engine, draw_maps, run_shells
from residue_monitor.shells.catalog import CONTROLS_ID, ShellInstance, load_controls, load_shells
from residue_monitor.shells.fingerprint import (
    FORMAT_VERSION,
    Fingerprint,
    FitConfig,
    conformal_threshold,
    fit_fingerprint,
    load_fingerprints,
    rates,
)
from tests.integration.residue_data import N_FEATURES, family

GEN = GenerationConfig(max_new_tokens=4, decode_every=2)
LIMIT = 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ShellRun:
    engine: Engine
    out: Path
    report: dict[str, Any]
    shells: dict[str, list[ShellInstance]]
    """The instances the run kept, by shell id (the first LIMIT of each)."""
    controls: list[ShellInstance]
    """The controls it kept (the first 6·LIMIT)."""


@pytest.fixture(scope="module")
def shell_run(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> ShellRun:
    """The module's one ``run_shells`` call."""
    out = tmp_path_factory.mktemp("shells-run")
    # publish=False: the session-wide tiny home is shared; a published file would make other tests (e.g.
    # `residue analyze` expecting no fingerprints for this CLT) depend on the order tests run in.
    report = run_shells(engine, out, GEN, limit=LIMIT, publish=False)
    shells = {spec.id: list(spec.instances[:LIMIT]) for spec in load_shells()}
    return ShellRun(engine, out, report, shells, list(load_controls()[: 6 * LIMIT]))


# ---------------------------------------------------------------------------------------------- run_shells
def test_run_shells_writes_the_run_folder_and_report(shell_run: ShellRun) -> None:
    """A quick run writes its four files; the report (also on disk) has the headline rates, one row per
    shell with rates in [0, 1] and non-empty held-out sets, and a fingerprints × (shells + controls)
    generalization matrix."""
    out, report = shell_run.out, shell_run.report
    for name in ("signatures.npz", "fingerprints.json", "report.json", "outputs.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == report
    shells = sorted(shell_run.shells)
    assert len(shells) == 6
    assert report["clt_id"] == shell_run.engine.clt_id
    assert report["model"] == shell_run.engine.prepared.name
    assert sorted(report["per_shell"]) == shells
    for sid, row in report["per_shell"].items():
        assert 0.0 <= row["detection_rate"] <= 1.0, sid
        assert 0.0 <= row["fpr"] <= 1.0, sid
        assert row["heldout_positives"] > 0 and row["heldout_controls"] > 0, sid
    per = report["per_shell"].values()
    assert report["min_detection_rate"] == min(r["detection_rate"] for r in per)
    assert report["max_fpr"] == max(r["fpr"] for r in per)
    g = report["generalization"]
    assert g["fingerprints"] == shells
    assert g["families"] == [*shells, CONTROLS_ID]
    rate = np.array(g["match_rate"], dtype=float)
    assert rate.shape == (len(shells), len(shells) + 1)
    assert ((rate >= 0) & (rate <= 1)).all()
    lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(lines) == 6 * LIMIT + 6 * LIMIT
    assert {x["family"] for x in lines} == {*shells, CONTROLS_ID}
    assert all(set(x["detectors"]) == {"attention", "errors", "nullout"} for x in lines)


def test_fingerprints_artifact_is_bound_to_its_clt(shell_run: ShellRun) -> None:
    """fingerprints.json reloads for the run's CLT id (one per shell, thresholds as reported) and raises
    ArtifactMismatch, naming both ids, when asked for another CLT."""
    path = shell_run.out / "fingerprints.json"
    clt_id = shell_run.engine.clt_id
    fps = load_fingerprints(path, clt_id=clt_id)
    assert sorted(fp.name for fp in fps) == sorted(shell_run.shells)
    for fp in fps:
        assert fp.clt_id == clt_id and fp.model == shell_run.engine.prepared.name
        reported = shell_run.report["per_shell"][fp.name]["threshold"]
        assert (fp.threshold if math.isfinite(fp.threshold) else None) == reported
    with pytest.raises(ArtifactMismatch) as ei:
        load_fingerprints(path, clt_id="other")
    assert "other" in str(ei.value) and clt_id in str(ei.value)


def test_signatures_round_trip_and_equal_a_fresh_analysis(shell_run: ShellRun) -> None:
    """signatures.npz holds every prompt of the run, and a stored signature has exactly the arrays a fresh
    analysis of the same prompt gives (greedy decoding and the encoder are deterministic)."""
    sigs = load_signatures(shell_run.out / "signatures.npz")
    kept = [i for ms in shell_run.shells.values() for i in ms] + shell_run.controls
    assert sorted(sigs) == sorted(i.id for i in kept)
    inst = shell_run.shells["v1_memtrace"][0]
    fresh = shell_run.engine.analyze(inst.prompt, replace(GEN, chat=inst.chat)).signature
    _assert_same_signature(sigs[inst.id], fresh)


def _assert_same_signature(a: ResidueSignature, b: ResidueSignature) -> None:
    head = ("model", "clt_id", "prompt_tokens", "output_tokens", "empty_output", "stopped")
    assert [getattr(a, f) for f in head] == [getattr(b, f) for f in head]
    assert [(r.position, r.phase) for r in a.rows] == [(r.position, r.phase) for r in b.rows]
    for ra, rb in zip(a.rows, b.rows, strict=True):
        for f in ("feature_ids", "feature_values", "layer_stats", "heads", "logits"):
            np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f), err_msg=f)


def test_outcomes_and_a_refit_from_the_run_folder(shell_run: ShellRun) -> None:
    """outputs.jsonl records each scored instance's outcome (right/wrong/null by its match rule), the
    report counts them per family, and rerun_report rebuilds the same per-shell table from the folder
    alone (the fit is deterministic; no model needed)."""
    from residue_monitor.service.engine import rerun_report
    from residue_monitor.shells.match import outcome

    lines = [json.loads(x) for x in (shell_run.out / "outputs.jsonl").read_text().splitlines()]
    kept = {i.id: i for insts in shell_run.shells.values() for i in insts} | {
        c.id: c for c in shell_run.controls
    }
    for line in lines:
        inst = kept[line["id"]]
        expect = outcome(line["output"], inst.answers, inst.match) if inst.answers else None
        assert line["outcome"] == expect
    provoked = shell_run.report["provoked"]
    for fam, row in provoked.items():
        scored = [x for x in lines if x["family"] == fam and x["outcome"] is not None]
        assert row["scored"] == len(scored) == row["right"] + row["wrong"] + row["null"]
        assert row["failure_rate"] == pytest.approx((row["wrong"] + row["null"]) / row["scored"])
    again = rerun_report(shell_run.out)
    assert again["per_shell"] == shell_run.report["per_shell"]
    assert again["provoked"] == provoked


def test_fit_never_sees_held_out_instances(shell_run: ShellRun) -> None:
    """Each shell's fingerprint is fitted on exactly the fit-split instances and controls the run kept:
    the report's fit / held-out counts match the catalogue's splits, and refitting on the fit split alone
    (from the stored signatures) reproduces the saved fingerprint."""
    sigs = load_signatures(shell_run.out / "signatures.npz")
    c_fit = [sigs[c.id] for c in shell_run.controls if c.split == "fit"]
    n_c_held = sum(c.split == "heldout" for c in shell_run.controls)
    saved = {fp.name: fp for fp in load_fingerprints(shell_run.out / "fingerprints.json")}
    for sid, members in shell_run.shells.items():
        row = shell_run.report["per_shell"][sid]
        p_fit = [sigs[m.id] for m in members if m.split == "fit"]
        assert row["fit_positives"] == len(p_fit)
        assert row["heldout_positives"] == len(members) - len(p_fit)
        assert (row["fit_controls"], row["heldout_controls"]) == (len(c_fit), n_c_held)
        refit = fit_fingerprint(sid, sid, p_fit, c_fit, shell_run.engine.clt.cfg.n_features, FitConfig())
        fp = saved[sid]
        assert refit.sparse_keys == fp.sparse_keys, sid
        np.testing.assert_allclose(refit.weights, fp.weights, rtol=1e-12, atol=0, err_msg=sid)
        assert refit.threshold == fp.threshold, sid


# ---------------------------------------------------------------------------------------------- maps
def test_draw_maps_writes_every_map(shell_run: ShellRun, tmp_path: Path) -> None:
    """``draw_maps`` writes one trace map per shell, the alignment matrix and the generalization map, each
    a PNG with its JSON; the generalization JSON carries the report's fingerprints and families."""
    paths = draw_maps(shell_run.engine, shell_run.out, tmp_path / "maps")
    expected = {f"trace-{sid}.png" for sid in shell_run.shells}
    expected |= {"alignment-matrix.png", "generalization-map.png"}
    assert {p.name for p in paths} == expected and len(paths) == len(expected)
    kinds = {}
    for p in paths:
        assert p.read_bytes()[:8] == PNG_SIGNATURE, p
        doc = json.loads(p.with_suffix(".json").read_text())
        kinds[p.name] = doc["kind"]
    assert kinds["alignment-matrix.png"] == "alignment_matrix"
    assert sorted(n for n, k in kinds.items() if k == "trace_map") == sorted(
        f"trace-{sid}.png" for sid in shell_run.shells
    )
    gen = json.loads((tmp_path / "maps" / "generalization-map.json").read_text())
    g = shell_run.report["generalization"]
    assert (gen["fingerprints"], gen["families"]) == (g["fingerprints"], g["families"])
    np.testing.assert_allclose(gen["match_rate"], g["match_rate"], atol=1e-6)


def test_draw_maps_refuses_a_run_of_another_clt_or_a_missing_run(shell_run: ShellRun, tmp_path: Path) -> None:
    """A run folder made with another CLT raises InvalidInput naming both ids; a missing run folder
    raises NotFound naming the missing file."""
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "signatures.npz").write_bytes((shell_run.out / "signatures.npz").read_bytes())
    report = {**shell_run.report, "clt_id": "0000000000000000"}
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(InvalidInput) as ei:
        draw_maps(shell_run.engine, other, tmp_path / "maps")
    assert "0000000000000000" in str(ei.value) and shell_run.engine.clt_id in str(ei.value)
    missing = tmp_path / "no-such-run"
    with pytest.raises(NotFound) as nf:
        draw_maps(shell_run.engine, missing, tmp_path / "maps")
    assert str(missing) in str(nf.value)
    assert not (tmp_path / "maps").exists()


# ---------------------------------------------------------------------------------------------- maths
CLT_ID = "synthetic-clt"


def test_fingerprint_detects_a_shifted_compact_statistic() -> None:
    """Two families that differ only in one compact statistic (layer 2's error ratio, +6 sd): the
    fingerprint fitted on half of them detects ≥ 90 % of the held-out positives at ≤ 10 % FPR on
    held-out controls."""
    pos = family(1, 200, clt_id=CLT_ID, err_shift=0.3)
    neg = family(2, 200, clt_id=CLT_ID)
    fp = fit_fingerprint("shifted", "shifted", pos[:100], neg[:100], N_FEATURES)
    r = rates(fp, pos[100:], neg[100:])
    assert r["detection_rate"] >= 0.9, r
    assert r["fpr"] <= 0.1, r
    assert fp.report["oof_fpr"] <= 0.1


def test_fingerprint_calibration_holds_on_identical_distributions() -> None:
    """When the 'family' and the controls come from one distribution the threshold still keeps the FPR on
    held-out controls near its 5 % target (≤ 10 %): the conformal calibration does not overfit."""
    pos = family(3, 150, clt_id=CLT_ID)
    neg = family(4, 300, clt_id=CLT_ID)
    fp = fit_fingerprint("same", "same", pos, neg[:150], N_FEATURES)
    assert math.isfinite(fp.threshold)
    assert rates(fp, [], neg[150:])["fpr"] <= 0.1


@pytest.fixture(scope="module")
def fitted() -> Fingerprint:
    """A small fingerprint on synthetic data (for the artifact-format tests)."""
    return fit_fingerprint(
        "small",
        "small",
        family(5, 20, clt_id=CLT_ID, err_shift=0.3),
        family(6, 20, clt_id=CLT_ID),
        N_FEATURES,
    )


def test_one_signature_score_equals_the_batch_scorer(fitted: Fingerprint) -> None:
    """``score`` (the sidecar's one-row path) equals ``score_inputs`` (fitting and evaluation), NaN inputs
    included (a signature without a FINAL row has NaN final statistics)."""
    sigs = family(8, 12, clt_id=CLT_ID)
    sigs.append(replace(sigs[0], rows=sigs[0].rows[:1]))  # no FINAL row
    assert np.isnan(fitted.inputs(sigs[-1])).any()
    for sig in sigs:
        assert fitted.score(sig) == pytest.approx(
            float(fitted.score_inputs(fitted.inputs(sig)[None, :])[0]), abs=1e-12
        )


def test_fingerprint_dict_round_trip_keeps_its_scores(fitted: Fingerprint) -> None:
    """to_dict → JSON → from_dict gives a fingerprint that scores a signature identically."""
    back = Fingerprint.from_dict(json.loads(json.dumps(fitted.to_dict())))
    sig = family(7, 1, clt_id=CLT_ID)[0]
    assert back.score(sig) == fitted.score(sig)
    assert (back.threshold, back.clt_id, back.sparse_keys) == (
        fitted.threshold,
        fitted.clt_id,
        fitted.sparse_keys,
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [("missing_key", "bias"), ("short_weights", "entries"), ("format", f"reads {FORMAT_VERSION}")],
)
def test_from_dict_rejects_malformed_fingerprints(fitted: Fingerprint, case: str, needle: str) -> None:
    """A fingerprint dict with a missing key, a weight vector of the wrong length or another format
    version raises InvalidInput saying what was wrong."""
    d = fitted.to_dict()
    if case == "missing_key":
        del d["bias"]
    elif case == "short_weights":
        d["weights"] = d["weights"][:-1]
    else:
        d["format"] = FORMAT_VERSION + 1
    with pytest.raises(InvalidInput) as ei:
        Fingerprint.from_dict(d, "fp.json[0]")
    assert needle in str(ei.value) and "fp.json[0]" in str(ei.value)


def test_conformal_threshold_is_the_split_conformal_quantile() -> None:
    """On scores 0..99 at 5 % the threshold sits just above the ⌈0.95·101⌉ = 96th smallest score (95):
    95 itself does not match, and at most 5 of 100 scores reach it; with too few scores to certify the
    rate it is +inf (never match)."""
    scores = np.arange(100, dtype=np.float64)
    t = conformal_threshold(scores, 0.05)
    assert t == np.nextafter(95.0, np.inf)
    assert t > 95.0  # the 96th smallest itself does not match ('≥ threshold' means above it)
    assert int((scores >= t).sum()) == 4  # ≤ 5 % of 100 scores from the same distribution
    assert conformal_threshold(np.arange(10, dtype=np.float64), 0.05) == math.inf
