"""Attribution graph of a 64-token prompt on SmolLM2 with the default CLT → benchmarks/results/trace.json.

    python -m benchmarks.trace [--tokens 64] [--reps 3] [--max-feature-nodes 1024] [--random-clt]

Goal (issue 7): ≤ 60 s and ≤ 4 GiB peak on 2 cores. Time covers the whole graph: the frozen forward,
every backward batch, influence ordering, adjacency, pruning and the circuit-tracer JSON; the median of
``--reps`` runs in one process. Peak memory is
the process's peak resident set (``ru_maxrss``), model and transcoder included; a fresh process is used
so nothing earlier inflates it. ``--random-clt`` times a random transcoder of the default shape (for
profiling before the default one is trained; never written as the result).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from residue_monitor.detectors.attribution.export import to_json
from residue_monitor.detectors.attribution.graph import AttributionGraph, GraphConfig, TargetSpec
from residue_monitor.detectors.attribution.prune import prune
from residue_monitor.detectors.attribution.summary import render_text, summarize
from residue_monitor.detectors.clt.model import CLTConfig, random_clt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service.engine import Engine
from residue_monitor.service.models import load_hf, prepare_smollm2
from residue_monitor.service.tracing import TraceJob, Tracer
from residue_monitor.service.training import DEFAULT_SMOLLM2, machine_info, write_json

RESULTS = Path(__file__).parent / "results"
PROMPT_TEXT = (
    "Alice put the silver key in the red box on the kitchen shelf before the meeting on Monday. "
    "Later Bob moved the key from the red box to the green box under the window, and he told nobody. "
    "Carol then opened the red box to look for the key, because she believed it was still there. "
    "Where will Carol look for the key first, and where is the key really? Answer in one short sentence."
)


def prompt_of(tracer: Tracer, n_tokens: int) -> tuple[str, list[int]]:
    """A chat prompt whose template-applied ids are as close to ``n_tokens`` as the words allow (≤)."""
    words = PROMPT_TEXT.split(" ")
    best: tuple[str, list[int]] = ("", [])
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        ids = tracer.ids_for(text)
        if len(ids) > n_tokens:
            break
        best = (text, ids)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-feature-nodes", type=int, default=GraphConfig().max_feature_nodes)
    ap.add_argument("--batch-size", type=int, default=GraphConfig().batch_size)
    ap.add_argument("--random-clt", action="store_true", help="profile with a random CLT (no result written)")
    ap.add_argument("--out", type=Path, default=RESULTS / "trace.json")
    args = ap.parse_args(argv)

    t_load = time.perf_counter()
    if args.random_clt:
        prepared = prepare_smollm2()
        model, tok = load_hf(prepared.path)
        clt = random_clt(CLTConfig(n_layers=len(model.model.layers), d_model=int(model.config.hidden_size),
                                   n_features=DEFAULT_SMOLLM2.n_features, k=DEFAULT_SMOLLM2.k))  # fmt: skip
        tracer = Tracer(Engine(prepared, model, tok, clt, None, SignatureBuilder.for_model(model, clt)))
    else:
        tracer = Tracer.load("smollm2")
    load_s = time.perf_counter() - t_load
    prompt, ids = prompt_of(tracer, args.tokens)
    cfg = GraphConfig(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    job = TraceJob(tuple(ids), TargetSpec("emitted"), cfg, prompt=prompt)

    def run() -> tuple[AttributionGraph, dict[str, Any], float]:
        t0 = time.perf_counter()
        g, pruned = tracer.trace(job)
        doc = to_json(g, pruned, prompt=prompt)
        return g, doc, time.perf_counter() - t0

    g, doc, first = run()
    times = [first] + [run()[2] for _ in range(args.reps - 1)]  # shared machines: median of every run
    seconds = statistics.median(times)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux
    s = summarize(g, prune(g.adjacency, g.layout, g.weights))
    print(render_text(s))
    result = {
        "seconds_64_tokens": round(seconds, 2),
        "seconds_each_run": [round(t, 2) for t in times],
        "peak_rss_gib": round(peak_gib, 3),
        "replacement_score": round(g.replacement_score, 4),
        "completeness_score": round(g.completeness_score, 4),
        "n_tokens": len(ids),
        "n_active_features": int(g.active_features.shape[0]),
        "n_features_traced": int(g.selected.numel()),
        "max_feature_nodes": cfg.max_feature_nodes,
        "batch_size": cfg.batch_size,
        "pruned_nodes": s.n_nodes_kept,
        "pruned_edges": s.n_edges_kept,
        "unreached_activation_share_last": round(s.unreached_activation_share, 4),
        "json_bytes": len(json.dumps(doc)),
        "load_seconds": round(load_s, 1),
        "target": s.target,
        "clt_id": g.clt_id,
        "goal": {"seconds": 60, "peak_rss_gib": 4},
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if not args.random_clt:
        write_json(args.out, result)
        print(f"→ {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
