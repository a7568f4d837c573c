"""CLT training pipeline: corpus → token windows → streamed training → held-out metrics → saved folder.

The default SmolLM2 transcoder (used by the demo, CI and the sidecar) is described by
:data:`DEFAULT_SMOLLM2`; it is trained on first use into ``$RESIDUE_HOME/clts/`` and reused after.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from residue_monitor.detectors.clt.activations import batched, decoder_layers, token_windows
from residue_monitor.detectors.clt.io import load_clt, read_metrics, save_clt
from residue_monitor.detectors.clt.metrics import LinearBaseline, evaluate_clt
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.clt.train import ProgressFn, TrainConfig, train_clt
from residue_monitor.service.corpus import (
    BROWN_LICENSE,
    BROWN_PACKAGE,
    BROWN_VERSION,
    brown_documents,
    split_documents,
)
from residue_monitor.service.models import PreparedModel, load_hf, residue_home, resolve_model

logger = logging.getLogger(__name__)

# Chosen by measurement (README "Default CLT"): a per-layer skip transcoder set, F = 1536, k = 32,
# 150 k Brown tokens: trains in ≤ 20 min on 2 cores (README "Default CLT").
DEFAULT_SMOLLM2 = TrainConfig(kind="transcoder_set", n_features=1536, k=32, train_tokens=150_000)
CHAT_EVERY = 3
"""Every CHAT_EVERY-th document is wrapped in the model's chat template (see ``chat_mix``)."""
HELDOUT_WINDOWS = 160  # 160 × 127 scored tokens ≈ 20 k held-out tokens
SPLICE_WINDOWS = 48


def machine_info() -> dict[str, Any]:
    """Where a measurement ran (recorded in every metrics/benchmark JSON)."""
    cpu = platform.processor() or ""
    flags: set[str] = set()
    try:
        info = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines())
        )  # the last processor's entries (all alike)
        cpu = info.get("model name", cpu)
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        # Machines of one model name differ in vector width (AVX-512 or not), and matmul speed with it.
        "simd": next((f for f in ("avx512f", "avx2", "avx") if f in flags), ""),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def clt_dir(model: PreparedModel, tc: TrainConfig) -> Path:
    tag = "set" if tc.kind == "transcoder_set" else "clt"
    # "-chat": trained on the chat-mixed corpus (``chat_mix``); older Brown-only folders are not reused.
    return (
        residue_home()
        / "clts"
        / f"{model.name}-{tag}-F{tc.n_features}-k{tc.k}-t{tc.train_tokens // 1000}k-chat"
    )


def chat_mix(tok: Any, texts: list[str], every: int = CHAT_EVERY, words: int = 40) -> list[str]:
    """Wrap every ``every``-th text in the tokenizer's chat template, as alternating user/assistant turns.

    The monitor reads chat requests, whose last prompt token is a template token (``assistant\\n``); a
    transcoder trained on plain prose reconstructs those positions badly (error ratio ≈ 1 in early layers),
    which flattens the signal at the position that matters most. Each wrapped text is cut into pieces
    of about ``words`` words; pieces alternate user/assistant, two turns per conversation, so template
    tokens (and the default system prompt) recur as they do in live traffic. Tokenizers without a chat
    template get the texts unchanged.
    """
    if every <= 0 or not getattr(tok, "chat_template", None):
        return list(texts)
    out: list[str] = []
    for i, text in enumerate(texts):
        if i % every:
            out.append(text)
            continue
        ws = text.split()
        pieces = [" ".join(ws[j : j + words]) for j in range(0, len(ws), words)]
        convs = []
        for j in range(0, len(pieces) - 1, 2):
            msgs = [{"role": "user", "content": pieces[j]}, {"role": "assistant", "content": pieces[j + 1]}]
            convs.append(tok.apply_chat_template(msgs, tokenize=False))
        out.append("\n".join(convs) if convs else text)
    return out


def _text_windows(tok: Any, texts: list[str], window: int) -> Iterator[list[int]]:
    def enc(t: str) -> list[int]:
        ids: list[int] = tok(t, add_special_tokens=False)["input_ids"]
        return ids

    return token_windows(texts, enc, window)


def heldout_ids(tok: Any, texts: list[str], window: int, n_windows: int) -> torch.Tensor:
    wins = list(itertools.islice(_text_windows(tok, texts, window), n_windows))
    if not wins:
        raise ValueError("held-out text produced no windows")
    return torch.tensor(wins, dtype=torch.long)


