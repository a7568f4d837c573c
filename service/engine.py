"""The residue engine's offline jobs behind the CLI: analyse prompts, run the shells, fit fingerprints,
draw the papers' maps.

``residue shells run`` sends every shell instance and every control prompt through the model + CLT on
the HF reference path (``detectors.request``), keeps their signatures (``signatures.npz``), fits one
fingerprint per shell on the *fit* split, calibrates it on out-of-fold fit controls, and measures it on
the *held-out* split (paraphrases and controls never used to fit). It writes the fingerprints artifact
(loaded by the sidecar via ``RESIDUE_FINGERPRINTS``) and a report with the per-shell table.
``residue maps`` reads a run folder and draws the trace maps, the feature alignment matrix and the
generalization map.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residue_monitor.detectors.clt.activations import capture_mlp
from residue_monitor.detectors.clt.encode import encode_rows
from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import InvalidInput, NotFound
from residue_monitor.detectors.request import GenerationConfig, RequestAnalysis, analyze_prompt, prompt_ids
from residue_monitor.detectors.signature import (
    ERROR_RATIO,
    MASS,
    ResidueSignature,
    SignatureBuilder,
    load_signatures,
    save_signatures,
)
from residue_monitor.service.models import PreparedModel, load_hf, residue_home, resolve_model
from residue_monitor.service.training import ensure_default_clt, machine_info
from residue_monitor.shells.catalog import CONTROLS_ID, ShellInstance, load_controls, load_shells
from residue_monitor.shells.fingerprint import (
    Fingerprint,
    FitConfig,
    fit_fingerprint,
    load_fingerprints,
    prompt_feature_matrix,
    rates,
    save_fingerprints,
)
from residue_monitor.shells.maps import (
    AlignmentMatrix,
    GeneralizationMap,
    TraceMap,
    alignment_values,
    draw_alignment_matrix,
    draw_generalization_map,
    draw_trace_map,
)
from residue_monitor.shells.match import outcome

Progress = Callable[[int, int], None]
"""``progress(done, total)``."""


@dataclass(frozen=True, eq=False)
class Engine:
    """A loaded model + transcoder + signature builder."""

    prepared: PreparedModel
    model: Any
    tok: Any
    clt: CrossLayerTranscoder
    clt_path: Path | None
    builder: SignatureBuilder

    @property
    def clt_id(self) -> str:
        return self.builder.clt_id

    def analyze(self, prompt: str, gen: GenerationConfig) -> RequestAnalysis:
        return analyze_prompt(self.model, self.tok, self.builder, prompt, gen)


def load_engine(model_ref: str = "smollm2", clt_path: Path | None = None, k: int = 32) -> Engine:
    """The model and its transcoder (``clt_path``, else the default one, trained on first use)."""
    prepared = resolve_model(model_ref)
    if clt_path is not None:
        clt = load_clt(clt_path)
    else:
        clt, clt_path = ensure_default_clt(model_ref)
    model, tok = load_hf(prepared.path)
    builder = SignatureBuilder.for_model(model, clt, k=k, model=prepared.name)
    return Engine(prepared, model, tok, clt, clt_path, builder)


def default_fingerprints_path(model_name: str, clt_id: str) -> Path:
    """Where ``residue shells run`` puts the fingerprints of (model, CLT) by default."""
    return residue_home() / "fingerprints" / f"{model_name}-{clt_id}.json"


PACKAGED_FORECASTS = Path(__file__).parent / "forecasts"
"""Prefill forecasts shipped with the package (fitted by ``residue eval`` for the default CLT)."""


def default_forecast_path(model_name: str, clt_id: str) -> Path | None:
    """The prefill forecast for (model, CLT): the one ``residue eval`` published into the cache, else the
    one shipped with the package, else None."""
    name = f"{model_name}-{clt_id}.json"
    for path in (residue_home() / "forecasts" / name, PACKAGED_FORECASTS / name):
        if path.is_file():
            return path
    return None


def find_fingerprints(engine: Engine, path: Path | None = None) -> list[Fingerprint]:
    """Fingerprints for the engine's CLT: ``path`` (must match, else ArtifactMismatch) or the default
    file when one exists (else none)."""
    if path is None:
        path = default_fingerprints_path(engine.prepared.name, engine.clt_id)
        if not path.is_file():
            return []
    return load_fingerprints(path, clt_id=engine.clt_id)


# ---------------------------------------------------------------------------------------------- analyze
def analysis_record(a: RequestAnalysis, fps: Sequence[Fingerprint]) -> dict[str, Any]:
    """What `residue analyze --output` writes for one prompt (no token ids, no residue arrays)."""
    sig = a.signature
    first = sig.row("prompt_last") or sig.rows[0]
    err = first.layer_stats[:, ERROR_RATIO].astype(float)
    L = len(err)
    thirds = [err[: L // 3], err[L // 3 : 2 * L // 3], err[2 * L // 3 :]]
    return {
        "output": a.output_text,
        "prompt_tokens": sig.prompt_tokens,
        "output_tokens": sig.output_tokens,
        "empty_output": sig.empty_output,
        "stopped": sig.stopped,
        "clt_id": sig.clt_id,
        "signature": {
            "rows": [[r.position, r.phase] for r in sig.rows],
            "error_ratio_thirds": [round(float(t.mean()), 4) if t.size else None for t in thirds],
            "mean_l0": round(float(first.layer_stats[:, 1].mean()), 2),
            "mean_mass": round(float(first.layer_stats[:, MASS].mean()), 3),
        },
        "detectors": {n: {"score": r.score, "evidence": dict(r.evidence)} for n, r in a.detectors.items()},
        "baselines": {k: (None if math.isnan(v) else v) for k, v in a.baselines.as_dict().items()},
        "fingerprints": {fp.name: _match(fp, sig) for fp in fps},
    }


def _match(fp: Fingerprint, sig: ResidueSignature) -> dict[str, Any]:
    s, m = fp.matches(sig)
    return {"score": s, "threshold": fp.threshold if math.isfinite(fp.threshold) else None, "matched": m}


RESULT_KEYS = frozenset(
    {"output", "prompt_tokens", "output_tokens", "empty_output", "stopped", "clt_id", "signature",
     "detectors", "baselines", "fingerprints"}
)  # fmt: skip
"""The keys ``analysis_record`` writes; input lines may not use them (they would be lost)."""


def read_prompts(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSONL objects with at least ``id`` and ``prompt``; a bad line raises InvalidInput with its number."""
    try:
        lines = path.read_text().split("\n")  # not splitlines(): U+2028 & co. are legal inside JSON strings
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read ({e.strerror})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}:{n}: not JSON ({e.msg})") from e
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("prompt"), str):
            raise InvalidInput(f"{path}:{n}: expected an object with 'id' and a string 'prompt'")
        clash = sorted(set(obj) & RESULT_KEYS)
        if clash:
            msg = f"field(s) {clash} would be overwritten by the analysis: rename them"
            raise InvalidInput(f"{path}:{n}: {msg}")
        yield n, obj


