"""The Trace RPC end to end: an in-process sidecar on port 0 whose trace worker (a spawned process) loads the
tiny model and a random transcoder, and real aio clients.

One sidecar and one worker pool serve the whole module (a spawned worker imports torch and transformers
once, which costs seconds); graphs are kept small (``max_feature_nodes`` 32). No assertion depends on how
long anything takes: where a test needs a worker kept busy, its job waits at a gate the test opens
(``trace_gate.gated_run``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc import aio

from residue_monitor.detectors.attribution.graph import GraphConfig, estimate_bytes
from residue_monitor.detectors.clt.io import load_clt, save_clt
from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, random_clt
from residue_monitor.detectors.request import prompt_ids
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.frames import request_messages
from residue_monitor.service.models import PreparedModel
from residue_monitor.service.server import ServerConfig, Sidecar
from residue_monitor.service.server import trace as trace_module
from residue_monitor.service.server.trace import TraceService
from residue_monitor.service.store import MemoryStore
from tests.integration.trace_gate import GATE, gated_run

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "Alice put the key in the red box. Where is the key now?"
SMALL = 32
"""max_feature_nodes of the quick graphs."""
MAX_TOKENS = 96
MAX_BYTES = 48 << 20
EMITTED = pb.TARGET_KIND_EMITTED_TOKEN


@pytest.fixture(scope="module")
def trace_clt(tmp_path_factory: pytest.TempPathFactory) -> tuple[CrossLayerTranscoder, Path]:
    """A random transcoder_set for the tiny model, saved where RESIDUE_CLT can point."""
    folder = tmp_path_factory.mktemp("trace_clt")
    cfg = CLTConfig(n_layers=4, d_model=64, n_features=96, model_kind="transcoder_set", k=8)
    save_clt(random_clt(cfg, seed=3), folder, {})
    return load_clt(folder), folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sidecar(
    tiny_model: PreparedModel, trace_clt: tuple[CrossLayerTranscoder, Path]
) -> AsyncIterator[Sidecar]:
    """A sidecar with Trace on (one worker, one queued call), shared by the module."""
    clt, folder = trace_clt
    cfg = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, grace_s=1.0,
        trace_model=str(tiny_model.path), clt_path=str(folder), trace_workers=1, trace_queue=1,
        trace_max_tokens=MAX_TOKENS, trace_max_bytes=MAX_BYTES, trace_timeout_s=60.0,
    )  # fmt: skip
    s = Sidecar(cfg, store=MemoryStore(), clt=clt)
    await s.start()
    try:
        yield s
    finally:
        await s.stop(grace_s=0.5, drain_delay_s=0.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(sidecar: Sidecar) -> AsyncIterator[pb_grpc.ResidueServiceStub]:
    async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        yield pb_grpc.ResidueServiceStub(ch)


class Gate:
    """Jobs whose prompt is ``gate.prompt`` wait in the worker until ``open()`` (see trace_gate.py)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="g"))  # short: the path is the prompt, in tokens
        self.path = self.folder / "o"
        self.prompt = GATE + str(self.path)

    def open(self) -> None:
        self.path.touch()


@pytest.fixture()
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """A closed gate, with the sidecar's workers running ``gated_run``; opened after the test whatever
    happened, so no job stays held."""
    monkeypatch.setattr(trace_module, "worker_run", gated_run)
    g = Gate()
    try:
        yield g
    finally:
        g.open()
        shutil.rmtree(g.folder, ignore_errors=True)


def tracer(sidecar: Sidecar) -> TraceService:
    assert sidecar.tracer is not None
    return sidecar.tracer


async def rpc_error(call: Awaitable[Any]) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as ei:
        await call
    return ei.value


def trace(prompt: str = PROMPT, target: int = EMITTED, n: int = SMALL, **kw: Any) -> pb.TraceRequest:
    return pb.TraceRequest(prompt=prompt, target=target, max_feature_nodes=n, **kw)  # type: ignore[arg-type]


