"""The plugin inside a real ``python -m vllm.entrypoints.openai.api_server`` process, on the tiny model.

Frames go to an in-test gRPC sink, so every number the plugin computed can be compared with the HF
reference path (``detectors.capture.generate_and_capture`` + ``SignatureBuilder``) on the same token ids.
The server runs with a small ``--max-num-batched-tokens`` so long prompts are prefilled in chunks, mixed
with other requests' decode rows in the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.plugin.launch import VllmServer, vllm_command
from residue_monitor.service.plugin.sender import BATCH_WAIT_S
from tests.integration.vllm_fixtures import (
    IngestSink,
    assert_parity,
    free_port,
    get,
    need_vllm,
    post,
    request_of,
    tiny_vllm_clt,
    tiny_vllm_model,
)

pytestmark = pytest.mark.vllm

MAX_TOKENS, DECODE_EVERY = 12, 4
LONG = " ".join(
    ["The river runs past the old mill and under the stone bridge before it reaches the sea."] * 8
)
PROMPTS = ["The river runs past", "Alice keeps the key to the blue door", "Seven plus five is", LONG]
CHATS = ["What is the capital of France?", "Count the letters in banana."]
SETTINGS = {"RESIDUE_SAMPLE_DECODE_EVERY": str(DECODE_EVERY), "RESIDUE_SEND_TOKEN_IDS": "1"}
EXTRA = ["--max-num-batched-tokens", "64", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    need_vllm()
    home = tmp_path_factory.mktemp("vllm_home")
    return {"model": tiny_vllm_model(home), "clt": tiny_vllm_clt(home / "clt"), "logs": home}


@pytest.fixture(scope="module")
def tiny_hf_128(setup: dict[str, Any]) -> tuple[Any, Any]:
    from residue_monitor.service.models import load_hf

    return load_hf(Path(setup["model"].path))


@pytest.fixture(scope="module")
def sink() -> Iterator[IngestSink]:
    s = IngestSink()
    s.server.start()
    yield s
    s.server.stop(0)


@pytest.fixture(scope="module")
def server(setup: dict[str, Any], sink: IngestSink) -> Iterator[VllmServer]:
    port = free_port()
    argv, env = vllm_command(str(setup["model"].path), port=port, clt=str(setup["clt"]), dtype="float32",
                             target=f"127.0.0.1:{sink.port}", max_model_len=512, settings=SETTINGS,
                             extra_args=EXTRA)  # fmt: skip
    with VllmServer(argv, env, str(setup["logs"] / "vllm-on.log"), port) as srv:
        yield srv


def _model(srv: VllmServer) -> str:
    return get(srv.url + "/v1/models")["data"][0]["id"]


def _requests(srv: VllmServer) -> list[dict[str, Any]]:
    """Completions and chats, all at once (so prefill chunks and decode rows share steps)."""
    name = _model(srv)
    base = {"model": name, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    calls = [("/v1/completions", {**base, "prompt": p}) for p in PROMPTS]
    calls += [("/v1/chat/completions", {**base, "messages": [{"role": "user", "content": c}]}) for c in CHATS]
    with ThreadPoolExecutor(len(calls)) as ex:
        return list(ex.map(lambda c: post(srv.url + c[0], c[1]), calls))


def test_live_signatures_equal_the_hf_reference(
    server: VllmServer, sink: IngestSink, setup: dict[str, Any], tiny_hf_128: tuple[Any, Any]
) -> None:
    """Every request's frames, keyed by the id the OpenAI API returned, equal the reference signature of
    the same token ids: same rows and phases, same top-k feature ids, values / error ratios / head and
    logit statistics within fp32 tolerance; the generated tokens equal HF's greedy tokens."""
    hf, _tok = tiny_hf_128
    clt = load_clt(setup["clt"])
    builder = SignatureBuilder.for_model(hf, clt, k=32, model=setup["model"].name)
    for resp in _requests(server):
        assert_parity(resp, sink.wait_end(resp["id"]), hf, builder, MAX_TOKENS, DECODE_EVERY)


def test_prefix_cached_prompt_is_recorded_and_still_signed(server: VllmServer, sink: IngestSink) -> None:
    """A repeated long prompt is served from the prefix cache: its RequestStart says how many prompt
    tokens were cached, and its last prompt row is still captured."""
    name = _model(server)
    text = " ".join(["Alice keeps the key to the blue door in a box on the third shelf."] * 10)
    body = {"model": name, "prompt": text, "max_tokens": 3, "temperature": 0}
    first, second = post(server.url + "/v1/completions", body), post(server.url + "/v1/completions", body)
    a, b = sink.wait_end(first["id"]), sink.wait_end(second["id"])
    assert b[0].start.num_cached_tokens >= 64 > a[0].start.num_cached_tokens
    assert next(m.frame.phase for m in b if m.WhichOneof("kind") == "frame") == pb.PHASE_PROMPT_LAST


