"""Read and write transcoders in circuit-tracer's on-disk formats.

Layouts (FACTS-clt.md):
- ``transcoder_set``: ``config.yaml`` + ``layer_{i}.safetensors`` with ``W_enc (F, D)``, ``W_dec (F, D)``,
  ``b_enc (F)``, ``b_dec (D)``, optional ``activation_function.threshold (F)`` and ``W_skip (D, D)``.
  SAELens-style files (``W_enc (D, F)``, ``threshold``) are recognised and transposed / renamed.
- ``cross_layer_transcoder``: ``W_enc_{i}.safetensors`` (``W_enc_{i} (F, D)``, ``b_enc_{i}``, ``b_dec_{i}``,
  optional ``threshold_{i}``, and our optional ``W_skip_{i} (D, D)``) + ``W_dec_{i}.safetensors``
  (``W_dec_{i} (F, L-i, D)``).

Every failure raises :class:`CLTFormatError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from residue_monitor.detectors.clt.model import ACTIVATIONS, CLTConfig, CrossLayerTranscoder
from residue_monitor.detectors.exceptions import CLTFormatError

METRICS_FILE = "metrics.json"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CLTFormatError(f"{path}: file missing (expected a safetensors file of the transcoder)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CLTFormatError(f"{path}: not a readable safetensors file ({e}); truncated or corrupt?") from e


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CLTFormatError(f"{path}: tensor {name!r} contains NaN or inf values")


def _expect_shape(path: Path, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise CLTFormatError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")


def _need(path: Path, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise CLTFormatError(f"{path}: tensor {name!r} missing (found {sorted(tensors)})")
    return tensors[name]


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.yaml`` of a transcoder folder, or an inferred one when the file is absent."""
    cfg_path = folder / "config.yaml"
    if cfg_path.is_file():
        try:
            raw = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as e:
            raise CLTFormatError(f"{cfg_path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise CLTFormatError(f"{cfg_path}: expected a mapping at the top level")
        return dict(raw)  # pyright: ignore[reportUnknownArgumentType]
    if (folder / "W_enc_0.safetensors").is_file():
        return {"model_kind": "cross_layer_transcoder"}
    if (folder / "layer_0.safetensors").is_file():
        return {"model_kind": "transcoder_set"}
    raise CLTFormatError(
        f"{folder}: no config.yaml, layer_0.safetensors or W_enc_0.safetensors: not a transcoder folder"
    )


def _layer_files(folder: Path, raw: dict[str, Any], n_hint: int | None) -> list[Path]:
    listed = raw.get("transcoders")
    if listed:
        files: list[Path] = []
        for entry in listed:
            s = str(entry)
            if "://" in s:
                raise CLTFormatError(
                    f"{folder / 'config.yaml'}: transcoder path {s!r} is remote; only local files load here"
                )
            p = Path(s)
            files.append(p if p.is_absolute() else folder / p)
        return files
    n = n_hint if n_hint is not None else len(list(folder.glob("layer_*.safetensors")))
    if n == 0:
        raise CLTFormatError(f"{folder}: no layer_*.safetensors files")
    return [folder / f"layer_{i}.safetensors" for i in range(n)]


def _activation(raw: dict[str, Any], has_threshold: bool, cfg_path: Path) -> tuple[str, int | None]:
    act = raw.get("activation")
    if act is None:
        act = "jumprelu" if has_threshold else "relu"
    act = {"jump_relu": "jumprelu", "top_k": "topk"}.get(str(act), str(act))
    if act not in ACTIVATIONS:
        raise CLTFormatError(f"{cfg_path}: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if act == "jumprelu" and not has_threshold:
        raise CLTFormatError(f"{cfg_path}: activation jumprelu needs threshold tensors in every layer file")
    k = raw.get("k")
    if act == "topk" and k is None:
        raise CLTFormatError(f"{cfg_path}: activation topk needs `k` in config.yaml")
    return act, (int(k) if k is not None else None)


def load_clt(
    path: str | os.PathLike[str],
    *,
    expected_d_model: int | None = None,
    expected_n_layers: int | None = None,
) -> CrossLayerTranscoder:
    """Load a transcoder folder (either layout). Checks shapes, finiteness and, when given, that it fits
    a model of ``expected_d_model`` / ``expected_n_layers``."""
    folder = Path(path)
    if not folder.is_dir():
        raise CLTFormatError(f"{folder}: not a directory (a transcoder is a folder with config.yaml)")
    raw = read_config(folder)
    kind = raw.get("model_kind")
    if kind == "transcoder_set":
        clt = _load_set(folder, raw, expected_n_layers)
    elif kind == "cross_layer_transcoder":
        clt = _load_clt(folder, raw)
    else:
        raise CLTFormatError(
            f"{folder / 'config.yaml'}: model_kind {kind!r}; "
            "expected transcoder_set or cross_layer_transcoder"
        )
    clt.requires_grad_(False)
    if expected_d_model is not None and clt.cfg.d_model != expected_d_model:
        raise CLTFormatError(
            f"{folder}: transcoder d_model is {clt.cfg.d_model}, the model's is {expected_d_model}"
        )
    if expected_n_layers is not None and clt.cfg.n_layers != expected_n_layers:
        raise CLTFormatError(
            f"{folder}: transcoder covers {clt.cfg.n_layers} layers, the model has {expected_n_layers}"
        )
    return clt


def _common_cfg(raw: dict[str, Any], **kw: Any) -> CLTConfig:
    cap = raw.get("norm_cap") or ()
    return CLTConfig(
        model_name=str(raw.get("model_name", "")),
        feature_input_hook=str(raw.get("feature_input_hook", "mlp.hook_in")),
        feature_output_hook=str(raw.get("feature_output_hook", "mlp.hook_out")),
        norm_cap=tuple(float(c) for c in cap),
        **kw,
    )


def _load_set(folder: Path, raw: dict[str, Any], n_hint: int | None) -> CrossLayerTranscoder:
    files = _layer_files(folder, raw, n_hint)
    layers: list[dict[str, torch.Tensor]] = []
    d_model = n_features = None
    for i, f in enumerate(files):
        t = _read_tensors(f)
        _check_finite(f, t)
        b_enc, b_dec = _need(f, t, "b_enc"), _need(f, t, "b_dec")
        F, D = b_enc.shape[0], b_dec.shape[0]
        if d_model is None:
            d_model, n_features = D, F
        elif (n_features, d_model) != (F, D):
            raise CLTFormatError(
                f"{f}: layer {i} has F={F}, d_model={D}; layer 0 has F={n_features}, d_model={d_model}"
            )
        W_enc = _need(f, t, "W_enc")
        if tuple(W_enc.shape) == (D, F) and D != F:  # SAELens / Gemma Scope store (d_in, d_sae)
            W_enc = W_enc.T.contiguous()
        _expect_shape(f, "W_enc", W_enc, (F, D))
        W_dec = _need(f, t, "W_dec")
        _expect_shape(f, "W_dec", W_dec, (F, D))
        layer = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        thr = t.get("activation_function.threshold", t.get("threshold"))
        if thr is not None:
            layer["threshold"] = thr.reshape(-1)
            _expect_shape(f, "threshold", layer["threshold"], (F,))
        if "W_skip" in t:
            _expect_shape(f, "W_skip", t["W_skip"], (D, D))
            layer["W_skip"] = t["W_skip"]
        layers.append(layer)
    assert d_model is not None and n_features is not None
    has_thr = all("threshold" in lay for lay in layers)
    has_skip = all("W_skip" in lay for lay in layers)
    if any("W_skip" in lay for lay in layers) and not has_skip:
        raise CLTFormatError(f"{folder}: W_skip present in some layer files but not all")
    act, k = _activation(raw, has_thr, folder / "config.yaml")
    cfg = _common_cfg(
        raw,
        n_layers=len(files),
        d_model=d_model,
        n_features=n_features,
        model_kind="transcoder_set",
        activation=act,
        k=k,
        skip=has_skip,  # type: ignore[arg-type]
    )
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for i, lay in enumerate(layers):
            clt.W_enc[i].copy_(lay["W_enc"])
            clt.b_enc[i].copy_(lay["b_enc"])
            clt.b_dec[i].copy_(lay["b_dec"])
            clt.W_dec[i].copy_(lay["W_dec"])
            if clt.threshold is not None:
                clt.threshold[i].copy_(lay["threshold"])
            if clt.W_skip is not None:
                clt.W_skip[i].copy_(lay["W_skip"])
    return clt


def _load_clt(folder: Path, raw: dict[str, Any]) -> CrossLayerTranscoder:
    n = len(list(folder.glob("W_enc_*.safetensors")))
    if n == 0:
        raise CLTFormatError(f"{folder}: no W_enc_*.safetensors files")
    enc: list[dict[str, torch.Tensor]] = []
    for i in range(n):
        f = folder / f"W_enc_{i}.safetensors"
        t = _read_tensors(f)
        _check_finite(f, t)
        enc.append(t)
    e0 = _need(folder / "W_enc_0.safetensors", enc[0], "W_enc_0")
    F, D = e0.shape
    for i, t in enumerate(enc):
        f = folder / f"W_enc_{i}.safetensors"
        _expect_shape(f, f"W_enc_{i}", _need(f, t, f"W_enc_{i}"), (F, D))
        _expect_shape(f, f"b_enc_{i}", _need(f, t, f"b_enc_{i}"), (F,))
        _expect_shape(f, f"b_dec_{i}", _need(f, t, f"b_dec_{i}"), (D,))
    has_thr = all(f"threshold_{i}" in t for i, t in enumerate(enc))
    has_skip = all(f"W_skip_{i}" in t for i, t in enumerate(enc))
    act, k = _activation(raw, has_thr, folder / "config.yaml")
    cfg = _common_cfg(
        raw,
        n_layers=n,
        d_model=D,
        n_features=F,
        model_kind="cross_layer_transcoder",
        activation=act,
        k=k,
        skip=has_skip,  # type: ignore[arg-type]
    )
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for i, t in enumerate(enc):
            clt.W_enc[i].copy_(t[f"W_enc_{i}"])
            clt.b_enc[i].copy_(t[f"b_enc_{i}"])
            clt.b_dec[i].copy_(t[f"b_dec_{i}"])
            if clt.threshold is not None:
                clt.threshold[i].copy_(t[f"threshold_{i}"].reshape(-1))
            if clt.W_skip is not None:
                _expect_shape(folder / f"W_enc_{i}.safetensors", f"W_skip_{i}", t[f"W_skip_{i}"], (D, D))
                clt.W_skip[i].copy_(t[f"W_skip_{i}"])
            f = folder / f"W_dec_{i}.safetensors"
            dec = _read_tensors(f)
            _check_finite(f, dec)
            w = _need(f, dec, f"W_dec_{i}")
            _expect_shape(f, f"W_dec_{i}", w, (F, n - i, D))
            clt.W_dec[i].copy_(w)
    return clt


def save_clt(
    clt: CrossLayerTranscoder, path: str | os.PathLike[str], metrics: dict[str, Any] | None = None
) -> Path:
    """Write ``clt`` in circuit-tracer's layout for its kind (atomically: a temp folder renamed into
    place), with ``metrics.json`` beside it when given. Returns the folder."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        cfg = clt.cfg
        raw: dict[str, Any] = {
            "model_kind": cfg.model_kind,
            "model_name": cfg.model_name,
            "feature_input_hook": cfg.feature_input_hook,
            "feature_output_hook": cfg.feature_output_hook,
            "activation": cfg.activation,
            "k": cfg.k if cfg.activation == "topk" else None,
            "norm_cap": list(cfg.norm_cap),
            "clt_id": clt.clt_id(),
        }
        sd = {k: v.detach().contiguous().cpu() for k, v in clt.state_dict().items()}
        if cfg.model_kind == "transcoder_set":
            raw["transcoders"] = [f"layer_{i}.safetensors" for i in range(cfg.n_layers)]
            for i in range(cfg.n_layers):
                t = {
                    "W_enc": sd["W_enc"][i],
                    "W_dec": sd[f"W_dec.{i}"],
                    "b_enc": sd["b_enc"][i],
                    "b_dec": sd["b_dec"][i],
                }
                if "threshold" in sd:
                    t["activation_function.threshold"] = sd["threshold"][i]
                if "W_skip" in sd:
                    t["W_skip"] = sd["W_skip"][i]
                save_file({k: v.contiguous() for k, v in t.items()}, str(tmp / f"layer_{i}.safetensors"))
        else:
            for i in range(cfg.n_layers):
                t = {f"W_enc_{i}": sd["W_enc"][i], f"b_enc_{i}": sd["b_enc"][i], f"b_dec_{i}": sd["b_dec"][i]}
                if "threshold" in sd:
                    t[f"threshold_{i}"] = sd["threshold"][i]
                if "W_skip" in sd:
                    t[f"W_skip_{i}"] = sd["W_skip"][i]
                save_file({k: v.contiguous() for k, v in t.items()}, str(tmp / f"W_enc_{i}.safetensors"))
                save_file({f"W_dec_{i}": sd[f"W_dec.{i}"]}, str(tmp / f"W_dec_{i}.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``metrics.json`` saved beside a transcoder, or None."""
    p = Path(path) / METRICS_FILE
    if not p.is_file():
        return None
    data: dict[str, Any] = json.loads(p.read_text())
    return data