async def _until(cond: Callable[[], bool], timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def node_ids(doc: dict[str, Any]) -> set[str]:
    return {n["node_id"] for n in doc["nodes"]}


def logits(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in doc["nodes"] if n["feature_type"] == "logit"]


def check_graph(r: pb.TraceResult, sidecar: Sidecar, tiny_model: PreparedModel) -> dict[str, Any]:
    """The answer's invariants (model and CLT id: the ones the sidecar was given); returns the JSON."""
    doc = json.loads(r.graph_json)
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert doc["nodes"] and doc["links"]
    ids = node_ids(doc)
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert 0 <= r.replacement_score <= 1 and 0 <= r.completeness_score <= 1
    assert r.summary.startswith("target:") and "replacement score" in r.summary
    assert r.top_features and r.top_error_nodes
    assert all(f.feature >= 0 for f in r.top_features) and all(e.feature == -1 for e in r.top_error_nodes)
    # GraphNodeSummary ids are the JSON's: the strongest of each kind is in the pruned graph.
    assert r.top_features[0].node_id in ids and r.top_error_nodes[0].node_id in ids
    f = r.top_features[0]
    assert f.node_id == f"{f.layer}_{f.feature}_{f.position}"
    assert r.model == tiny_model.name
    assert r.clt_id == load_clt(Path(sidecar.cfg.clt_path)).clt_id()
    return doc


# ---- graphs ---------------------------------------------------------------------------------------


async def test_prompt_trace_returns_a_circuit_tracer_graph(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, tiny_model: PreparedModel
) -> None:
    """A prompt traced at the emitted token comes back as circuit-tracer JSON (metadata, qParams, nodes,
    links) with scores in [0, 1], a text summary, the strongest features and error nodes under the ids the
    JSON uses, the model and the CLT id; the call is counted as ok."""
    r = await stub.Trace(trace(), timeout=60)
    doc = check_graph(r, sidecar, tiny_model)
    assert doc["metadata"]["prompt"] == PROMPT
    assert any(n["is_target_logit"] for n in logits(doc))
    assert sidecar.stats.snapshot().trace_calls["ok"] >= 1


async def test_eos_and_contrast_targets(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, tiny_model: PreparedModel, tiny_hf: Any
) -> None:
    """EOS explains the end-of-sequence logit (its node is the target); CONTRAST explains one token's logit
    against another's (a virtual logit past the vocabulary, and the summary says contrast)."""
    model, tok = tiny_hf
    eos = tok.eos_token_id
    r = await stub.Trace(trace(target=pb.TARGET_KIND_EOS), timeout=60)
    doc = check_graph(r, sidecar, tiny_model)
    (target,) = [n for n in logits(doc) if n["is_target_logit"]]
    assert target["feature"] == eos
    key, box = (int(tok(w, add_special_tokens=False)["input_ids"][0]) for w in (" key", " box"))
    pair = pb.ContrastPair(token_id=key, contrast_token_id=box)
    r = await stub.Trace(trace(target=pb.TARGET_KIND_CONTRAST, contrast=pair), timeout=60)
    doc = check_graph(r, sidecar, tiny_model)
    (target,) = [n for n in logits(doc) if n["is_target_logit"]]
    assert target["feature"] >= model.config.vocab_size
    assert "contrast" in r.summary.splitlines()[0]
    r = await stub.Trace(trace(target=pb.TARGET_KIND_TOKEN, token_id=pair.token_id), timeout=60)
    (target,) = [n for n in logits(check_graph(r, sidecar, tiny_model)) if n["is_target_logit"]]
    assert target["feature"] == pair.token_id


@pytest.mark.parametrize(
    ("request_kw", "message"),
    [
        ({"target": pb.TARGET_KIND_UNSPECIFIED}, "TARGET_KIND_UNSPECIFIED"),
        ({"target": 42}, "target must be one of"),
        ({"target": pb.TARGET_KIND_CONTRAST}, "needs contrast"),
        ({"target": pb.TARGET_KIND_CONTRAST, "contrast": pb.ContrastPair(token_id=5, contrast_token_id=5)},
         "two different"),
        ({"target": pb.TARGET_KIND_TOKEN, "token_id": 10**6}, "token_id must be in"),
        ({"target": pb.TARGET_KIND_TOKEN, "token_id": -1}, "token_id must be in"),
        ({"node_threshold": 1.5}, "node_threshold must be in"),
        ({"edge_threshold": math.nan}, "edge_threshold must be in"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"n": 5000}, "RESIDUE_TRACE_MAX_FEATURE_NODES"),
    ],
)  # fmt: skip
async def test_invalid_requests_are_invalid_argument(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, request_kw: dict[str, Any], message: str
) -> None:
    """Each malformed TraceRequest answers INVALID_ARGUMENT saying what to fix, and reaches no worker."""
    before = tracer(sidecar).jobs_submitted
    err = await rpc_error(stub.Trace(trace(**request_kw), timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in (err.details() or "")
    assert tracer(sidecar).jobs_submitted == before


async def test_no_source_is_invalid_argument(stub: pb_grpc.ResidueServiceStub) -> None:
    """A request with neither prompt nor request_id says to set one."""
    err = await rpc_error(stub.Trace(pb.TraceRequest(target=EMITTED), timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in (err.details() or "")


# ---- limits ---------------------------------------------------------------------------------------


async def test_large_requests_are_refused_before_any_work(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, tiny_hf: Any
) -> None:
    """Over RESIDUE_TRACE_MAX_TOKENS (counted with the chat template), a megabyte of text (refused from
    its size, never tokenized), and a graph whose memory estimate exceeds RESIDUE_TRACE_MAX_BYTES all
    answer RESOURCE_EXHAUSTED naming the setting; no job reaches the worker."""
    _, tok = tiny_hf
    before = tracer(sidecar).jobs_submitted
    long = " ".join(["seven bright stones"] * 20)
    assert len(prompt_ids(tok, long)) > MAX_TOKENS
    err = await rpc_error(stub.Trace(trace(long), timeout=60))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RESIDUE_TRACE_MAX_TOKENS" in (err.details() or "") and "tokens" in (err.details() or "")
    err = await rpc_error(stub.Trace(trace("x" * (1 << 20)), timeout=60))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "bytes" in (err.details() or "")

    # A prompt within the token limit whose 1024-feature graph the memory budget refuses, while the
    # 32-feature graph of the same prompt is allowed (estimates as the worker's transcoder gives them).
    words = ["seven bright stones"]
    while len(prompt_ids(tok, " ".join([*words, "seven bright stones"]))) <= MAX_TOKENS:
        words.append("seven bright stones")
    big = " ".join(words)
    n_pos = len(prompt_ids(tok, big))

    def need(n: int) -> int:
        return estimate_bytes(n_pos, 4, 64, 96, 8, GraphConfig(max_feature_nodes=n))

    assert need(SMALL) <= MAX_BYTES < need(1024)
    err = await rpc_error(stub.Trace(trace(big, n=1024), timeout=60))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RESIDUE_TRACE_MAX_BYTES" in (err.details() or "")
    assert tracer(sidecar).jobs_submitted == before
    assert sidecar.stats.snapshot().trace_calls["resource_exhausted"] >= 3


async def test_an_answer_over_the_response_limit_is_resource_exhausted(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph whose JSON is larger than RESIDUE_TRACE_MAX_RESPONSE_BYTES is refused with RESOURCE_EXHAUSTED
    naming the setting; the sidecar's send limit is the larger of that and the message limit, so a real
    graph above the 4 MiB receive limit can still be sent."""
    svc = tracer(sidecar)
    assert sidecar.cfg.trace_max_response_bytes > sidecar.cfg.max_message_bytes
    monkeypatch.setattr(svc, "cfg", dataclasses.replace(svc.cfg, trace_max_response_bytes=2048))
    err = await rpc_error(stub.Trace(trace(), timeout=60))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RESIDUE_TRACE_MAX_RESPONSE_BYTES" in (err.details() or "")


async def test_busy_when_workers_and_queue_are_full(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, gate: Gate
) -> None:
    """With RESIDUE_TRACE_WORKERS=1 and RESIDUE_TRACE_QUEUE=1, a third call while one graph is being built
    and one waits is refused with RESOURCE_EXHAUSTED (busy) and reaches no worker; the two admitted calls
    then finish normally."""
    t = tracer(sidecar)
    await _until(lambda: t.in_flight == 0)
    before = t.jobs_submitted
    held = [asyncio.ensure_future(stub.Trace(trace(gate.prompt), timeout=120)) for _ in range(2)]
    await _until(lambda: t.jobs_submitted == before + 2)
    err = await rpc_error(stub.Trace(trace(), timeout=60))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in (err.details() or "")
    assert t.jobs_submitted == before + 2
    gate.open()
    for r in await asyncio.gather(*held):
        assert json.loads(r.graph_json)["metadata"]["prompt"] == gate.prompt
    await _until(lambda: t.in_flight == 0)


async def test_ingest_and_queries_are_served_while_a_trace_runs(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, tiny_hf: Any, trace_clt: Any, gate: Gate
) -> None:
    """Graphs are built in a worker process: while the worker holds a job, an Ingest stream is stored,
    GetResidue answers it, and the Trace call is still waiting; it completes once the job goes on."""
    model, tok = tiny_hf
    msgs = request_messages(model, tok, trace_clt[0], "Hello there", "during-trace", max_new_tokens=4)
    t = tracer(sidecar)
    await _until(lambda: t.in_flight == 0)
    before = t.jobs_submitted
    held = asyncio.ensure_future(stub.Trace(trace(gate.prompt), timeout=120))
    await _until(lambda: t.jobs_submitted == before + 1)
    summary = await stub.Ingest(iter(msgs), timeout=30)
    assert (summary.requests_ended, summary.rejected) == (1, 0)
    rec = await stub.GetResidue(pb.GetResidueRequest(request_id="during-trace"), timeout=30)
    assert rec.complete
    assert not held.done()
    gate.open()
    assert (await held).graph_json


# ---- replay ---------------------------------------------------------------------------------------


def opted_in(msgs: list[pb.IngestMessage], ids: list[int]) -> list[pb.IngestMessage]:
    """A copy of a request whose RequestStart carries its prompt token ids (RESIDUE_SEND_TOKEN_IDS=1)."""
    out = copy.deepcopy(msgs)
    out[0].start.prompt_token_ids.extend(ids)
    out[0].start.token_ids_opted_in = True
    return out


async def test_replay_by_request_id(
    sidecar: Sidecar,
    stub: pb_grpc.ResidueServiceStub,
    tiny_hf: Any,
    tiny_model: PreparedModel,
    trace_clt: Any,
) -> None:
    """A request stored with opted-in prompt token ids is traced again by its id (and tenant), giving the
    graph the same prompt's text gives; one stored without them is FAILED_PRECONDITION naming
    RESIDUE_SEND_TOKEN_IDS, one recorded for another model is FAILED_PRECONDITION, an unknown id is
    NOT_FOUND."""
    model, tok = tiny_hf
    clt = trace_clt[0]
    ids = prompt_ids(tok, PROMPT)
    base = request_messages(model, tok, clt, PROMPT, "replay-me", model_name=tiny_model.name,
                            tenant="team-a", max_new_tokens=4)  # fmt: skip
    await stub.Ingest(iter(opted_in(base, ids)), timeout=30)
    plain = request_messages(model, tok, clt, PROMPT, "no-ids", model_name=tiny_model.name, max_new_tokens=4)
    await stub.Ingest(iter(plain), timeout=30)
    other = request_messages(model, tok, clt, PROMPT, "other-model", model_name="some-other-model",
                             max_new_tokens=4)  # fmt: skip
    await stub.Ingest(iter(opted_in(other, ids)), timeout=30)

    replayed = await stub.Trace(
        pb.TraceRequest(request_id="replay-me", tenant="team-a", target=EMITTED, max_feature_nodes=SMALL),
        timeout=60,
    )
    check_graph(replayed, sidecar, tiny_model)
    direct = await stub.Trace(trace(), timeout=60)
    assert replayed.replacement_score == pytest.approx(direct.replacement_score, abs=1e-6)
    assert [f.node_id for f in replayed.top_features] == [f.node_id for f in direct.top_features]

    err = await rpc_error(stub.Trace(pb.TraceRequest(request_id="no-ids", target=EMITTED), timeout=60))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "RESIDUE_SEND_TOKEN_IDS" in (err.details() or "")
    err = await rpc_error(stub.Trace(pb.TraceRequest(request_id="other-model", target=EMITTED), timeout=60))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "some-other-model" in (err.details() or "")
    err = await rpc_error(stub.Trace(pb.TraceRequest(request_id="replay-me", target=EMITTED), timeout=60))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # stored under tenant team-a, asked in the default one
    err = await rpc_error(stub.Trace(pb.TraceRequest(request_id="never-seen", target=EMITTED), timeout=60))
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ---- deadlines, failures, off ---------------------------------------------------------------------


async def test_deadlines_end_in_a_partial_graph_or_deadline_exceeded(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, gate: Gate
) -> None:
    """A call whose deadline is shorter than its graph needs answers in time, with a graph (partial ones say
    how many features were traced) or DEADLINE_EXCEEDED, never a hang; one whose job is held past
    its deadline answers DEADLINE_EXCEEDED; either way the worker is free again afterwards."""
    t = tracer(sidecar)
    for timeout in (0.05, 1.0):
        await _until(lambda: t.in_flight == 0)  # an abandoned job holds its slot until the worker is done
        try:
            r = await asyncio.wait_for(stub.Trace(trace(n=1024), timeout=timeout), 30)
        except aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
        else:  # in time: complete, or partial with a note saying how many features were traced
            m = re.search(r"features: (\d+) active, (\d+) traced", r.summary)
            assert m and json.loads(r.graph_json)["nodes"]
            traced, budget = int(m[2]), min(1024, int(m[1]))
            assert traced == budget or f"{traced} of {budget} features traced" in r.summary
    await _until(lambda: t.in_flight == 0)
    err = await rpc_error(asyncio.wait_for(stub.Trace(trace(gate.prompt), timeout=1.0), 30))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.open()
    await _until(lambda: t.in_flight == 0)
    assert (await stub.Trace(trace(), timeout=60)).graph_json


async def test_a_dead_worker_is_unavailable_then_replaced(
    sidecar: Sidecar, stub: pb_grpc.ResidueServiceStub, tiny_model: PreparedModel, gate: Gate
) -> None:
    """A worker killed while it holds a job (as the OOM killer would) fails that call with UNAVAILABLE
    saying the workers restart; a new worker is started and the next call succeeds."""
    t = tracer(sidecar)
    await _until(lambda: t.in_flight == 0 and bool(t.worker_pids()))
    before = t.jobs_submitted
    held = asyncio.ensure_future(stub.Trace(trace(gate.prompt), timeout=120))
    await _until(lambda: t.jobs_submitted == before + 1)
    for pid in t.worker_pids():
        os.kill(pid, signal.SIGKILL)
    err = await rpc_error(held)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "restart" in (err.details() or "")
    check_graph(await stub.Trace(trace(), timeout=120), sidecar, tiny_model)
    assert sidecar.stats.snapshot().trace_calls["unavailable"] == 1


async def test_trace_off_is_failed_precondition() -> None:
    """Without RESIDUE_TRACE_MODEL, Trace answers FAILED_PRECONDITION saying which setting turns it on,
    and no worker process is started."""
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, grace_s=0.5)
    s = Sidecar(cfg, store=MemoryStore())
    await s.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            err = await rpc_error(pb_grpc.ResidueServiceStub(ch).Trace(trace(), timeout=30))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "RESIDUE_TRACE_MODEL" in (err.details() or "")
        assert tracer(s).worker_pids() == [] and tracer(s).jobs_submitted == 0
    finally:
        await s.stop(grace_s=0.5, drain_delay_s=0.0)


async def test_a_model_that_cannot_load_is_failed_precondition(
    tmp_path: Path, trace_clt: tuple[CrossLayerTranscoder, Path]
) -> None:
    """When the trace workers cannot load RESIDUE_TRACE_MODEL, Trace answers FAILED_PRECONDITION with the
    worker's reason (not a broken pool or INTERNAL), and the sidecar keeps serving."""
    (tmp_path / "config.json").write_text("{}")  # passes the settings check, fails in transformers
    clt, folder = trace_clt
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, grace_s=0.5,
                       trace_model=str(tmp_path), clt_path=str(folder))  # fmt: skip
    s = Sidecar(cfg, store=MemoryStore(), clt=clt)
    await s.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            err = await rpc_error(stub.Trace(trace(), timeout=120))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            assert "could not load RESIDUE_TRACE_MODEL" in (err.details() or "")
            err = await rpc_error(stub.GetResidue(pb.GetResidueRequest(request_id="x"), timeout=10))
            assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await s.stop(grace_s=0.5, drain_delay_s=0.0)
