"""Per-layer transcoder set vs cross-layer transcoder on SmolLM2 at equal width and token budget
→ benchmarks/results/clt_kinds.json (the measurement behind the default's kind, README "Default CLT").

    python -m benchmarks.clt_kinds [--tokens 60000] [--features 768]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from residue_monitor.service.training import (
    DEFAULT_SMOLLM2,
    machine_info,
    summary,
    train_and_evaluate,
    write_json,
)

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--features", type=int, default=768)
    ap.add_argument("--out", type=Path, default=RESULTS / "clt_kinds.json")
    args = ap.parse_args(argv)
    rows = {}
    for kind in ("transcoder_set", "cross_layer_transcoder"):
        tc = replace(DEFAULT_SMOLLM2, kind=kind, n_features=args.features, train_tokens=args.tokens)
        _, m = train_and_evaluate("smollm2", tc)
        rows[kind] = {
            **summary(m),
            "splice": m["splice"],
            "fvu": m["fvu"],
            "train_tokens": m["train_tokens"],
            "n_features": args.features,
        }
        print(f"{kind}: " + " ".join(f"{k}={v:.3f}" for k, v in summary(m).items() if isinstance(v, float)))
    write_json(args.out, {"kinds": rows, "machine": machine_info()})
    s, c = rows["transcoder_set"], rows["cross_layer_transcoder"]
    print(
        f"clt_kinds: set fvu={s['fvu_mean']:.3f} top1={s['top1_agreement']:.3f} {s['train_seconds']:.0f}s | "
        f"clt fvu={c['fvu_mean']:.3f} top1={c['top1_agreement']:.3f} {c['train_seconds']:.0f}s → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
