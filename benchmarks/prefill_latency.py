"""How soon is the prefill forecast readable? End of prefill → forecast in a client's hands over gRPC, under
16 concurrent streamed completions on SmolLM2 → benchmarks/results/prefill_forecast.json (``latency_*``
and ``second_token_*`` keys; the evaluation's keys in the same file are kept).
Goal (issue 13): p99 ≤ 50 ms, and below the time to the second generated token.

    python -m benchmarks.prefill_latency [--rounds 4] [--forecast ARTIFACT.json] [--clt DIR]

The stack is the real one: vLLM's OpenAI server with the plugin on (default sampling), ``residue serve``
as a subprocess (in-memory store) with ``RESIDUE_FORECAST`` set, and this process as the gateway
(``examples/forecast_gateway.py``'s stream reader and sidecar client). Per round, 16 completions start
at once, each 128 random prompt token ids (distinct, so the prefix cache does not help) and exactly 32
output tokens (``ignore_eos``), greedy, streamed with running usage counts. Each request's client asks
``GetResidue`` once, with ``wait_ms``, at its first streamed chunk; the sidecar answers when the
forecast is stored (``--poll-ms`` only paces a re-ask after an answer without a forecast):

* latency = the moment the score was received − ``score.prefill_time`` (the plugin's capture time of the
  last prompt row, i.e. the end of prefill; same host, same clock);
* second token = the moment the client received the chunk that brought the generated-token count to 2
  − ``score.prefill_time``.

One warm-up round, then ``--rounds`` measured rounds. The forecast's weights do not change its cost: with
no artifact for the CLT (``--forecast`` unset and none where ``engine.default_forecast_path`` looks) a
random-weight artifact is written and used, and the output and the JSON say so (``latency_forecast``).
``--model``/``--clt`` may point at another HF folder and transcoder (a smoke run); then the results file
is written only with an explicit ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy.grafana.livecheck import serve_sidecar
from examples.forecast_gateway import OpenAIStream, SidecarForecasts, chunk_tokens_so_far
from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.forecast import random_forecast, save_forecast
from residue_monitor.service.engine import default_forecast_path
from residue_monitor.service.models import PreparedModel, prepare_smollm2, resolve_model
from residue_monitor.service.plugin.launch import VllmServer, free_port, vllm_command
from residue_monitor.service.training import ensure_default_clt, machine_info, merge_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "prefill_forecast.json"
FORECASTS = ROOT / "service" / "forecasts"
CONCURRENCY, PROMPT_TOKENS, OUTPUT_TOKENS = 16, 128, 32


@dataclass(frozen=True, slots=True)
class Sample:
    """One request's timings, in seconds after the end of its prefill (None: not observed)."""

    latency: float | None
    scored: float | None
    """End of prefill → the sidecar scored it (plugin capture, encoding, gRPC, ingest): the rest of
    ``latency`` is the store write and the client's polling."""
    second_token: float | None
    reason: str
    """Why there is no forecast (empty when there is one)."""