def head_report(engine: Engine, prompt: str, gen: GenerationConfig, top: int = 10) -> list[dict[str, Any]]:
    """Per-head QK/OV summaries at the last prompt token, the ``top`` heads with the largest trapped or
    sink-free concentrated attention first (the offline attention report)."""
    from residue_monitor.detectors.attention import head_summary
    from residue_monitor.detectors.capture import attention_probs, capture

    ids = prompt_ids(engine.tok, prompt, gen.chat)
    acts, _ = capture(engine.model, ids, [(len(ids) - 1, "prompt_last")])
    probs = attention_probs(acts)  # (L, H, 1, T)
    heads = head_summary(engine.model, probs, acts.positions)
    sig = engine.builder.build(acts, prompt_tokens=len(ids))
    from residue_monitor.detectors.attention import trapped_mass

    trap = trapped_mass(sig.rows[0])  # (L, H)
    for h in heads:
        h["trapped_mass"] = float(trap[h["layer"], h["head"]])
        h["entropy"] = float(sig.rows[0].heads[h["layer"], h["head"], 0])
    heads.sort(key=lambda h: (-h["trapped_mass"], h["entropy"]))
    return heads[:top]


# ---------------------------------------------------------------------------------------------- shells
def _instances() -> tuple[list[tuple[str, ShellInstance]], list[ShellInstance]]:
    shells = [(spec.id, inst) for spec in load_shells() for inst in spec.instances]
    return shells, list(load_controls())


