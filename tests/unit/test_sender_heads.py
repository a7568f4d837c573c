"""The plugin's encoder computes head statistics of a batch of rows together (keys padded to the longest
row, in chunks): it must give what each row gives alone."""

from __future__ import annotations

import pytest
import torch

from benchmarks.sender_cost import rows, sender
from residue_monitor.detectors.capture import probs_from_qk
from residue_monitor.detectors.signature import head_stats
from residue_monitor.service.plugin import sender as sender_mod
from residue_monitor.service.plugin.capture import RowEvent


def _alone(ev: RowEvent, scale: float) -> torch.Tensor:
    q, keys, pos = ev.q, ev.keys, ev.position
    assert q is not None and keys is not None
    return head_stats(probs_from_qk(q[:, None], keys, (pos,), scale), torch.tensor([pos]))[:, :, 0]


@pytest.mark.parametrize("chunk_keys", [2048, 300, 0])
def test_batched_heads_equal_rows_alone(monkeypatch: pytest.MonkeyPatch, chunk_keys: int) -> None:
    """Rows of different requests and lengths (128..176 keys), in input order; with a small chunk bound
    the rows are split over several chunks (one row alone where it exceeds the bound). On the CPU the
    encoder goes a row at a time (0); the GPU's batched path is forced here on CPU tensors."""
    monkeypatch.setattr(sender_mod, "HEADS_CHUNK_KEYS", chunk_keys)
    s = sender("cpu")
    evs = rows(7, "cpu")[::-1]  # positions 176, 160, …: not sorted
    got = s._heads(evs, batched=chunk_keys > 0)  # pyright: ignore[reportPrivateUsage]
    assert got.shape == (30, 9, 7, 7)
    for r, ev in enumerate(evs):
        torch.testing.assert_close(got[:, :, r], _alone(ev, s.attn_scale), rtol=1e-5, atol=1e-6)


def test_grouped_queries_read_their_key_head() -> None:
    """GQA: query head h reads key head h // (H / H_kv) — checked against repeating the keys."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 2, 9, 4, generator=g)
    pos = (4, 8, 6)
    got = probs_from_qk(q, k, pos, 0.5)
    kr = k.repeat_interleave(3, dim=1)  # (L, H, T, d)
    scores = torch.einsum("lnhd,lhtd->lhnt", q, kr) * 0.5
    future = torch.arange(9)[None, :] > torch.tensor(pos)[:, None]
    want = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    torch.testing.assert_close(got, want)
    per_row = probs_from_qk(q, k[:, None].expand(2, 3, 2, 9, 4), pos, 0.5)  # each row its own keys
    torch.testing.assert_close(per_row, want)
