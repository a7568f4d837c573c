"""CLT file formats: circuit-tracer's two layouts written by hand, SAELens orientation, our writer's
round trip, and named errors for every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from residue_monitor.detectors.clt.io import load_clt, save_clt
from residue_monitor.detectors.clt.model import Activation, CLTConfig, ModelKind, random_clt
from residue_monitor.detectors.exceptions import CLTFormatError

L, D, F = 3, 16, 24


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _write_set_by_hand(
    folder: Path,
    *,
    threshold: bool,
    skip: bool,
    saelens: bool = False,
    act: str | None = None,
    k: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Exactly what circuit-tracer's SingleLayerTranscoder.to_safetensors writes, plus its config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = []
    for i in range(L):
        t = {
            "W_enc": _rand(F, D, seed=10 * i) / D**0.5,
            "W_dec": _rand(F, D, seed=10 * i + 1) / F**0.5,
            "b_enc": _rand(F, seed=10 * i + 2) * 0.1,
            "b_dec": _rand(D, seed=10 * i + 3) * 0.1,
        }
        if threshold:
            t["threshold" if saelens else "activation_function.threshold"] = torch.rand(F) * 0.2
        if skip:
            t["W_skip"] = _rand(D, D, seed=10 * i + 4) * 0.05
        on_disk = dict(t)
        if saelens:
            on_disk["W_enc"] = t["W_enc"].T.contiguous()
        save_file(on_disk, str(folder / f"layer_{i}.safetensors"))
        layers.append(t)
    cfg: dict[str, object] = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "transcoders": [f"layer_{i}.safetensors" for i in range(L)],
    }
    if act:
        cfg["activation"] = act
    if k:
        cfg["k"] = k
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return layers


def _write_clt_by_hand(
    folder: Path, threshold: bool
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """circuit-tracer's CrossLayerTranscoder.to_safetensors layout: W_enc_i / W_dec_i files."""
    folder.mkdir(parents=True, exist_ok=True)
    enc, dec = [], []
    for i in range(L):
        e = {
            f"W_enc_{i}": _rand(F, D, seed=i) / D**0.5,
            f"b_enc_{i}": _rand(F, seed=50 + i) * 0.1,
            f"b_dec_{i}": _rand(D, seed=60 + i) * 0.1,
        }
        if threshold:
            e[f"threshold_{i}"] = torch.rand(F) * 0.2
        w = _rand(F, L - i, D, seed=70 + i) / F**0.5
        save_file(e, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": w}, str(folder / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(w)
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_kind": "cross_layer_transcoder",
                "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out",
            }
        )
    )
    return enc, dec


def _manual_set(
    layers: list[dict[str, torch.Tensor]], x: torch.Tensor, act: str, k: int | None = None
) -> torch.Tensor:
    """Independent reference math: (L, n, D) → reconstruction (L, n, D)."""
    outs = []
    for i, t in enumerate(layers):
        pre = x[i] @ t["W_enc"].T + t["b_enc"]
        if act == "jumprelu":
            thr = t.get("activation_function.threshold", t.get("threshold"))
            assert thr is not None
            a = pre * (pre > thr)
        elif act == "topk":
            assert k is not None
            v, idx = pre.topk(k, dim=-1)
            a = torch.zeros_like(pre).scatter(-1, idx, torch.relu(v))
        else:
            a = torch.relu(pre)
        y = a @ t["W_dec"] + t["b_dec"]
        if "W_skip" in t:
            y = y + x[i] @ t["W_skip"].T
        outs.append(y)
    return torch.stack(outs)


@pytest.mark.parametrize(
    ("threshold", "skip", "act", "k"),
    [
        (True, True, None, None),  # JumpReLU inferred from the threshold tensor, like circuit-tracer
        (False, False, None, None),  # plain ReLU
        (False, True, "topk", 5),  # TopK with k from config.yaml
    ],
)
def test_hand_written_transcoder_set_loads_and_computes(
    tmp_path: Path, threshold: bool, skip: bool, act: str | None, k: int | None
) -> None:
    """Files in circuit-tracer's exact transcoder_set layout load, and encode/reconstruct match hand math."""
    layers = _write_set_by_hand(tmp_path / "ts", threshold=threshold, skip=skip, act=act, k=k)
    clt = load_clt(tmp_path / "ts", expected_d_model=D, expected_n_layers=L)
    assert clt.cfg.model_kind == "transcoder_set" and clt.cfg.skip == skip
    expected_act = act or ("jumprelu" if threshold else "relu")
    assert clt.cfg.activation == expected_act
    x = _rand(L, 7, D, seed=99)
    torch.testing.assert_close(
        clt.reconstruct(x), _manual_set(layers, x, expected_act, k), atol=1e-5, rtol=1e-5
    )