def run_shells(
    engine: Engine,
    out: Path,
    gen: GenerationConfig,
    fit: FitConfig | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
    publish: bool = True,
) -> dict[str, Any]:
    """Run every shell instance and control, fit and measure one fingerprint per shell; write
    ``signatures.npz``, ``fingerprints.json``, ``report.json`` and ``outputs.jsonl`` into ``out``, and
    (``publish``) the fingerprints to ``default_fingerprints_path`` too.

    ``limit``: at most this many instances per shell and 6× as many controls (quick runs, tests).
    """
    fit = fit or FitConfig()
    shells, controls = _instances()
    if limit is not None:
        per: dict[str, int] = {}
        kept = []
        for sid, inst in shells:
            if per.get(sid, 0) < limit:
                per[sid] = per.get(sid, 0) + 1
                kept.append((sid, inst))
        shells, controls = kept, controls[: 6 * limit]
    todo: list[tuple[str, ShellInstance]] = [*shells, *((CONTROLS_ID, c) for c in controls)]
    out.mkdir(parents=True, exist_ok=True)
    sigs: dict[str, ResidueSignature] = {}
    lines: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with (out / "outputs.jsonl").open("w") as f:
        for i, (family, inst) in enumerate(todo):
            g = gen if gen.chat == inst.chat else replace(gen, chat=inst.chat)
            a = analyze_prompt(engine.model, engine.tok, engine.builder, inst.prompt, g)
            sigs[inst.id] = a.signature
            scores = {n: r.score for n, r in a.detectors.items()}
            result = outcome(a.output_text, inst.answers, inst.match) if inst.answers else None
            line = {"id": inst.id, "family": family, "split": inst.split, "output": a.output_text,
                    "answers": list(inst.answers), "outcome": result, "detectors": scores}  # fmt: skip
            lines.append(line)
            f.write(json.dumps(line) + "\n")
            if progress is not None:
                progress(i + 1, len(todo))
    run_seconds = time.perf_counter() - t0
    save_signatures(out / "signatures.npz", sigs)
    report = fit_and_report(
        engine.prepared.name, engine.clt_id, engine.clt.cfg.n_features, shells, controls, sigs, fit
    )
    report["provoked"] = provoked_failures(lines)
    report.update({"run_seconds": run_seconds, "generation": {"max_new_tokens": gen.max_new_tokens,
                   "decode_every": gen.decode_every, "chat": gen.chat}, "machine": machine_info(),
                   "clt_path": str(engine.clt_path or "")})  # fmt: skip
    fps = [Fingerprint.from_dict(d) for d in report.pop("_fingerprints")]
    meta = {"model": engine.prepared.name, "clt_id": engine.clt_id}
    save_fingerprints(out / "fingerprints.json", fps, meta=meta)
    if publish:  # where `residue analyze`, the demo and the benchmarks find them
        save_fingerprints(default_fingerprints_path(engine.prepared.name, engine.clt_id), fps, meta=meta)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def provoked_failures(lines: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per family, how often the model got instances with accepted answers wrong (DESIGN.md §10 rules,
    recorded as ``outcome`` in outputs.jsonl): does each shell provoke the failure it is written for?"""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        o = line.get("outcome")
        if o is None:
            continue
        row = out.setdefault(line["family"], {"scored": 0, "right": 0, "wrong": 0, "null": 0})
        row["scored"] += 1
        row[o] += 1
    for row in out.values():
        row["failure_rate"] = (row["wrong"] + row["null"]) / row["scored"]
    return dict(sorted(out.items()))


def rerun_report(run: Path, fit: FitConfig | None = None) -> dict[str, Any]:
    """Refit and re-measure a finished run from its folder (signatures.npz, outputs.jsonl) without the
    model: the fit is deterministic, so this reproduces ``run_shells``' report (plus outcome counts
    recomputed from the stored outputs)."""
    sigs = load_signatures(run / "signatures.npz")
    lines = [json.loads(x) for x in (run / "outputs.jsonl").read_text().splitlines() if x.strip()]
    shells, controls = _instances()
    by_id = {inst.id: inst for _, inst in shells} | {c.id: c for c in controls}
    for line in lines:
        inst = by_id.get(line["id"])
        if inst is not None and inst.answers:
            line["outcome"] = outcome(line["output"], inst.answers, inst.match)
    shells = [(sid, inst) for sid, inst in shells if inst.id in sigs]
    controls = [c for c in controls if c.id in sigs]
    any_sig = next(iter(sigs.values()))
    n_features = int(json.loads((run / "report.json").read_text()).get("n_features", 0)) or _n_features(run)
    report = fit_and_report(
        any_sig.model, any_sig.clt_id, n_features, shells, controls, sigs, fit or FitConfig()
    )
    report["provoked"] = provoked_failures(lines)
    return report


def _n_features(run: Path) -> int:
    path = json.loads((run / "report.json").read_text()).get("clt_path", "")
    if not path:
        raise NotFound(f"{run}/report.json names no CLT: cannot tell the number of features")
    return load_clt(Path(path)).cfg.n_features


def fit_and_report(
    model_name: str,
    clt_id: str,
    n_features: int,
    shells: Sequence[tuple[str, ShellInstance]],
    controls: Sequence[ShellInstance],
    sigs: Mapping[str, ResidueSignature],
    fit: FitConfig,
) -> dict[str, Any]:
    """Fit on the fit split, measure on held-out; the report (with the fitted fingerprints under
    ``_fingerprints``) as a JSON-ready dict."""
    c_fit = [sigs[c.id] for c in controls if c.split == "fit"]
    c_held = [sigs[c.id] for c in controls if c.split == "heldout"]
    families = sorted({sid for sid, _ in shells})
    fps: list[Fingerprint] = []
    table: dict[str, dict[str, Any]] = {}
    for sid in families:
        members = [inst for s, inst in shells if s == sid]
        p_fit = [sigs[m.id] for m in members if m.split == "fit"]
        p_held = [sigs[m.id] for m in members if m.split == "heldout"]
        fp = fit_fingerprint(sid, sid, p_fit, c_fit, n_features, fit)
        r = rates(fp, p_held, c_held)
        fps.append(fp)
        table[sid] = {
            "detection_rate": r["detection_rate"],
            "fpr": r["fpr"],
            "threshold": fp.threshold if math.isfinite(fp.threshold) else None,
            "heldout_positives": int(r["n_positives"]),
            "heldout_controls": int(r["n_controls"]),
            "fit_positives": len(p_fit),
            "fit_controls": len(c_fit),
            "oof_detection_rate": fp.report["oof_detection_rate"],
            "oof_fpr": fp.report["oof_fpr"],
            "sparse_features": fp.report["sparse_features"],
        }
    # Generalization: each fingerprint on every family (held-out members only on its own family, all
    # members elsewhere: none of them were used to fit it) and on the held-out controls.
    gen_cols = [*families, CONTROLS_ID]
    gen_rows = []
    for fp in fps:
        row = []
        for fam in families:
            members = [
                sigs[inst.id]
                for s, inst in shells
                if s == fam and (fam != fp.family or inst.split == "heldout")
            ]
            row.append(rates(fp, members, [])["detection_rate"])
        row.append(rates(fp, [], c_held)["fpr"])
        gen_rows.append(row)
    det = [t["detection_rate"] for t in table.values()]
    fpr = [t["fpr"] for t in table.values()]
    return {
        "model": model_name,
        "clt_id": clt_id,
        "target_fpr": fit.target_fpr,
        "min_detection_rate": min(det) if det else None,
        "max_fpr": max(fpr) if fpr else None,
        "per_shell": table,
        "generalization": {
            "fingerprints": [fp.name for fp in fps],
            "families": gen_cols,
            "match_rate": gen_rows,
        },
        "fit_config": {"l2": fit.l2, "n_sparse": fit.n_sparse, "folds": fit.folds, "seed": fit.seed},
        "n_features": n_features,
        "_fingerprints": [fp.to_dict() for fp in fps],
    }


# ---------------------------------------------------------------------------------------------- maps
@torch.inference_mode()
def trace_arrays(engine: Engine, prompt: str, chat: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tokens, mass (L, T), error ratio (L, T)) of every prompt position (a trace map's data)."""
    ids = prompt_ids(engine.tok, prompt, chat)
    xs, ys = capture_mlp(engine.model, torch.tensor([ids]))  # (L, 1, T, D)
    codes = encode_rows(engine.clt, xs[:, 0].float(), ys[:, 0].float(), k=1)
    tokens = [engine.tok.decode([t]) for t in ids]
    return tokens, codes.mass.numpy(), codes.error_ratio.numpy()