def train_and_evaluate(
    model_ref: str,
    tc: TrainConfig,
    out: Path | None = None,
    texts: tuple[list[str], list[str]] | None = None,
    progress: ProgressFn | None = None,
    heldout_windows: int = HELDOUT_WINDOWS,
    splice_windows: int = SPLICE_WINDOWS,
) -> tuple[Path, dict[str, Any]]:
    """Train a transcoder on ``model_ref`` (``smollm2`` | ``tiny`` | folder) and save it with its metrics.

    ``texts``: (train, held-out) texts; default: the Brown corpus, every 20th document held out.
    """
    prepared = resolve_model(model_ref)
    model, tok = load_hf(prepared.path)
    source: dict[str, Any]
    if texts is None:
        train_docs, held_docs = split_documents(brown_documents())
        texts = ([d.text for d in train_docs], [d.text for d in held_docs])
        source = {
            "corpus": f"npm:{BROWN_PACKAGE}@{BROWN_VERSION}",
            "license": BROWN_LICENSE,
            "heldout": "every 20th document",
        }
    else:
        source = {"corpus": "caller-supplied"}
    train_texts, held_texts = chat_mix(tok, texts[0]), chat_mix(tok, texts[1])
    source["chat_mix"] = f"every {CHAT_EVERY}th document in the chat template"
    held = heldout_ids(tok, held_texts, tc.window, heldout_windows)
    probe_ids = held[:16]
    from residue_monitor.detectors.clt.activations import capture_mlp

    probe = capture_mlp(model, probe_ids)
    windows = batched(_text_windows(tok, train_texts, tc.window), tc.chunk_windows)
    L = len(decoder_layers(model))
    linear = LinearBaseline(L, int(model.config.hidden_size))
    res = train_clt(
        model, windows, tc, model_name=prepared.name, probe=probe, progress=progress, linear=linear
    )
    t0 = time.perf_counter()
    metrics = evaluate_clt(model, res.clt, held, linear, splice_windows=splice_windows)
    metrics.update(
        {
            "train_tokens": res.train_tokens,
            "train_seconds": res.train_seconds,
            "capture_seconds": res.capture_seconds,
            "eval_seconds": time.perf_counter() - t0,
            "curve": res.curve,
            "train_left_out_fraction": res.left_out_fraction,
            "train_config": res.config,
            "model": prepared.name,
            "model_sha256": prepared.sha256,
            "data": source,
            "machine": machine_info(),
            "clt_id": res.clt.clt_id(),
        }
    )
    dest = out or clt_dir(prepared, tc)
    save_clt(res.clt, dest, metrics)
    logger.info("saved transcoder %s to %s", metrics["clt_id"], dest)
    return dest, metrics


def default_clt_path(model_ref: str = "smollm2", tc: TrainConfig | None = None) -> tuple[Path, TrainConfig]:
    """Where the default transcoder of ``model_ref`` lives in the cache, and its training config."""
    prepared = resolve_model(model_ref)
    tc = tc or (DEFAULT_SMOLLM2 if "smollm2" in prepared.name.lower() else tiny_train_config())
    return clt_dir(prepared, tc), tc


def ensure_default_clt(
    model_ref: str = "smollm2", progress: ProgressFn | None = None, tc: TrainConfig | None = None
) -> tuple[CrossLayerTranscoder, Path]:
    """Load the default transcoder for ``model_ref``, training it first if the cache has none."""
    dest, tc = default_clt_path(model_ref, tc)
    if not (dest / "config.yaml").is_file():
        train_and_evaluate(model_ref, tc, out=dest, progress=progress)
    return load_clt(dest), dest


def tiny_train_config() -> TrainConfig:
    """A budget that trains a transcoder for the tiny test model in seconds."""
    return replace(
        DEFAULT_SMOLLM2,
        n_features=128,
        k=8,
        train_tokens=6_000,
        batch_tokens=256,
        chunk_windows=16,
        window=64,
        curve_every_tokens=2_000,
        dead_after_tokens=2_000,
        aux_k=32,
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def merge_results(path: Path, data: dict[str, Any]) -> None:
    """Update the keys of ``data`` in the JSON object at ``path``, keeping the others (a results file that
    two commands fill: e.g. the evaluation's accuracy keys and a benchmark's latency keys)."""
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    write_json(path, {**(old if isinstance(old, dict) else {}), **data})


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (benchmarks/results/clt_quality.json keys)."""
    return {
        "fvu_mean": metrics.get("fvu_mean"),
        "linear_baseline_fvu_mean": metrics.get("linear_baseline_fvu_mean"),
        "top1_agreement": metrics.get("top1_agreement"),
        "kl_mean": metrics.get("kl_mean"),
        "l0_mean": metrics.get("l0_mean"),
        "dead_fraction": metrics.get("dead_fraction_mean"),
        "train_seconds": metrics.get("train_seconds"),
    }


def load_metrics(path: Path) -> dict[str, Any]:
    return read_metrics(path) or {}


ProgressFactory = Callable[[str], ProgressFn]
