"""Fingerprints in the live sidecar: an in-process grpc.aio server on port 0 that loads the tiny model's
random TopK transcoder and a fingerprints file (``RESIDUE_FINGERPRINTS``) serves them, scores real
tiny-model frames with them exactly as the offline path scores the same prompt, and refuses to start on
fingerprints fitted with another transcoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpc import aio

from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import ArtifactMismatch
from residue_monitor.detectors.request import GenerationConfig, analyze_prompt
from residue_monitor.detectors.signature import ResidueSignature, SignatureBuilder
from residue_monitor.detectors.suite import run_detectors
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.frames import request_messages
from residue_monitor.service.models import PreparedModel
from residue_monitor.service.server import ServerConfig, Sidecar
from residue_monitor.service.store import MemoryStore
from residue_monitor.shells.fingerprint import Fingerprint, FitConfig, fit_fingerprint, save_fingerprints
from tests.integration.residue_data import (
    N_FEATURES,
    fitted_fingerprints,
    jittered_family,
    save_tiny_transcoder,
)

pytestmark = pytest.mark.asyncio

PROMPT = "Alice put the key in the red box. Bob moved it to the green box. Where is the key now?"
MAX_NEW_TOKENS, DECODE_EVERY = 12, 4
"""What ``request_messages`` is called with; the offline signature must use the same."""
OTHER_CLT_ID = "feedfacefeedface"


@pytest.fixture(scope="module")
def topk_clt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CrossLayerTranscoder]:
    """The random TopK transcoder on disk (the sidecar loads it from there) and as loaded from disk."""
    folder, _ = save_tiny_transcoder(tmp_path_factory.mktemp("clt") / "tiny-topk")
    return folder, load_clt(folder)


@pytest.fixture(scope="module")
def offline_signature(
    tiny_hf: tuple[Any, Any], tiny_model: PreparedModel, topk_clt: tuple[Path, CrossLayerTranscoder]
) -> ResidueSignature:
    """The prompt's signature on the offline reference path, with request_messages' settings."""
    model, tok = tiny_hf
    builder = SignatureBuilder.for_model(model, topk_clt[1], k=32, model=tiny_model.name, with_heads=True)
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, decode_every=DECODE_EVERY)
    return analyze_prompt(model, tok, builder, PROMPT, gen).signature


@pytest.fixture(scope="module")
def fingerprints(
    offline_signature: ResidueSignature,
    topk_clt: tuple[Path, CrossLayerTranscoder],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[Fingerprint]]:
    """Two fingerprints for this CLT and model, fitted on jittered copies of the prompt's own signature:
    the 'family' has a higher layer-2 error ratio and mostly keeps two features the prompt really
    activates, the controls a lower one and mostly lose them. The prompt then scores inside (0, 1) and its
    sparse features count, so live scoring is compared on every kind of input the frames carry."""
    row = offline_signature.row("prompt_last")
    assert row is not None
    hot = [(layer, int(row.feature_ids[layer, 0])) for layer in (1, 3)]
    fps = []
    for i, shift in enumerate((0.05, 0.1)):
        pos = jittered_family(offline_signature, 10 + i, 40, err_shift=shift, hot=hot, p_hot=0.7)
        neg = jittered_family(offline_signature, 20 + i, 60, err_shift=-shift, hot=hot, p_hot=0.3)
        name = f"jitter_{i}"
        fps.append(fit_fingerprint(name, name, pos, neg, N_FEATURES, FitConfig(n_sparse=4)))
    assert any(set(fp.sparse_keys) & set(hot) for fp in fps), "no planted feature was selected"
    path = tmp_path_factory.mktemp("fps") / "fingerprints.json"
    return save_fingerprints(path, fps, meta={"clt_id": topk_clt[1].clt_id()}), fps


MakeSidecar = Callable[[Path, Path], Awaitable[Sidecar]]


@pytest_asyncio.fixture
async def make_sidecar() -> AsyncIterator[MakeSidecar]:
    """Start sidecars on 127.0.0.1:0 with a CLT folder and a fingerprints file; stopped after the test."""
    started: list[Sidecar] = []

    async def make(clt_dir: Path, fingerprints_path: Path) -> Sidecar:
        cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, grace_s=1.0,
                           clt_path=str(clt_dir), fingerprints_path=str(fingerprints_path))  # fmt: skip
        sidecar = Sidecar(cfg, store=MemoryStore())
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield make
    for s in started:
        await s.stop(grace_s=0.5, drain_delay_s=0.0)


async def test_list_fingerprints_serves_the_loaded_file(
    make_sidecar: MakeSidecar,
    topk_clt: tuple[Path, CrossLayerTranscoder],
    fingerprints: tuple[Path, list[Fingerprint]],
) -> None:
    """ListFingerprints answers the file's fingerprints with their threshold, target FPR, model and CLT
    id, beside the built-in thresholded scorer."""
    path, fps = fingerprints
    sidecar = await make_sidecar(topk_clt[0], path)
    async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        listed = await pb_grpc.ResidueServiceStub(ch).ListFingerprints(pb.ListFingerprintsRequest())
    by_name = {f.name: f for f in listed.fingerprints}
    assert set(by_name) == {fp.name for fp in fps} | {"prompt_error_ratio"}
    for fp in fps:
        got = by_name[fp.name]
        assert (got.threshold, got.target_fpr) == (fp.threshold, fp.target_fpr)
        assert (got.clt_id, got.model) == (topk_clt[1].clt_id(), fp.model)


async def test_live_fingerprint_scores_equal_offline_scores(
    make_sidecar: MakeSidecar,
    tiny_hf: tuple[Any, Any],
    topk_clt: tuple[Path, CrossLayerTranscoder],
    fingerprints: tuple[Path, list[Fingerprint]],
    offline_signature: ResidueSignature,
) -> None:
    """A request ingested as frames gets, in its record, the three residue detectors' scores and every
    fingerprint's score equal (±1e-6) to what the offline path computes on the same prompt's signature:
    live and offline scoring agree through the wire format."""
    path, fps = fingerprints
    sidecar = await make_sidecar(topk_clt[0], path)
    model, tok = tiny_hf
    msgs = request_messages(model, tok, topk_clt[1], PROMPT, "req-fp", model_name=offline_signature.model,
                            max_new_tokens=MAX_NEW_TOKENS, decode_every=DECODE_EVERY)  # fmt: skip
    async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        stub = pb_grpc.ResidueServiceStub(ch)
        summary = await stub.Ingest(iter(msgs))
        assert summary.rejected == 0 and summary.requests_ended == 1
        rec = await stub.GetResidue(pb.GetResidueRequest(request_id="req-fp"))
    assert rec.complete and rec.clt_id == topk_clt[1].clt_id()
    offline = run_detectors(offline_signature)
    for name in ("attention", "errors", "nullout"):
        assert rec.detector_scores[name] == pytest.approx(offline[name].score, abs=1e-6), name
    matches = {m.fingerprint: m for m in rec.fingerprint_matches}
    assert set(matches) == {fp.name for fp in fps} | {"prompt_error_ratio"}
    for fp in fps:
        m = matches[fp.name]
        offline_score = fp.score(offline_signature)
        assert 1e-3 < offline_score < 1 - 1e-3, f"{fp.name} saturates ({offline_score}): comparison is void"
        assert m.score == pytest.approx(offline_score, abs=1e-6), fp.name
        assert m.threshold == fp.threshold and m.matched == (m.score >= fp.threshold)
        assert (fp.name in rec.flags) == m.matched


async def test_sidecar_refuses_fingerprints_of_another_clt(
    make_sidecar: MakeSidecar,
    tiny_model: PreparedModel,
    topk_clt: tuple[Path, CrossLayerTranscoder],
    tmp_path: Path,
) -> None:
    """Fingerprints fitted with another transcoder make start() raise ArtifactMismatch naming both ids."""
    path = save_fingerprints(tmp_path / "other.json", fitted_fingerprints(OTHER_CLT_ID, tiny_model.name))
    with pytest.raises(ArtifactMismatch) as ei:
        await make_sidecar(topk_clt[0], path)
    assert OTHER_CLT_ID in str(ei.value) and topk_clt[1].clt_id() in str(ei.value)
