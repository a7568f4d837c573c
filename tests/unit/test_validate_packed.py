"""PackedResidue frames: accepted when well formed, rejected with a message naming what to fix."""

from __future__ import annotations

import numpy as np
import pytest

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.errors import Rejected
from residue_monitor.service.server.validate import FrameLimits, check_frame

L, H, K = 4, 2, 3
LIMITS = FrameLimits(n_layers=L, n_features=64, max_features_per_layer=8, max_heads=16)


def packed(**over: bytes) -> pb.PackedResidue:
    rng = np.random.default_rng(0)
    heads = np.array([(layer, h, 1.0, 0.1, 0.2, 0.3, 1, 2, 0.4) for layer in range(L) for h in range(H)])
    stats = np.column_stack([rng.uniform(0.1, 0.9, L), np.full(L, K), rng.uniform(1, 5, L),
                             rng.uniform(1, 9, L), rng.uniform(1, 9, L), rng.uniform(0, 1, L)])  # fmt: skip
    fields = {
        "layer_ids": np.arange(L, dtype="<i4").tobytes(),
        "feature_counts": np.full(L, K, dtype="<i4").tobytes(),
        "feature_ids": rng.integers(0, 64, L * K).astype("<i4").tobytes(),
        "feature_values": np.sort(rng.uniform(0.1, 3, L * K))[::-1].astype("<f4").tobytes(),
        "layer_stats": stats.astype("<f4").tobytes(),
        "head_stats": heads.astype("<f4").tobytes(),
    }
    fields.update(over)
    return pb.PackedResidue(**fields)


def frame(p: pb.PackedResidue) -> pb.ResidueFrame:
    return pb.ResidueFrame(request_id="r", position=5, phase=pb.PHASE_PROMPT_LAST, sequence=0, packed=p)


def test_packed_frame_is_read_like_per_layer_messages() -> None:
    """A well-formed PackedResidue gives the Frame arrays: layers, (L, 6) stats, ragged features with
    offsets, (H, 9) heads."""
    f = check_frame(frame(packed()), LIMITS)
    assert f.layers.tolist() == list(range(L))
    assert f.layer_stats.shape == (L, 6) and f.head_stats.shape == (L * H, 9)
    assert f.feature_offsets.tolist() == [0, 3, 6, 9, 12] and f.feature_ids.shape == (L * K,)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"layer_ids": b"\x00\x00\x00"}, "not a multiple of 4"),
        ({"layer_ids": b""}, "layer_ids is empty"),
        ({"layer_ids": np.array([0, 2, 1, 3], "<i4").tobytes()}, "strictly increasing"),
        ({"layer_ids": np.arange(9, dtype="<i4").tobytes()}, "9 layers"),
        ({"feature_counts": np.full(L, K + 1, "<i4").tobytes()}, "sum to 16"),
        ({"feature_counts": np.full(L - 1, K, "<i4").tobytes()}, "feature counts"),
        ({"layer_stats": np.zeros((L, 5), "<f4").tobytes()}, "layer_stats"),
        ({"feature_ids": np.full(L * K, 99, "<i4").tobytes()}, "out of range"),
        ({"head_stats": np.array([[0, 9999, 1, 0, 0, 0, 0, 1, 0]], "<f4").tobytes()}, "head index"),
        ({"head_stats": np.array([[0, 0.5, 1, 0, 0, 0, 0, 1, 0]], "<f4").tobytes()}, "whole numbers"),
        ({"head_stats": np.array([[0, 0, 1, 2.0, 0, 0, 0, 1, 0]], "<f4").tobytes()}, "fractions"),
        ({"head_stats": np.zeros(10, "<f4").tobytes()}, "multiple of 36"),
    ],
)
def test_malformed_packed_frames_are_rejected(over: dict[str, bytes], needle: str) -> None:
    """Wrong byte counts, mismatched counts, unordered or too many layers, ids outside the CLT, huge or
    fractional head indices and out-of-range fractions each raise Rejected with a message saying which."""
    with pytest.raises(Rejected, match=needle):
        check_frame(frame(packed(**over)), LIMITS)


def test_a_frame_with_both_forms_is_rejected() -> None:
    """layers/heads and packed together are ambiguous: rejected."""
    f = frame(packed())
    f.layers.add(layer=0)
    with pytest.raises(Rejected, match="either layers/heads or packed"):
        check_frame(f, LIMITS)
