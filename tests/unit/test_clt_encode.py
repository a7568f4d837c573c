"""Row encoding (what a residue frame carries) and the pieces that feed training."""

from __future__ import annotations

import pytest
import torch

from residue_monitor.detectors.clt.activations import token_windows
from residue_monitor.detectors.clt.encode import encode_rows
from residue_monitor.detectors.clt.model import CLTConfig, random_clt
from residue_monitor.detectors.clt.train import valid_mask


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
def test_encode_rows_matches_dense_math(kind: str) -> None:
    """Top-k ids/values, L0, mass and error ratio equal what the dense encode/reconstruct give."""
    cfg = CLTConfig(n_layers=3, d_model=16, n_features=40, model_kind=kind, activation="relu")  # type: ignore[arg-type]
    clt = random_clt(cfg, seed=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    codes = encode_rows(clt, x, y, k=6)
    dense = [clt.encode(x[i], i) for i in range(3)]
    for i in range(3):
        v, idx = dense[i].topk(6, dim=-1)
        torch.testing.assert_close(codes.values[i], v)
        assert torch.equal(codes.ids[i], idx)
        assert torch.equal(codes.l0[i], (dense[i] > 0).sum(-1))
        torch.testing.assert_close(codes.mass[i], dense[i].sum(-1))
    rec = clt.reconstruct(x)
    torch.testing.assert_close(codes.error_ratio, (y - rec).norm(dim=-1) / y.norm(dim=-1))
    assert bool((codes.values[..., :-1] >= codes.values[..., 1:]).all())


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
@pytest.mark.parametrize("keep", [3, 5])
def test_topk_fast_path_equals_dense_math(kind: str, keep: int) -> None:
    """A TopK transcoder is encoded without dense activations (one topk, decoder rows by id); ids, values,
    L0, mass and error ratio equal the dense encode/reconstruct, also where fewer than k are active."""
    cfg = CLTConfig(n_layers=3, d_model=16, n_features=40, model_kind=kind, k=5)  # type: ignore[arg-type]
    clt = random_clt(cfg, seed=4)
    with torch.no_grad():
        clt.b_enc[1] -= 3.0  # layer 1: most pre-activations negative, so some rows have L0 < k
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    codes = encode_rows(clt, x, y, k=keep)
    dense = [clt.encode(x[i], i) for i in range(3)]
    assert bool((codes.l0[1] < 5).any()), "the test needs rows with fewer than k active features"
    for i in range(3):
        v, idx = dense[i].topk(keep, dim=-1)
        torch.testing.assert_close(codes.values[i], v)
        assert torch.equal(torch.where(v > 0, codes.ids[i], -1), torch.where(v > 0, idx, -1))
        assert torch.equal(codes.l0[i], (dense[i] > 0).sum(-1))
        torch.testing.assert_close(codes.mass[i], dense[i].sum(-1))
    rec = clt.reconstruct(x)
    torch.testing.assert_close(codes.error_ratio, (y - rec).norm(dim=-1) / y.norm(dim=-1))


def test_encode_rows_without_output_has_nan_error() -> None:
    """Without the MLP output the error ratio is NaN (unknown), never a made-up number."""
    clt = random_clt(CLTConfig(n_layers=2, d_model=8, n_features=16, k=4))
    codes = encode_rows(clt, torch.randn(2, 3, 8))
    assert bool(torch.isnan(codes.error_ratio).all())


def test_encode_rows_rejects_wrong_shape() -> None:
    clt = random_clt(CLTConfig(n_layers=2, d_model=8, n_features=16, k=4))
    with pytest.raises(ValueError, match="expects"):
        encode_rows(clt, torch.randn(3, 1, 8))


def test_token_windows_cut_and_drop_short_tails() -> None:
    """Windows are full length; a document's tail shorter than a window is dropped, optional BOS first."""
    wins = list(token_windows(["a" * 25, "b" * 3], lambda t: [ord(c) for c in t], window=10, bos=1))
    assert [len(w) for w in wins] == [10, 10]
    assert all(w[0] == 1 for w in wins)


def test_valid_mask_excludes_first_position_and_massive_tokens() -> None:
    ys = torch.ones(2, 1, 4, 3)
    ys[1, 0, 2] = 100.0
    ok = valid_mask(ys, torch.tensor([5.0, 5.0]))
    assert ok[:, 0, 0].tolist() == [False, False]
    assert ok[0, 0].tolist() == [False, True, True, True]
    assert ok[1, 0].tolist() == [False, True, False, True]
