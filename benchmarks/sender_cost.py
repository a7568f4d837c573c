"""Cost of the plugin's background encoder per captured row → benchmarks/results/sender_cost[_DEVICE].json.

    python -m benchmarks.sender_cost [--device cpu|cuda] [--reps 7] [--threads 1]

What the plugin's encoder threads do for a batch of captured rows (``FrameSender._messages``): attention
head statistics from the row's query and its request's keys, CLT encode of all 30 layers, reconstruction
error, unreached mass, logit statistics and the protobuf frames. SmolLM2's shapes (30 layers, d 576,
9 query / 3 KV heads of 64, vocabulary 49,152) and a random transcoder of the default's shape (F 1536,
k 32, with skip): the cost depends only on the shapes. Rows sit at positions 128-176 (the overhead
benchmark's 128-token prompts plus their decode rows), keys in bf16 as vLLM caches them.

``--threads 1`` is what the plugin gets inside vLLM's CPU worker (vLLM sets torch to its OpenMP threads,
one on a 2-core machine). Medians of ``--reps`` after a warm-up; on CUDA every timing synchronises.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from residue_monitor.detectors.clt.model import CLTConfig, random_clt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service.plugin.capture import RowEvent
from residue_monitor.service.plugin.sender import FrameSender
from residue_monitor.service.training import DEFAULT_SMOLLM2, machine_info, write_json

RESULTS = Path(__file__).parent / "results"
L, D, H, H_KV, D_HEAD, V = 30, 576, 9, 3, 64, 49152


def sender(device: str, seed: int = 0) -> FrameSender:
    """A FrameSender (never started: no thread, no connection) over a random default-shaped CLT."""
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=DEFAULT_SMOLLM2.n_features, k=DEFAULT_SMOLLM2.k)
    clt = random_clt(cfg, seed=seed).to(device)
    readout = torch.randn(V, D, generator=torch.Generator().manual_seed(seed)).to(device)
    builder = SignatureBuilder(clt, readout, k=32, eos_id=2, model="SmolLM2-135M-Instruct")
    return FrameSender(builder, "127.0.0.1:1", attn_scale=D_HEAD**-0.5)


def rows(n: int, device: str, seed: int = 1) -> list[RowEvent]:
    """n captured decode rows of n requests, as the capture hands them over (on the model's device)."""
    g = torch.Generator().manual_seed(seed)
    out: list[RowEvent] = []
    for i in range(n):
        pos = 128 + 16 * (i % 4)
        out.append(
            RowEvent(
                request_id=f"req-{i}",
                position=pos,
                phase="decode",
                mlp_in=torch.randn(L, D, generator=g).to(device),
                mlp_out=torch.randn(L, D, generator=g).to(device),
                q=torch.randn(L, H, D_HEAD, generator=g).bfloat16().to(device),
                keys=torch.randn(L, H_KV, pos + 1, D_HEAD, generator=g).bfloat16().to(device),
                logits=(torch.randn(V, generator=g) * 3).to(device),
                target=int(torch.randint(0, V, (1,), generator=g)),
            )
        )
    return out


def _median_s(fn: Callable[[], object], reps: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(device: str, batches: tuple[int, ...], reps: int) -> dict[str, Any]:
    s = sender(device)
    out: dict[str, Any] = {}
    for n in batches:
        evs = rows(n, device)
        heads = _median_s(lambda evs=evs: s._heads(evs), reps, device)  # pyright: ignore[reportPrivateUsage]
        total = _median_s(lambda evs=evs: s._messages(evs), reps, device)  # pyright: ignore[reportPrivateUsage]
        per_row, heads_per_row = 1e3 * total / n, 1e3 * heads / n
        out[str(n)] = {"batch_seconds": total, "ms_per_row": per_row, "heads_ms_per_row": heads_per_row}
        print(f"{device} batch {n:4d}: {per_row:7.2f} ms/row (heads {heads_per_row:.2f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = tuple(int(x) for x in args.batches.split(","))
    result: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "",
        "torch_threads": args.threads,
        "shape": {
            "layers": L,
            "d_model": D,
            "heads": H,
            "kv_heads": H_KV,
            "d_head": D_HEAD,
            "vocab": V,
            "n_features": DEFAULT_SMOLLM2.n_features,
            "k": DEFAULT_SMOLLM2.k,
        },
        "batches": measure(args.device, batches, args.reps),
        "machine": machine_info(),
    }
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    write_json(args.out or RESULTS / f"sender_cost{suffix}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
