"""CLT training time and quality on SmolLM2 → benchmarks/results/clt_quality.json.

    python -m benchmarks.clt_quality            # train the default transcoder (≈15–20 min on 2 cores)
    python -m benchmarks.clt_quality --reuse    # report the cached default transcoder's saved metrics
    python -m benchmarks.clt_quality --tokens 600000 --features 2304 --out results/clt_quality_long.json

Every number is measured on held-out Brown text (every 20th document): FVU per layer against the
least-squares linear baseline, L0, dead fraction, spliced next-token KL and top-1 agreement.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from residue_monitor.detectors.clt.io import read_metrics
from residue_monitor.service.models import prepare_smollm2
from residue_monitor.service.training import (
    DEFAULT_SMOLLM2,
    clt_dir,
    machine_info,
    summary,
    train_and_evaluate,
    write_json,
)

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="read the cached default CLT's metrics, no training")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--features", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--kind", default=None, choices=["transcoder_set", "cross_layer_transcoder"])
    ap.add_argument("--out", type=Path, default=RESULTS / "clt_quality.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tc = replace(
        DEFAULT_SMOLLM2,
        train_tokens=args.tokens or DEFAULT_SMOLLM2.train_tokens,
        n_features=args.features or DEFAULT_SMOLLM2.n_features,
        k=args.k or DEFAULT_SMOLLM2.k,
        kind=args.kind or DEFAULT_SMOLLM2.kind,
    )
    dest = clt_dir(prepare_smollm2(), tc)
    metrics = read_metrics(dest) if args.reuse else None
    if metrics is None:
        dest, metrics = train_and_evaluate("smollm2", tc, out=dest)
    result = {
        **summary(metrics),
        "train_tokens": metrics["train_tokens"],
        "capture_seconds": metrics.get("capture_seconds"),
        "clt_id": metrics["clt_id"],
        "clt_path": str(dest),
        "config": metrics["train_config"],
        "per_layer": {
            "fvu": metrics["fvu"],
            "linear_fvu": metrics.get("linear_fvu"),
            "l0": metrics["l0"],
            "dead_fraction": metrics["dead_fraction"],
            "left_out_massive": metrics["left_out_massive"],
        },
        "splice": metrics["splice"],
        "curve": metrics["curve"],
        "heldout_tokens": metrics["heldout_tokens"],
        "machine": metrics.get("machine") or machine_info(),
        "reported": machine_info()["date"],
    }
    write_json(args.out, result)
    print(
        f"clt_quality: fvu_mean={result['fvu_mean']:.3f} linear={result['linear_baseline_fvu_mean']:.3f} "
        f"top1={result['top1_agreement']:.3f} kl={result['kl_mean']:.3f} l0={result['l0_mean']:.1f} "
        f"dead={result['dead_fraction']:.3f} train_s={result['train_seconds']:.0f} → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