def draw_maps(engine: Engine, run: Path, out: Path, top: int = 30) -> list[Path]:
    """The three maps of a ``run_shells`` folder; returns the PNG paths."""
    for need in ("signatures.npz", "report.json"):
        if not (run / need).is_file():
            raise NotFound(f"{run / need} is missing: run `residue shells run --out {run}` first")
    report = json.loads((run / "report.json").read_text())
    if report.get("clt_id") != engine.clt_id:
        raise InvalidInput(f"{run} was made with CLT {report.get('clt_id')}, not the loaded {engine.clt_id}")
    sigs = load_signatures(run / "signatures.npz")
    shells, controls = _instances()
    F = engine.clt.cfg.n_features
    paths: list[Path] = []
    ctrl = [sigs[c.id] for c in controls if c.id in sigs]
    ctrl_mass = np.mean([s.rows[0].layer_stats[:, MASS] for s in ctrl], axis=0) if ctrl else None
    ctrl_err = np.mean([s.rows[0].layer_stats[:, ERROR_RATIO] for s in ctrl], axis=0) if ctrl else None
    by_family: dict[str, list[ShellInstance]] = {}
    for sid, inst in shells:
        if inst.id in sigs:
            by_family.setdefault(sid, []).append(inst)
    for sid, members in sorted(by_family.items()):
        tokens, mass, err = trace_arrays(engine, members[0].prompt, members[0].chat)
        paths.append(
            draw_trace_map(
                TraceMap(title=f"{sid} ({members[0].id})", tokens=tuple(tokens), mass=mass, error_ratio=err,
                         control_mass=ctrl_mass, control_error_ratio=ctrl_err),
                out / f"trace-{sid}.png",
            )
        )  # fmt: skip
    shell_acts = {
        sid: prompt_feature_matrix([sigs[m.id] for m in ms], F) for sid, ms in sorted(by_family.items())
    }
    keys = [f"L{c // F}/F{c % F}" for c in range(engine.clt.n_layers * F)]
    m: AlignmentMatrix = alignment_values(shell_acts, prompt_feature_matrix(ctrl, F), keys, top=top)
    paths.append(draw_alignment_matrix(m, out / "alignment-matrix.png"))
    g = report["generalization"]
    rate = np.nan_to_num(np.array(g["match_rate"], dtype=float))
    paths.append(
        draw_generalization_map(
            GeneralizationMap(tuple(g["fingerprints"]), tuple(g["families"]), rate),
            out / "generalization-map.png",
        )
    )
    return paths
