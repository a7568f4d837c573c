"""The forecast gateway (examples/forecast_gateway.py) against servers.

Without vLLM: an in-process fake OpenAI server (server-sent events, one chunk every few ms, noting when
the client hangs up) and an in-process fake sidecar (GetResidue answers NOT_FOUND a few times, then a
record) pin the mechanics: abort closes the upstream connection, pass-through forwards every chunk,
NOT_FOUND until the deadline / a sidecar error / an ``unavailable_reason`` pass through, reroute serves
the fallback, the bearer token is sent, and ``--items`` writes its report.

With vLLM (``vllm`` marker): the tiny model with the plugin and a real ``residue serve`` loaded with a
random-weight forecast for the tiny transcoder, its threshold placed (from HF reference signatures of the
same prompts) so that some prompts flag: the gateway aborts the flagged streams (vLLM ends them as ABORT,
short of their budget) and passes the others through; a sidecar without RESIDUE_FORECAST gives "no
forecast" and the gateway passes through.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from examples import forecast_gateway as gw
from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.forecast import PrefillForecast, prefill_row, prefill_vector, random_forecast
from residue_monitor.detectors.forecast import save_forecast as save_fc
from residue_monitor.detectors.request import GenerationConfig, analyze_prompt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.models import load_hf
from residue_monitor.service.plugin.launch import VllmServer, free_port, vllm_command
from tests.integration.vllm_fixtures import SidecarProc, get, need_vllm, tiny_vllm_clt, tiny_vllm_model

N_CHUNKS, CHUNK_GAP_S = 30, 0.02


# ---------------------------------------------------------------------------------------------- fakes
class FakeOpenAI:
    """Streams ``N_CHUNKS`` completion chunks (text ``text``, continuous usage) per POST, ``CHUNK_GAP_S``
    apart, under ids cmpl-0, cmpl-1, …; records each request's body and how many chunks it wrote before
    the client hung up."""

    def __init__(self, text: str = "Paris") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.written: dict[str, int] = {}
        self.hung_up: dict[str, bool] = {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    rid = f"cmpl-{len(fake.bodies)}"
                    fake.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i in range(N_CHUNKS):
                        piece = text if i == 0 else " x"
                        chunk = {"id": rid, "choices": [{"index": 0, "text": piece}],
                                 "usage": {"completion_tokens": i + 1}}  # fmt: skip
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        fake.written[rid] = i + 1
                        time.sleep(CHUNK_GAP_S)
                    self.wfile.write(b"data: [DONE]\n\n")
                    fake.hung_up[rid] = False
                except OSError:
                    fake.hung_up[rid] = True

            def do_GET(self) -> None:
                out = json.dumps({"data": [{"id": "fake-model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_done(self, rid: str, timeout_s: float = 10.0) -> bool:
        """Whether the client hung up on ``rid`` (waits until its handler has finished)."""
        deadline = time.monotonic() + timeout_s
        while rid not in self.hung_up:
            assert time.monotonic() < deadline, f"{rid} still streaming"
            time.sleep(0.01)
        return self.hung_up[rid]


class FakeSidecar(pb_grpc.ResidueServiceServicer):
    """GetResidue: NOT_FOUND ``not_found`` times per request, then the record ``records[id]`` (NOT_FOUND
    forever when there is none)."""

    def __init__(self, not_found: int = 2) -> None:
        self.records: dict[str, pb.ResidueRecord] = {}
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.not_found = not_found
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        pb_grpc.add_ResidueServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def GetResidue(self, request: pb.GetResidueRequest, context: Any) -> pb.ResidueRecord:
        self.metadata.append(dict(context.invocation_metadata()))
        n = self.calls[request.request_id] = self.calls.get(request.request_id, 0) + 1
        rec = self.records.get(request.request_id)
        if rec is None or n <= self.not_found:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no record {request.request_id}")
        assert rec is not None
        return rec

    def score(self, rid: str, p: float, threshold: float = 0.5) -> None:
        rec = pb.ResidueRecord(request_id=rid)
        s = rec.prefill_forecast.score
        s.probability, s.threshold, s.flagged, s.forecast_id = p, threshold, p >= threshold, "f00d"
        s.prefill_time.FromNanoseconds(time.time_ns())
        self.records[rid] = rec

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    f = FakeOpenAI()
    f.thread.start()
    yield f
    f.server.shutdown()
    f.server.server_close()


@pytest.fixture
def sidecar() -> Iterator[FakeSidecar]:
    s = FakeSidecar()
    s.server.start()
    yield s
    s.server.stop(0)


def _gateway(openai: FakeOpenAI, sidecar: FakeSidecar, **policy: Any) -> gw.ForecastGateway:
    return gw.ForecastGateway(openai.url, gw.SidecarForecasts(sidecar.target), gw.Policy(**policy))


BODY = {"model": "fake-model", "prompt": "The capital of France is", "max_tokens": N_CHUNKS}


# ---------------------------------------------------------------------------------------------- fake tests
def test_flagged_stream_is_closed_upstream(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    """A flagged forecast (read after two NOT_FOUNDs) aborts: nothing is forwarded and the upstream
    server sees the client hang up long before its last chunk."""
    sidecar.score("cmpl-0", 0.9)
    gs = _gateway(openai, sidecar, deadline_s=5.0).open("/v1/completions", BODY)
    assert gs.request_id == "cmpl-0" and gs.decision == "abort"
    assert gs.forecast.probability == 0.9 and sidecar.calls["cmpl-0"] == 3
    assert list(gs) == []
    assert openai.wait_done("cmpl-0") and openai.written["cmpl-0"] < N_CHUNKS // 2
    assert openai.bodies[0]["stream"] is True


def test_unflagged_stream_passes_every_chunk(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    """Below the threshold every chunk is forwarded, in order, the first one included."""
    sidecar.score("cmpl-0", 0.1)
    gs = _gateway(openai, sidecar, deadline_s=5.0).open("/v1/completions", BODY)
    assert gs.decision == "pass" and gs.forecast.latency_s is not None and gs.forecast.latency_s >= 0
    chunks = list(gs)
    assert [gw.chunk_tokens_so_far(c) for c in chunks] == list(range(1, N_CHUNKS + 1))
    assert not openai.wait_done("cmpl-0")


def test_policy_threshold_overrides_the_artifact_flag(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    sidecar.score("cmpl-0", 0.3)
    gs = _gateway(openai, sidecar, deadline_s=5.0, threshold=0.25).open("/v1/completions", BODY)
    assert not gs.forecast.flagged and gs.decision == "abort"
    gs.upstream.close()


def test_not_found_until_the_deadline_passes_through(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    """No record by the deadline: no forecast (never a guess), the stream passes whole."""
    t0 = time.monotonic()
    gs = _gateway(openai, sidecar, deadline_s=0.15, poll_s=0.005).open("/v1/completions", BODY)
    waited = time.monotonic() - t0
    assert gs.decision == "pass" and gs.forecast.probability is None
    assert gs.forecast.reason == gw.NOT_FOUND_REASON and sidecar.calls["cmpl-0"] > 3
    assert 0.15 <= waited < 2.0
    assert len(list(gs)) == N_CHUNKS


def test_unavailable_reason_and_sidecar_errors_pass_through(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    """The sidecar's ``unavailable_reason`` and an unreachable sidecar both mean "no forecast": pass."""
    rec = pb.ResidueRecord(request_id="cmpl-0")
    rec.prefill_forecast.unavailable_reason = "no prefill forecast model is loaded"
    sidecar.records["cmpl-0"] = rec
    gs = _gateway(openai, sidecar, deadline_s=5.0).open("/v1/completions", BODY)
    assert gs.decision == "pass" and gs.forecast.reason == "no prefill forecast model is loaded"
    assert len(list(gs)) == N_CHUNKS
    down = gw.ForecastGateway(openai.url, gw.SidecarForecasts(f"127.0.0.1:{free_port()}"),
                              gw.Policy(deadline_s=1.0))  # fmt: skip
    gs = down.open("/v1/completions", BODY)
    assert gs.decision == "pass" and gs.forecast.probability is None and gs.forecast.reason
    assert len(list(gs)) == N_CHUNKS