def test_saelens_orientation_is_transposed(tmp_path: Path) -> None:
    """A SAELens-style file (W_enc stored (d_in, d_sae), threshold named `threshold`) loads as (F, D)."""
    layers = _write_set_by_hand(tmp_path / "sl", threshold=True, skip=False, saelens=True)
    clt = load_clt(tmp_path / "sl")
    torch.testing.assert_close(clt.W_enc[1], layers[1]["W_enc"])
    x = _rand(L, 4, D, seed=5)
    torch.testing.assert_close(clt.reconstruct(x), _manual_set(layers, x, "jumprelu"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [False, True])
def test_hand_written_cross_layer_transcoder(tmp_path: Path, threshold: bool) -> None:
    """circuit-tracer's CLT layout: layer l's reconstruction sums decoders of all layers i ≤ l."""
    enc, dec = _write_clt_by_hand(tmp_path / "clt", threshold)
    clt = load_clt(tmp_path / "clt")
    assert clt.cfg.model_kind == "cross_layer_transcoder" and clt.cfg.feature_input_hook == "hook_resid_mid"
    x = _rand(L, 6, D, seed=3)
    acts = []
    for i, e in enumerate(enc):
        pre = x[i] @ e[f"W_enc_{i}"].T + e[f"b_enc_{i}"]
        acts.append(pre * (pre > e[f"threshold_{i}"]) if threshold else torch.relu(pre))
    want = torch.stack(
        [
            sum(acts[i] @ dec[i][:, l - i] for i in range(l + 1)) + enc[l][f"b_dec_{l}"]
            for l in range(L)  # type: ignore[misc]
        ]
    )
    torch.testing.assert_close(clt.reconstruct(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_round_trip_keeps_weights_and_id(tmp_path: Path, kind: ModelKind, activation: Activation) -> None:
    """save_clt → load_clt reproduces every tensor, the config and the content id."""
    cfg = CLTConfig(
        n_layers=L,
        d_model=D,
        n_features=F,
        model_kind=kind,
        activation=activation,
        k=4,
        skip=True,
        model_name="m",
        norm_cap=(1.0, 2.0, 3.0),
    )
    clt = random_clt(cfg, seed=1)
    save_clt(clt, tmp_path / "rt", metrics={"fvu_mean": 0.5})
    back = load_clt(tmp_path / "rt")
    assert back.cfg == cfg
    assert back.clt_id() == clt.clt_id()
    for (n1, p1), (n2, p2) in zip(clt.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)


def test_clt_id_changes_with_weights() -> None:
    """Two transcoders that differ in one weight have different ids."""
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, k=4)
    a, b = random_clt(cfg, seed=1), random_clt(cfg, seed=1)
    assert a.clt_id() == b.clt_id()
    with torch.no_grad():
        b.W_dec[2][0, 0] += 1e-3
    assert a.clt_id() != b.clt_id()


# ------------------------------------------------------------------------------------------ bad input
def _good_set(tmp_path: Path) -> Path:
    _write_set_by_hand(tmp_path / "g", threshold=False, skip=True)
    return tmp_path / "g"


def test_missing_layer_file(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    (folder / "layer_1.safetensors").unlink()
    with pytest.raises(CLTFormatError, match=r"layer_1\.safetensors: file missing"):
        load_clt(folder)


def test_wrong_d_model(tmp_path: Path) -> None:
    with pytest.raises(CLTFormatError, match=f"d_model is {D}, the model's is 576"):
        load_clt(_good_set(tmp_path), expected_d_model=576)


def test_wrong_layer_count(tmp_path: Path) -> None:
    with pytest.raises(CLTFormatError, match="covers 3 layers, the model has 30"):
        load_clt(_good_set(tmp_path), expected_n_layers=30)


def test_nan_weights(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    t = {
        "W_enc": torch.full((F, D), float("nan")),
        "W_dec": torch.zeros(F, D),
        "b_enc": torch.zeros(F),
        "b_dec": torch.zeros(D),
        "W_skip": torch.zeros(D, D),
    }
    save_file(t, str(folder / "layer_2.safetensors"))
    with pytest.raises(CLTFormatError, match=r"layer_2\.safetensors: tensor 'W_enc' contains NaN"):
        load_clt(folder)


def test_truncated_file(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    f = folder / "layer_0.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CLTFormatError, match=r"layer_0\.safetensors: not a readable safetensors file"):
        load_clt(folder)


def test_unknown_activation(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["activation"] = "gelu"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CLTFormatError, match="unknown activation 'gelu'"):
        load_clt(folder)


def test_topk_without_k(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["activation"] = "topk"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CLTFormatError, match="topk needs `k`"):
        load_clt(folder)


def test_wrong_decoder_shape(tmp_path: Path) -> None:
    _write_clt_by_hand(tmp_path / "c", threshold=False)
    save_file({"W_dec_1": torch.zeros(F, L, D)}, str(tmp_path / "c" / "W_dec_1.safetensors"))
    with pytest.raises(
        CLTFormatError,
        match=r"W_dec_1\.safetensors: tensor 'W_dec_1' has shape \(24, 3, 16\), expected \(24, 2, 16\)",
    ):
        load_clt(tmp_path / "c")


def test_not_a_transcoder_folder(tmp_path: Path) -> None:
    with pytest.raises(CLTFormatError, match="not a transcoder folder"):
        load_clt(tmp_path)
    with pytest.raises(CLTFormatError, match="not a directory"):
        load_clt(tmp_path / "nope")


def test_remote_paths_refused(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"model_kind": "transcoder_set", "transcoders": ["hf://org/repo/layer_0.safetensors"]})
    )
    with pytest.raises(CLTFormatError, match="remote"):
        load_clt(folder)


def test_unknown_model_kind(tmp_path: Path) -> None:
    folder = _good_set(tmp_path)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "sae"}))
    with pytest.raises(CLTFormatError, match="model_kind 'sae'"):
        load_clt(folder)
