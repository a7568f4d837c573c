"""The plugin encodes on the model's device (DESIGN.md §4): on a GPU server the captured rows, the CLT and
the head statistics stay on CUDA until the finished signature is copied out. These tests run the
plugin's encoder path on CUDA and compare it with the CPU path on the same rows. They need a CUDA
device and are skipped without one (they ran on the lent H200: README "On a GPU")."""

from __future__ import annotations

import pytest
import torch

from benchmarks.sender_cost import rows, sender
from residue_monitor.detectors.signature import RowSignature

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rows(device: str, n: int) -> list[RowSignature]:
    """The plugin encoder's signature rows for n captured rows (the frames are built from these)."""
    return list(sender(device)._rows(rows(n, device)))  # pyright: ignore[reportPrivateUsage]


def _t(a: object) -> torch.Tensor:
    return torch.tensor(a)  # a copy: the rows hold read-only arrays


def test_cuda_frames_equal_cpu_frames() -> None:
    """Same rows on CUDA and on the CPU: the same features (ids of every clearly active feature), values,
    error ratios, head and logit statistics within fp32 tolerance."""
    cpu, gpu = _rows("cpu", 8), _rows("cuda", 8)
    assert len(cpu) == len(gpu) == 8
    for ra, rb in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(_t(rb.layer_stats), _t(ra.layer_stats), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(_t(rb.heads), _t(ra.heads), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(_t(rb.logits), _t(ra.logits), rtol=1e-3, atol=1e-5)
        va, vb = _t(ra.feature_values), _t(rb.feature_values)
        torch.testing.assert_close(vb, va, rtol=1e-3, atol=1e-4)
        ia, ib = _t(ra.feature_ids), _t(rb.feature_ids)
        clear = va > va.amax(-1, keepdim=True) * 1e-3  # near-ties at the tail may swap
        assert torch.equal(torch.where(clear, ia, -1), torch.where(clear, ib, -1))


def test_cuda_rows_of_different_lengths_batch_together() -> None:
    """A batch mixes requests at different positions (key lengths) and still encodes on the device."""
    s = sender("cuda")
    msgs = s._messages(rows(16, "cuda"))  # pyright: ignore[reportPrivateUsage]
    assert len(msgs) == 16
    assert sorted({m.frame.position for m in msgs}) == [128, 144, 160, 176]
    assert all(len(m.frame.packed.feature_ids) > 0 for m in msgs)