def test_reroute_serves_the_fallback_and_stops_the_original(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    """Reroute closes the original stream and serves the fallback's chunks for the same body (model
    swapped)."""
    big = FakeOpenAI(text="Big")
    big.thread.start()
    try:
        sidecar.score("cmpl-0", 0.9)
        gate = gw.ForecastGateway(openai.url, gw.SidecarForecasts(sidecar.target),
                                  gw.Policy(action="reroute", deadline_s=5.0),
                                  fallback=gw.openai_fallback(big.url, "big-model"))  # fmt: skip
        gs = gate.open("/v1/completions", BODY)
        assert gs.decision == "reroute"
        chunks = list(gs)
        assert chunks[0]["id"] == "cmpl-0" and gw.chunk_text(chunks[0]) == "Big" and len(chunks) == N_CHUNKS
        assert big.bodies[0]["model"] == "big-model" and big.bodies[0]["prompt"] == BODY["prompt"]
        assert openai.wait_done("cmpl-0")
    finally:
        big.server.shutdown()
        big.server.server_close()


def test_bearer_token_reaches_the_sidecar(openai: FakeOpenAI, sidecar: FakeSidecar) -> None:
    sidecar.score("cmpl-0", 0.1)
    gate = gw.ForecastGateway(openai.url, gw.SidecarForecasts(sidecar.target, token="s3cret"), gw.Policy())
    list(gate.open("/v1/completions", BODY))
    assert sidecar.metadata and all(m["authorization"] == "Bearer s3cret" for m in sidecar.metadata)


def test_items_mode_writes_the_report(openai: FakeOpenAI, sidecar: FakeSidecar, tmp_path: Path) -> None:
    """``--items``: every generation runs to the end; each item gets its label, probability and tokens
    generated after the forecast; the JSON holds the 1 % / 5 % FPR and artifact rows."""
    items = [{"id": f"q{i}", "task": "capitals", "prompt": "Capital of France?", "answers": [a],
              "chat": False} for i, a in enumerate(["Paris", "Paris", "Rome"])]  # fmt: skip
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    sidecar.not_found = 0
    for i, p in enumerate([0.2, 0.6]):  # the third item gets no forecast
        sidecar.score(f"cmpl-{i}", p)
    out = tmp_path / "report.json"
    rc = gw.main(["--base-url", openai.url, "--sidecar", sidecar.target, "--items", str(path), "--out",
                  str(out), "--concurrency", "1", "--deadline-ms", "300"])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    runs = {r["id"]: r for r in doc["runs"]}
    assert [runs[q]["outcome"] for q in ("q0", "q1", "q2")] == ["right", "right", "wrong"]
    assert runs["q0"]["probability"] == 0.2 and runs["q2"]["probability"] is None
    assert runs["q2"]["reason"] == gw.NOT_FOUND_REASON and runs["q2"]["tokens_after_forecast"] is None
    assert all(r["output_tokens"] == N_CHUNKS for r in doc["runs"])
    assert N_CHUNKS - 3 <= runs["q0"]["tokens_after_forecast"] <= N_CHUNKS - 1
    assert [r["name"] for r in doc["report"]] == ["fpr_1%", "fpr_5%", "artifact"]
    art = doc["report"][2]
    assert art["answers_lost"] == 1 and art["failures_caught"] == 0 and art["n_no_forecast"] == 1


# ---------------------------------------------------------------------------------------------- vLLM
MAX_TOKENS = 900
PROMPTS = [
    ("The river runs past the old mill", False),
    ("Alice keeps the key to the blue door", False),
    ("Seven plus five is", False),
    ("Quick brown foxes jump over lazy dogs", False),
    ("On Monday the market opens at nine", False),
    ("She said the meeting was moved", False),
    ("What is the capital of France?", True),
    ("Count the letters in banana.", True),
]


def _random_forecast(vectors: np.ndarray, clt_id: str, n_layers: int, model: str) -> PrefillForecast:
    """Random weights on inputs centred on these prompts' vectors, scaled so logits spread around 0;
    threshold in the widest gap between the probabilities (≥ 2 prompts on each side)."""
    fc = random_forecast(model, clt_id, n_layers, threshold=1.0, seed=3, scale=1.0, mean=vectors.mean(0))
    assert vectors.shape[1] == fc.mean.size
    z = (vectors - fc.mean) @ fc.weights
    fc = replace(fc, weights=fc.weights * 2.0 / max(float(z.std()), 1e-9))
    p = np.sort(fc.probability(vectors))
    gaps = p[2:-1] - p[1:-2]  # between p[i] and p[i+1] for i = 1 … n-3: ≥ 2 below, ≥ 2 above
    i = int(np.argmax(gaps)) + 1
    assert gaps.max() > 0.02, f"random forecast probabilities too close together: {p}"
    return replace(fc, threshold=float((p[i] + p[i + 1]) / 2))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_vllm()
    home = tmp_path_factory.mktemp("gateway")
    model = tiny_vllm_model(home)
    clt_dir = tiny_vllm_clt(home / "clt")
    clt = load_clt(clt_dir)
    hf, tok = load_hf(Path(model.path))
    builder = SignatureBuilder.for_model(hf, clt, k=32, model=model.name)
    gens = [GenerationConfig(max_new_tokens=1, chat=c) for _, c in PROMPTS]
    sigs = [analyze_prompt(hf, tok, builder, p, g).signature for (p, _), g in zip(PROMPTS, gens, strict=True)]
    rows = [prefill_row(s) for s in sigs]
    vectors = np.stack([prefill_vector(r, True) for r in rows])
    fc = _random_forecast(vectors, clt.clt_id(), clt.cfg.n_layers, model.name)
    expected = {
        p: bool(q >= fc.threshold) for (p, _), q in zip(PROMPTS, fc.probability(vectors), strict=True)
    }
    fc_path = save_fc(home / "forecast.json", fc)
    side = SidecarProc(home, {"RESIDUE_CLT": str(clt_dir), "RESIDUE_FORECAST": str(fc_path)}).start()
    vport = free_port()
    argv, env = vllm_command(str(model.path), port=vport, clt=str(clt_dir), target=side.target,
                             dtype="float32", max_model_len=1024)  # fmt: skip
    vllm = VllmServer(argv, env, str(home / "vllm.log"), vport)
    try:
        vllm.start()
        name = get(vllm.url + "/v1/models")["data"][0]["id"]
        yield {"vllm": vllm, "sidecar": side, "home": home, "clt": clt_dir, "forecast": fc,
               "expected": expected, "model": name}  # fmt: skip
    finally:
        vllm.stop()
        side.stop()


def _open(live: dict[str, Any], policy: gw.Policy, prompt: str, chat: bool) -> gw.GatedStream:
    side: SidecarProc = live["sidecar"]
    gate = gw.ForecastGateway(live["vllm"].url, gw.SidecarForecasts(side.target), policy)
    usage = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return gate.open(*gw.openai_request(prompt, chat, live["model"], MAX_TOKENS, ignore_eos=True, **usage))


@pytest.mark.vllm
def test_live_gateway_aborts_flagged_streams_and_passes_the_rest(live: dict[str, Any]) -> None:
    """Each prompt's live forecast comes from the loaded artifact, stamped with its prefill time, and flags
    exactly when its HF reference probability crosses the artifact's threshold; flagged streams are
    aborted (nothing forwarded, the record carries the flag), unflagged ones pass whole and run to their
    budget. Closing the stream stops the generation: a flagged request aborted while it was still
    generating ends as ABORT short of its budget (on a starved CPU the forecast can arrive after a request
    finished, so up to three rounds of the flagged prompts are tried for one such abort)."""
    fc: PrefillForecast = live["forecast"]
    expected: dict[str, bool] = live["expected"]
    side: SidecarProc = live["sidecar"]
    assert 2 <= sum(expected.values()) <= len(PROMPTS) - 2
    stopped_early = 0
    for round_ in range(3):
        for prompt, chat in PROMPTS:
            if round_ and not expected[prompt]:
                continue
            gs = _open(live, gw.Policy(deadline_s=10.0), prompt, chat)
            f = gs.forecast
            assert f.probability is not None, f"{prompt!r}: no forecast ({f.reason})"
            assert f.forecast_id == fc.id and f.threshold == pytest.approx(fc.threshold)
            assert f.flagged == expected[prompt], (prompt, f.probability, fc.threshold)
            assert f.latency_s is not None and 0 <= f.latency_s < 10
            if expected[prompt]:
                assert gs.decision == "abort" and list(gs) == []
                rec = side.get_residue(gs.request_id)
                stopped_early += (
                    rec.finish_reason == pb.FINISH_REASON_ABORT and rec.output_tokens < MAX_TOKENS
                )
            else:
                chunks = list(gs)
                assert gs.decision == "pass"
                assert max(gw.chunk_tokens_so_far(c) or 0 for c in chunks) == MAX_TOKENS
                rec = side.get_residue(gs.request_id)
                assert rec.output_tokens == MAX_TOKENS and rec.finish_reason == pb.FINISH_REASON_LENGTH
            assert rec.prefill_forecast.score.probability == pytest.approx(f.probability)
            assert ("prefill_forecast" in rec.flags) == expected[prompt]
        if stopped_early:
            break
    assert stopped_early, "no aborted stream stopped its generation early in three rounds"


@pytest.mark.vllm
def test_live_sidecar_without_a_forecast_passes_through(live: dict[str, Any]) -> None:
    """The sidecar restarted without RESIDUE_FORECAST (same port; the plugin reconnects): the gateway gets
    no forecast (NOT_FOUND until the deadline, or the sidecar's reason) and passes the stream whole; the
    final record says why there is no forecast. Runs last: it replaces the module's sidecar."""
    old: SidecarProc = live["sidecar"]
    old.stop()
    plain = SidecarProc(live["home"], {"RESIDUE_CLT": str(live["clt"])})
    plain.port = old.port
    live["sidecar"] = plain.start()
    try:
        prompt, chat = next((p, c) for p, c in PROMPTS if live["expected"][p])  # one that would flag
        gs = _open(live, gw.Policy(deadline_s=0.5), prompt, chat)
        assert gs.forecast.probability is None and gs.forecast.reason and gs.decision == "pass"
        chunks = list(gs)
        assert max(gw.chunk_tokens_so_far(c) or 0 for c in chunks) == MAX_TOKENS
        rec = plain.get_residue(gs.request_id)
        assert rec.prefill_forecast.WhichOneof("result") == "unavailable_reason"
        assert "prefill_forecast" not in rec.flags
        late = gw.SidecarForecasts(plain.target).wait(gs.request_id, deadline_s=5.0)
        assert late.probability is None and late.reason == rec.prefill_forecast.unavailable_reason
    finally:
        plain.stop()
