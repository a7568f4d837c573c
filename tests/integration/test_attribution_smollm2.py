"""Attribution graphs on real data (slow): SmolLM2 with the default transcoder.

The tiny-model oracle (tests/unit/test_attribution.py) proves the algebra; this proves it holds on the
30-layer model with a trained transcoder, massive-activation positions and a chat prompt, and that the
graph means something: the target's influence reaches real tokens through real features.
"""

from __future__ import annotations

import json

import pytest
import torch

from residue_monitor.detectors.attribution.export import to_json
from residue_monitor.detectors.attribution.graph import GraphConfig, TargetSpec
from residue_monitor.detectors.attribution.replacement import LocalReplacement
from residue_monitor.detectors.attribution.summary import summarize
from residue_monitor.service.tracing import TraceJob, Tracer

pytestmark = pytest.mark.slow

PROMPT = "Alice put the key in the red box. Bob moved it to the green box. Where is the key now?"


@pytest.fixture(scope="module")
def tracer() -> Tracer:
    return Tracer.load("smollm2")


def test_replacement_reproduces_smollm2_logits(tracer: Tracer) -> None:
    """With the trained transcoder and its error nodes, the frozen replacement gives SmolLM2's own logits
    at every position of a chat prompt (fp32, 30 layers)."""
    ids = tracer.ids_for(PROMPT)
    rep = LocalReplacement.build(tracer.engine.model, tracer.engine.clt, ids)
    with torch.no_grad():
        ref = tracer.engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(rep.frozen_forward()[1], ref, atol=2e-4, rtol=0)
    assert rep.logits.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_oracle_on_smollm2(tracer: Tracer) -> None:
    """circuit-tracer's oracle on the real model: doubling a traced feature moves every traced feature's
    pre-activation and the target logits by its adjacency column (looser than the tiny model's tolerance:
    30 fp32 layers and pre-activations in the tens)."""
    ids = tracer.ids_for(PROMPT)
    job = TraceJob(tuple(ids), TargetSpec("emitted"), GraphConfig(max_feature_nodes=128, batch_size=64))
    g, _ = tracer.trace(job)
    rep = LocalReplacement.build(tracer.engine.model, tracer.engine.clt, ids)
    l_, p_, f_ = g.active_features[g.selected].unbind(1)
    W_enc, b_enc = rep.clt.W_enc, rep.clt.b_enc

    def targets(acts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xs, logits = rep.frozen_forward(acts)
        pre = (xs[l_, p_] * W_enc[l_, f_]).sum(-1) + b_enc[l_, f_]
        last = logits[-1]
        return pre, torch.stack([last[t.vocab_idx] - last.mean() for t in g.targets])

    pre0, lg0 = targets()
    lay = g.layout
    for j in range(0, lay.n_features, 8):
        acts = rep.acts.clone()
        l, p, f = g.active_features[g.selected[j]].tolist()
        acts[l, p, f] *= 2
        pre, lg = targets(acts)
        col = g.adjacency[:, j]
        torch.testing.assert_close(pre - pre0, col[: lay.n_features], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(lg - lg0, col[lay.logits], atol=1e-4, rtol=1e-3)


def test_smollm2_graph_is_meaningful(tracer: Tracer) -> None:
    """On a real prompt the graph has nonzero replacement and completeness scores, its strongest features
    sit at real positions, the JSON has links, and an EOS trace (the null-output question) runs too."""
    ids = tracer.ids_for(PROMPT)
    cfg = GraphConfig(max_feature_nodes=256)
    g, pruned = tracer.trace(TraceJob(tuple(ids), TargetSpec("emitted"), cfg, prompt=PROMPT))
    assert 0.05 < g.replacement_score < 1 and 0.3 < g.completeness_score <= 1
    s = summarize(g, pruned)
    assert s.top_features and all(0 < n.pos < len(ids) for n in s.top_features)
    doc = json.loads(json.dumps(to_json(g, pruned, prompt=PROMPT)))
    assert len(doc["links"]) > 100
    eos = TraceJob(tuple(ids), TargetSpec("eos"), GraphConfig(max_feature_nodes=64))
    ge, _ = tracer.trace(eos)
    assert [t.vocab_idx for t in ge.targets] == [tracer.eos[0]]


@pytest.mark.asyncio
async def test_trace_rpc_on_smollm2() -> None:
    """The sidecar's Trace call on SmolLM2 with the default transcoder, at the default settings: a full
    graph (over gRPC's 4 MiB default, so the client raises its receive limit) with the scores and top
    nodes of the offline path."""
    from grpc import aio

    from residue_monitor.service._proto import residue_pb2 as pb
    from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
    from residue_monitor.service.server import ServerConfig, Sidecar
    from residue_monitor.service.store import MemoryStore
    from residue_monitor.service.training import default_clt_path

    clt_dir, _ = default_clt_path("smollm2")
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, grace_s=1.0,
                       trace_model="smollm2", clt_path=str(clt_dir))  # fmt: skip
    s = Sidecar(cfg, store=MemoryStore())
    await s.start()
    try:
        opts = [("grpc.max_receive_message_length", cfg.trace_max_response_bytes)]
        async with aio.insecure_channel(f"127.0.0.1:{s.port}", options=opts) as ch:
            r = await pb_grpc.ResidueServiceStub(ch).Trace(
                pb.TraceRequest(prompt=PROMPT, target=pb.TARGET_KIND_EMITTED_TOKEN), timeout=300
            )
    finally:
        await s.stop(grace_s=0.5, drain_delay_s=0.0)
    doc = json.loads(r.graph_json)
    assert len(doc["links"]) > 1000 and doc["metadata"]["prompt"] == PROMPT
    assert 0.05 < r.replacement_score < 1 and r.top_features and r.top_error_nodes
    assert r.model == "SmolLM2-135M-Instruct" and "features traced" not in r.summary  # not cut short
