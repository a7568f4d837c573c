"""The plugin's cost to a real vLLM OpenAI server on SmolLM2 → benchmarks/results/overhead.json.
Goal (issue 6): throughput with the plugin at default sampling ≥ 0.97 × without it.

    python -m benchmarks.overhead [--rounds 4] [--repeats 2] [--clt DIR]

Three server modes, each started fresh, interleaved ``--repeats`` times (off, default, all, off, …):

* ``off``: the same command line with the plugin killed (``RESIDUE_DISABLE=1``): no hooks, no thread;
* ``default``: capture on, default sampling (last prompt row, every 16th decode row, final row);
* ``all``: capture on with every decode row kept (``RESIDUE_SAMPLE_DECODE_EVERY=1``).

Load: 16 concurrent completions, each 128 random prompt token ids (distinct per request, so the prefix
cache does not help) and exactly 64 output tokens (``ignore_eos``), greedy. One warm-up round, then
``--rounds`` measured rounds per server; throughput = output tokens / wall time of a round; latency per
request. Frames go to a discard gRPC sink in this process, so the figures are the plugin's own cost
(capture, encoding, protobuf, gRPC), not the sidecar's. bf16 weights (vLLM's default for this model).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.models import prepare_smollm2
from residue_monitor.service.plugin.launch import VllmServer, free_port, vllm_command
from residue_monitor.service.server.validate import unbatched
from residue_monitor.service.training import ensure_default_clt, machine_info, write_json

RESULTS = Path(__file__).parent / "results"
CONCURRENCY, PROMPT_TOKENS, OUTPUT_TOKENS = 16, 128, 64
MODES = {"off": {"RESIDUE_DISABLE": "1"}, "default": {}, "all": {"RESIDUE_SAMPLE_DECODE_EVERY": "1"}}


class DiscardSink(pb_grpc.ResidueServiceServicer):
    """Accepts Ingest streams and counts frames."""

    def __init__(self) -> None:
        self.frames = 0

    def Ingest(self, request_iterator: Iterator[pb.IngestMessage], context: Any) -> pb.IngestSummary:
        for m in request_iterator:
            self.frames += sum(x.WhichOneof("kind") == "frame" for x in unbatched(m))
        return pb.IngestSummary()


def _complete(url: str, model: str, ids: list[int]) -> float:
    body = {"model": model, "prompt": ids, "max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    assert out["usage"]["completion_tokens"] == OUTPUT_TOKENS, out["usage"]
    return time.perf_counter() - t0


def _round(url: str, model: str, rng: random.Random, vocab: int) -> tuple[float, list[float]]:
    prompts = [[rng.randrange(100, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(CONCURRENCY)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as ex:
        lat = list(ex.map(lambda p: _complete(url, model, p), prompts))
    return CONCURRENCY * OUTPUT_TOKENS / (time.perf_counter() - t0), lat


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clt", type=Path, default=None)
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    model = prepare_smollm2()
    clt = args.clt or ensure_default_clt("smollm2")[1]
    vocab = json.loads((model.path / "config.json").read_text())["vocab_size"]
    sink = DiscardSink()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ResidueServiceServicer_to_server(sink, server)
    sink_port = free_port()
    server.add_insecure_port(f"127.0.0.1:{sink_port}")
    server.start()
    tps: dict[str, list[float]] = {m: [] for m in MODES}
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    frames: dict[str, int] = dict.fromkeys(MODES, 0)
    rng = random.Random(0)
    t_start = time.time()
    for rep in range(args.repeats):
        for mode, settings in MODES.items():
            port = free_port()
            argv_, env = vllm_command(
                str(model.path),
                port=port,
                clt=str(clt),
                target=f"127.0.0.1:{sink_port}",
                served_model_name=model.name,
                settings=settings,
            )
            before = sink.frames
            with VllmServer(argv_, env, str(args.log_dir / f"overhead-{mode}-{rep}.log"), port) as srv:
                _round(srv.url, model.name, rng, vocab)  # warm-up
                for _ in range(args.rounds):
                    t, l_ = _round(srv.url, model.name, rng, vocab)
                    tps[mode].append(t)
                    lat[mode].extend(l_)
                time.sleep(2.0)  # let the sender deliver the last frames before counting
            frames[mode] += sink.frames - before
            print(
                f"rep {rep} {mode:8s} {statistics.median(tps[mode][-args.rounds :]):7.1f} tok/s", flush=True
            )
    server.stop(0)
    base = statistics.median(tps["off"])
    result: dict[str, Any] = {
        "throughput_ratio_default": statistics.median(tps["default"]) / base,
        "throughput_ratio_all_rows": statistics.median(tps["all"]) / base,
        "load": {
            "concurrency": CONCURRENCY,
            "prompt_tokens": PROMPT_TOKENS,
            "output_tokens": OUTPUT_TOKENS,
            "rounds_per_server": args.rounds,
            "repeats": args.repeats,
        },
        "model": model.name,
        "clt": str(clt),
        "run_seconds": round(time.time() - t_start, 1),
        "machine": machine_info(),
    }
    for mode in MODES:
        result[f"{mode}_tokens_per_second"] = statistics.median(tps[mode])
        result[f"{mode}_tokens_per_second_rounds"] = [round(x, 1) for x in tps[mode]]
        result[f"{mode}_latency_p50_s"] = _pct(lat[mode], 0.5)
        result[f"{mode}_latency_p99_s"] = _pct(lat[mode], 0.99)
        result[f"{mode}_frames_received"] = frames[mode]
    write_json(RESULTS / "overhead.json", result)
    print(f"throughput ratio default {result['throughput_ratio_default']:.3f}, "
          f"all rows {result['throughput_ratio_all_rows']:.3f} (goal ≥ 0.97 at default)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
