"""Encode cost of the default SmolLM2 transcoder relative to one HF forward pass of the same tokens
→ benchmarks/results/encode_cost.json.

    python -m benchmarks.encode_cost [--reps 5]

Cases: 1 row × all 30 layers (the per-request prefill frame) against a forward pass of one token with
a 255-token KV history (a decode step), and 256 rows × all layers against a 256-token prefill.
Medians of ``--reps`` repetitions after a warm-up, all in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from residue_monitor.detectors.clt.activations import capture_mlp
from residue_monitor.detectors.clt.encode import encode_rows
from residue_monitor.service.models import load_hf, prepare_smollm2
from residue_monitor.service.training import ensure_default_clt, machine_info, write_json

RESULTS = Path(__file__).parent / "results"


def _median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "encode_cost.json")
    args = ap.parse_args(argv)
    model, _tok = load_hf(prepare_smollm2().path)
    clt, _ = ensure_default_clt("smollm2")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, 256), generator=g)
    xs, ys = capture_mlp(model, ids)  # (L, 1, 256, D)

    with torch.inference_mode():
        out = model(input_ids=ids[:, :255], use_cache=True)
        past = out.past_key_values

        def prefill() -> object:
            return model(input_ids=ids)

        def decode_step() -> object:
            # one new token on top of a 255-token cache; the cache is cropped back so every rep is equal
            r = model(input_ids=ids[:, 255:], past_key_values=past, use_cache=True)
            past.crop(-1)  # drop the token just appended (transformers 5: negative = remove n)
            return r

        t_prefill = _median_s(prefill, args.reps)
        t_decode = _median_s(decode_step, args.reps)
        t_enc1 = _median_s(lambda: encode_rows(clt, xs[:, 0, -1:], ys[:, 0, -1:]), args.reps * 4)
        t_enc256 = _median_s(lambda: encode_rows(clt, xs[:, 0], ys[:, 0]), args.reps)
    result = {
        "encode_1_row_seconds": t_enc1,
        "encode_256_rows_seconds": t_enc256,
        "forward_1_token_decode_seconds": t_decode,
        "forward_256_tokens_prefill_seconds": t_prefill,
        "ratio_1_row_vs_decode_step": t_enc1 / t_decode,
        "ratio_256_rows_vs_prefill": t_enc256 / t_prefill,
        "clt_id": clt.clt_id(),
        "n_features": clt.cfg.n_features,
        "n_layers": clt.n_layers,
        "machine": machine_info(),
    }
    write_json(args.out, result)
    print(
        f"encode_cost: 1 row {t_enc1 * 1e3:.2f} ms "
        f"({result['ratio_1_row_vs_decode_step']:.2f}× a decode step), 256 rows {t_enc256 * 1e3:.1f} ms "
        f"({result['ratio_256_rows_vs_prefill']:.2f}× a 256-token prefill) → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