def _one(url: str, model: str, ids: list[int], sidecar: SidecarForecasts, poll_s: float) -> Sample:
    body = {"model": model, "prompt": ids, "max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    stream = OpenAIStream(url, "/v1/completions", body)
    try:
        first = stream.next()
        if first is None:
            return Sample(None, None, None, "the stream ended before its first chunk")
        fc = sidecar.wait(str(first.data["id"]), deadline_s=30.0, poll_s=poll_s)
        chunks = [first, *stream]
    finally:
        stream.close()
    got = [n for c in chunks if (n := chunk_tokens_so_far(c.data)) is not None]
    assert got and max(got) == OUTPUT_TOKENS, f"{first.data['id']}: {max(got, default=0)} output tokens"
    if fc.prefill_time is None:
        return Sample(None, None, None, fc.reason or "the forecast carries no prefill_time")
    second = next(c.received for c in chunks if (chunk_tokens_so_far(c.data) or 0) >= 2)
    scored = None if fc.scored_time is None else fc.scored_time - fc.prefill_time
    return Sample(fc.latency_s, scored, second - fc.prefill_time, "")


def _round(url: str, model: str, rng: random.Random, vocab: int, sidecar: SidecarForecasts,
           poll_s: float) -> list[Sample]:  # fmt: skip
    prompts = [[rng.randrange(100, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(CONCURRENCY)]
    start = threading.Barrier(CONCURRENCY)

    def go(ids: list[int]) -> Sample:
        start.wait()
        return _one(url, model, ids, sidecar, poll_s)

    with ThreadPoolExecutor(CONCURRENCY) as ex:
        return list(ex.map(go, prompts))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _model_and_clt(args: argparse.Namespace) -> tuple[PreparedModel, CrossLayerTranscoder, Path]:
    smollm2 = args.model.lower() == "smollm2"
    model = prepare_smollm2() if smollm2 else resolve_model(args.model)
    if args.clt is not None:
        return model, load_clt(args.clt), args.clt
    if not smollm2:
        raise SystemExit("--clt is required with a --model other than smollm2")
    clt, path = ensure_default_clt("smollm2")
    return model, clt, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="smollm2", help="smollm2, or an HF folder vLLM can serve (smoke run)")
    ap.add_argument("--clt", type=Path, default=None, help="transcoder folder (default: SmolLM2's default)")
    ap.add_argument("--forecast", type=Path, default=None, help="forecast artifact (RESIDUE_FORECAST)")
    ap.add_argument("--poll-ms", type=float, default=2.0)
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default, SmolLM2 only: {RESULTS})")
    args = ap.parse_args(argv)
    model, clt, clt_path = _model_and_clt(args)
    out = args.out or (RESULTS if args.model.lower() == "smollm2" else None)
    vocab = json.loads((model.path / "config.json").read_text())["vocab_size"]
    work = Path(tempfile.mkdtemp(prefix="prefill-latency-"))
    fc_path = args.forecast or default_forecast_path(model.name, clt.clt_id()) or FORECASTS / "none.json"
    label = str(fc_path)
    if not fc_path.is_file():
        if args.forecast is not None:
            raise SystemExit(f"--forecast {args.forecast}: no such file")
        fc_path = save_forecast(
            work / "random-forecast.json",
            random_forecast(model.name, clt.clt_id(), clt.cfg.n_layers, scale=0.01),
        )
        label = "random-weights"
        print(f"no forecast artifact for CLT {clt.clt_id()}: using random weights (latency does not depend "
              "on them)", flush=True)  # fmt: skip
    env = {"RESIDUE_CLT": str(clt_path), "RESIDUE_FORECAST": str(fc_path)}
    samples: list[Sample] = []
    rng = random.Random(0)
    with serve_sidecar(work, env) as side:
        sidecar = SidecarForecasts(side.grpc_target)
        port = free_port()
        argv_, venv = vllm_command(str(model.path), port=port, clt=str(clt_path), target=side.grpc_target,
                                   served_model_name=model.name)  # fmt: skip
        try:
            with VllmServer(argv_, venv, str(args.log_dir / "prefill-latency-vllm.log"), port) as srv:
                _round(srv.url, model.name, rng, vocab, sidecar, args.poll_ms / 1e3)  # warm-up
                for k in range(args.rounds):
                    got = _round(srv.url, model.name, rng, vocab, sidecar, args.poll_ms / 1e3)
                    samples += got
                    ms = [s.latency * 1e3 for s in got if s.latency is not None]
                    p50 = statistics.median(ms) if ms else float("nan")
                    print(f"round {k}: forecast readable p50 {p50:6.1f} ms, max {max(ms, default=0):6.1f} "
                          f"ms ({len(ms)}/{len(got)} with a forecast)", flush=True)  # fmt: skip
        finally:
            sidecar.close()
    timed = [s for s in samples if s.latency is not None and s.second_token is not None]
    missing = [s.reason for s in samples if s.latency is None]
    if not timed:
        raise SystemExit(f"no request got a forecast: {missing[:3]}")
    lat = [s.latency * 1e3 for s in timed if s.latency is not None]
    second = [s.second_token * 1e3 for s in timed if s.second_token is not None]
    scored = [s.scored * 1e3 for s in timed if s.scored is not None]
    before = sum(a < b for a, b in zip(lat, second, strict=True))
    load = {"concurrency": CONCURRENCY, "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
            "rounds": args.rounds, "poll_ms": args.poll_ms, "ask": "once: GetResidue with wait_ms",
            "model": model.name,
            "clt_id": clt.clt_id()}  # fmt: skip
    r: dict[str, Any] = {
        "latency_ms_p50": _pct(lat, 0.5),
        "latency_ms_p99": _pct(lat, 0.99),
        "latency_scored_ms_p50": _pct(scored, 0.5) if scored else None,
        "latency_scored_ms_p99": _pct(scored, 0.99) if scored else None,
        "second_token_ms_p50": _pct(second, 0.5),
        "second_token_ms_p99": _pct(second, 0.99),
        "latency_before_second_token_share": before / len(timed),
        "latency_requests": len(samples),
        "latency_missing": len(missing),
        "latency_forecast": label,
        "latency_load": load,
        "latency_machine": machine_info(),
        "latency_date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    goal = r["latency_ms_p99"] <= 50 and r["latency_ms_p99"] < r["second_token_ms_p50"]
    nan = math.nan
    print(
        f"prefill → forecast readable: p50 {r['latency_ms_p50']:.1f} ms, p99 {r['latency_ms_p99']:.1f} ms "
        f"(prefill → scored in the sidecar: p50 {r['latency_scored_ms_p50'] or nan:.1f} ms, p99 "
        f"{r['latency_scored_ms_p99'] or nan:.1f} ms); prefill → 2nd token: p50 "
        f"{r['second_token_ms_p50']:.1f} ms, p99 {r['second_token_ms_p99']:.1f} ms; readable before the 2nd "
        f"token in {r['latency_before_second_token_share']:.0%} of {len(timed)} requests ({len(missing)} "
        f"without a forecast; forecast: {label}); goal p99 ≤ 50 ms and < 2nd-token p50: "
        f"{'met' if goal else 'NOT met'}"
    )
    if out is not None:
        merge_results(out, r)
        print(f"wrote {out}")
    else:
        print("results not written (a smoke run: pass --out to keep them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