def test_last_prompt_frame_is_sent_when_prefill_ends(server: VllmServer, sink: IngestSink) -> None:
    """The PROMPT_LAST frame reaches the sidecar without waiting for a batch of rows to fill (the prefill
    forecast needs it early), and every frame carries the time it was captured, in order, inside the
    request's lifetime."""
    body = {"model": _model(server), "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    resp = post(server.url + "/v1/completions", body)
    sink.wait_end(resp["id"])
    got = sink.arrivals(resp["id"])
    start, end = got[0][0].start, got[-1][0].end
    frames = [(m.frame, t) for m, t in got if m.WhichOneof("kind") == "frame"]
    prompt, arrived = frames[0]
    assert prompt.phase == pb.PHASE_PROMPT_LAST
    captured = [f.captured_time.ToNanoseconds() / 1e9 for f, _ in frames]
    assert all(f.HasField("captured_time") for f, _ in frames)
    assert captured == sorted(captured)
    assert start.start_time.ToNanoseconds() / 1e9 - 1 <= captured[0] <= end.end_time.ToNanoseconds() / 1e9
    # Sent at once: before, a batch held its first row for BATCH_WAIT_S to gather more (this request's
    # 24 decode rows never fill MAX_BATCH), so the prompt frame arrived at least that late.
    assert arrived - captured[0] < BATCH_WAIT_S, (arrived - captured[0], captured[-1] - captured[0])


def test_request_ended_by_the_front_end_is_closed(server: VllmServer, sink: IngestSink) -> None:
    """A stop string ends a request in vLLM's front end (detokenizer), which the worker never sees: the
    plugin closes it when it leaves the runner (reported as ABORT, with the tokens it had produced)."""
    base = {"model": _model(server), "prompt": "Quick brown foxes", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    text = post(server.url + "/v1/completions", base)["choices"][0]["text"]
    stop = next(text[i : i + 3] for i in range(len(text) // 2, len(text)) if text[i : i + 3].strip())
    resp = post(server.url + "/v1/completions", {**base, "stop": [stop], "return_token_ids": True})
    assert resp["choices"][0]["finish_reason"] == "stop"
    msgs = sink.wait_end(resp["id"], timeout_s=30)
    assert msgs[-1].end.finish_reason == pb.FINISH_REASON_ABORT
    assert msgs[-1].end.output_tokens >= len(resp["choices"][0]["token_ids"])
    assert msgs[-1].end.output_tokens < 40


def test_status_route_reports_counters(server: VllmServer, sink: IngestSink) -> None:
    """GET /residue/status: capture active, no hook errors, nothing dropped, heads on."""
    _requests(server)
    st = get(server.url + "/residue/status")["workers"][0]
    assert st["active"] is True
    assert st["capture"]["hook_errors"] == {} and st["capture"]["heads_disabled_reason"] == ""
    assert st["capture"]["requests_started"] >= len(PROMPTS) + len(CHATS)
    assert st["sender"]["dropped_queue_full"] == 0 and st["sender"]["encode_errors"] == 0
    reports = sink.plugin_stats()  # the plugin reports its drop counters to the sidecar
    assert reports and {r.instance_id for r in reports} == {reports[0].instance_id}
    assert (reports[-1].queue_full, reports[-1].hook_errors) == (0, 0)


def test_outputs_identical_with_the_kill_switch(
    server: VllmServer, setup: dict[str, Any], sink: IngestSink
) -> None:
    """The same requests on a server whose plugin is killed (RESIDUE_DISABLE=1) give the same tokens,
    and that server reports capture off and sends nothing."""
    on = _requests(server)
    port = free_port()
    argv, env = vllm_command(str(setup["model"].path), port=port, clt=str(setup["clt"]), dtype="float32",
                             target=f"127.0.0.1:{sink.port}", max_model_len=512,
                             settings={**SETTINGS, "RESIDUE_DISABLE": "1"}, extra_args=EXTRA)  # fmt: skip
    with VllmServer(argv, env, str(setup["logs"] / "vllm-killed.log"), port) as killed:
        n_before = len(sink.messages)
        off = _requests(killed)
        st = get(killed.url + "/residue/status")["workers"][0]
    assert [c["choices"][0]["token_ids"] for c in on] == [c["choices"][0]["token_ids"] for c in off]
    assert st == {"active": False, "reason": "RESIDUE_DISABLE is set"}
    assert not any(request_of(m) in {c["id"] for c in off} for m in sink.messages[n_before:])
