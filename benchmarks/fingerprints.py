"""Fingerprints of shells v1–v5 + the meta-shell on SmolLM2 and the default CLT, measured on held-out
prompts → benchmarks/results/fingerprints.json.

    python -m benchmarks.fingerprints [--max-new-tokens 24] [--run DIR] [--reuse]

Runs ``residue shells run`` (every shell instance and every control prompt, greedy generation, the
signature of each request), fits one fingerprint per shell on the fit split, calibrates its threshold on
out-of-fold fit controls for a 5 % false-positive rate, and measures detection on the held-out
paraphrases and the FPR on held-out controls. Goals (issue 4): detection ≥ 80 % per shell, FPR ≤ 5 %.
Also reported: how often SmolLM2 actually fails each shell's instances that have accepted answers
(DESIGN.md §10 matching), and the controls' failure rate. ``--reuse`` refits from an existing run folder
(signatures.npz, outputs.jsonl) without running the model (the fit is deterministic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from residue_monitor.detectors.request import GenerationConfig
from residue_monitor.service.engine import load_engine, rerun_report, run_shells
from residue_monitor.service.models import residue_home
from residue_monitor.service.training import write_json
from residue_monitor.shells.fingerprint import FitConfig

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--run", type=Path, default=None, help="run folder (default: $RESIDUE_HOME/shells/…)")
    ap.add_argument("--reuse", action="store_true", help="refit from the run folder; no model run")
    ap.add_argument("--out", type=Path, default=RESULTS / "fingerprints.json")
    args = ap.parse_args(argv)
    eng = load_engine("smollm2")
    run = args.run or residue_home() / "shells" / f"{eng.prepared.name}-{eng.clt_id}"
    if args.reuse:
        old = json.loads((run / "report.json").read_text())
        report = {**old, **rerun_report(run, FitConfig())}
    else:
        report = run_shells(eng, run, GenerationConfig(max_new_tokens=args.max_new_tokens), FitConfig())
    result: dict[str, Any] = {
        "min_detection_rate": report["min_detection_rate"],
        "max_fpr": report["max_fpr"],
        "goal_detection_rate": 0.8,
        "goal_fpr": 0.05,
        "per_shell": report["per_shell"],
        "provoked_failures": report.get("provoked"),
        "generalization": report["generalization"],
        "model": report["model"],
        "clt_id": report["clt_id"],
        "run_seconds": report["run_seconds"],
        "generation": report["generation"],
        "fit_config": report["fit_config"],
        "machine": report["machine"],
    }
    write_json(args.out, result)
    rows = ", ".join(
        f"{s}: {r['detection_rate']:.0%}/{r['fpr']:.1%}" for s, r in sorted(report["per_shell"].items())
    )
    print(
        f"fingerprints: min detection {result['min_detection_rate']:.0%}, max FPR {result['max_fpr']:.1%} "
        f"(goals ≥ 80 %, ≤ 5 %); {rows} → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
