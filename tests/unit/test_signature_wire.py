"""A signature survives the wire: signature → IngestMessages → validate → assemble → signature."""

from __future__ import annotations

import numpy as np
import pytest

from residue_monitor.detectors.clt.model import CLTConfig, random_clt
from residue_monitor.detectors.request import GenerationConfig, analyze_prompt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.detectors.suite import run_detectors
from residue_monitor.service.frames import signature_messages
from residue_monitor.service.server.assembler import AssemblerLimits, Finalized, replay
from residue_monitor.service.server.residue import to_signature
from residue_monitor.service.server.validate import FrameLimits, to_event


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-layer"])
def test_signature_round_trips_through_frames(tiny_hf, packed: bool) -> None:
    """Every number of every row (features, layer stats incl. unreached, head stats, logit stats), the
    rows' positions and phases and the request facts come back from the frames unchanged (float32), in
    both wire forms (PackedResidue and per-layer messages), so the sidecar's detectors see what the
    offline path saw."""
    model, tok = tiny_hf
    clt = random_clt(CLTConfig(n_layers=4, d_model=64, n_features=128, model_kind="transcoder_set",
                               activation="topk", k=8))  # fmt: skip
    builder = SignatureBuilder.for_model(model, clt, k=8, model="tiny")
    sig = analyze_prompt(
        model, tok, builder, "Where is the key?", GenerationConfig(8, decode_every=3)
    ).signature
    limits = FrameLimits(n_layers=4, n_features=128, clt_id=clt.clt_id())
    events = [
        to_event(m, limits)
        for m in signature_messages(sig, "r1", start_time=1.0, end_time=2.0, packed=packed)
    ]
    _, out = replay([(float(i), e) for i, e in enumerate(events)], AssemblerLimits())
    fin = [o for o in out if isinstance(o, Finalized)]
    assert len(fin) == 1
    back = to_signature(fin[0].request, n_layers=4)
    facts = ("model", "clt_id", "prompt_tokens", "output_tokens", "empty_output", "stopped")
    assert [getattr(back, f) for f in facts] == [getattr(sig, f) for f in facts]
    assert [(r.position, r.phase) for r in back.rows] == [(r.position, r.phase) for r in sig.rows]
    for a, b in zip(sig.rows, back.rows, strict=True):
        active = a.feature_values > 0
        n = active.sum(-1)
        for layer in range(a.n_layers):
            np.testing.assert_array_equal(
                b.feature_ids[layer, : n[layer]], a.feature_ids[layer][active[layer]]
            )
            np.testing.assert_array_equal(
                b.feature_values[layer, : n[layer]], a.feature_values[layer][active[layer]]
            )
        np.testing.assert_array_equal(b.layer_stats, a.layer_stats)
        np.testing.assert_array_equal(b.heads, a.heads)
        np.testing.assert_array_equal(b.logits, a.logits)
    offline, live = run_detectors(sig), run_detectors(back)
    assert {k: v.score for k, v in offline.items()} == {k: v.score for k, v in live.items()}
