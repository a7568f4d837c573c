"""Cost of a request's residue signature on SmolLM2 relative to one plain HF forward pass of the same
256-token prompt → benchmarks/results/signature_cost.json. Goal (issue 4): ≤ 1.5×.

    python -m benchmarks.signature_cost [--reps 7] [--clt DIR]

Measured in one process, interleaved, medians over ``--reps`` after a warm-up:

* ``forward``: ``model(input_ids)`` on a 256-token prompt (logits included, as a server computes them);
* ``signature``: the capture forward over the same tokens (hooks on MLP in/out and q/k projections)
  plus ``SignatureBuilder.build`` for the rows a request samples at prefill (the last prompt token):
  CLT encode of every layer, reconstruction error, unreached mass, attention statistics from q·K for
  every head, logit statistics.

The ratio is signature / forward. Without ``--clt`` the default SmolLM2 transcoder is used (trained on
first use); its cost depends only on its shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from residue_monitor.detectors.capture import capture
from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service.models import load_hf, prepare_smollm2
from residue_monitor.service.training import ensure_default_clt, machine_info, write_json

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--clt", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "signature_cost.json")
    args = ap.parse_args(argv)
    prepared = prepare_smollm2()
    model, _tok = load_hf(prepared.path)
    clt = load_clt(args.clt) if args.clt else ensure_default_clt("smollm2")[0]
    builder = SignatureBuilder.for_model(model, clt, model=prepared.name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.tokens,), generator=g)
    rows = [(args.tokens - 1, "prompt_last")]

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids[None])

    def signature() -> None:
        acts, _ = capture(model, ids, rows)  # type: ignore[arg-type]
        builder.build(acts, prompt_tokens=args.tokens)

    forward()
    signature()
    t_fwd: list[float] = []
    t_sig: list[float] = []
    for _ in range(args.reps):
        for fn, acc in ((forward, t_fwd), (signature, t_sig)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    fwd, sig = statistics.median(t_fwd), statistics.median(t_sig)
    result = {
        "tokens": args.tokens,
        "forward_seconds": fwd,
        "signature_seconds": sig,
        "ratio": sig / fwd,
        "goal_ratio": 1.5,
        "reps": args.reps,
        "forward_all_seconds": t_fwd,
        "signature_all_seconds": t_sig,
        "clt_id": clt.clt_id(),
        "n_features": clt.cfg.n_features,
        "n_layers": clt.n_layers,
        "model": prepared.name,
        "machine": machine_info(),
    }
    write_json(args.out, result)
    print(
        f"signature_cost: forward {fwd * 1e3:.1f} ms, signature {sig * 1e3:.1f} ms → "
        f"{result['ratio']:.2f}× (goal ≤ 1.5×) → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
