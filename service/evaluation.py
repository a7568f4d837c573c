"""``residue eval``, part 1: generate every labelled item with the model and keep what each run left behind.

For each item of a DESIGN.md §10 JSONL file the HF reference path (``detectors.request.analyze_ids``)
generates greedily and captures the request's residue signature on the fly, exactly the rows and numbers
the live plugin ships for the same token ids; the output is labelled right / wrong / null by the item's
match rule (``shells.match``). Beside the signature each run keeps

* its output-only baselines (token entropies, top-1 probabilities, perplexity, length) from the logits of
  the same generation;
* the raw MLP inputs of a few layers at the last prompt token: the input of the raw-activation probe,
  the strongest non-residue internal baseline residue is measured against.

A run folder holds ``runs.jsonl`` (one line per finished item, appended and flushed as it finishes),
``signatures-NNNN.npz`` and ``raw-NNNN.npz`` (written every ``CHUNK`` runs), and ``config.json``. A run
that is interrupted resumes where its last complete chunk ended: items whose chunk was not written are
generated again, so lines and arrays always agree.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput, NotFound
from residue_monitor.detectors.request import GenerationConfig, analyze_ids, prompt_ids
from residue_monitor.detectors.signature import ResidueSignature, load_signatures, save_signatures
from residue_monitor.service.engine import Engine
from residue_monitor.service.training import machine_info
from residue_monitor.shells.match import outcome

logger = logging.getLogger(__name__)

CHUNK = 100
"""Runs per signature / raw-activation file (the unit of resumption)."""
INSTRUCTION_TASKS = ("gen_instruction", "gen_format")
"""Tasks whose wrong answers are instruction violations rather than wrong facts."""
FAILURE_CLASSES = ("wrong_answer", "null_output", "instruction_violation")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """How ``residue eval`` generates."""

    max_new_tokens: int = 24
    """Generation budget per item (greedy)."""
    decode_every: int = 16
    """Signature rows: every k-th decode token, as the plugin samples by default."""
    raw_layers: tuple[int, ...] = (10, 15, 20)
    """Layers whose raw MLP input at the last prompt token feeds the raw-activation probe."""

    def generation(self, chat: bool) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, decode_every=self.decode_every, chat=chat)


def interleave_tasks(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Items in round-robin task order (each task's own order kept), so that a run stopped early (its
    finished chunks are scored as they are) still covers every task in proportion."""
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for it in items:
        by_task.setdefault(str(it["task"]), []).append(it)
    # Item j of a task with n items sits at fraction (j + ½) / n of the run: short tasks are spread evenly.
    keyed = [((j + 0.5) / len(its), t, j, it) for t, its in by_task.items() for j, it in enumerate(its)]
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed]


def failure_class(task: str, result: str) -> str | None:
    """The failure class of a run (None when it succeeded)."""
    if result == "right":
        return None
    if result == "null":
        return "null_output"
    return "instruction_violation" if task in INSTRUCTION_TASKS else "wrong_answer"


@dataclass(frozen=True, eq=False)
class Runs:
    """Everything a finished run folder holds, aligned by index."""

    lines: list[dict[str, Any]]
    """One record per run (id, task, group, outcome, failure_class, baselines, output, …)."""
    sigs: list[ResidueSignature]
    raw: np.ndarray
    """(n, len(raw_layers), D) float32 raw MLP inputs at the last prompt token."""
    config: dict[str, Any]

    @property
    def y(self) -> np.ndarray:
        """(n,) 1.0 for a failing run (wrong or null), 0.0 for a succeeding one."""
        return np.array([float(x["outcome"] != "right") for x in self.lines])

    @property
    def tasks(self) -> list[str]:
        return [str(x["task"]) for x in self.lines]

    @property
    def groups(self) -> list[str]:
        """CV groups, namespaced by task (a group never spans two tasks)."""
        return [f"{x['task']}/{x.get('group') or x['id']}" for x in self.lines]


def _chunk_name(kind: str, i: int) -> str:
    return f"{kind}-{i:04d}.npz"


def _done_chunks(out: Path) -> int:
    """Complete chunks: both array files exist for 0..k-1."""
    k = 0
    while (out / _chunk_name("signatures", k)).is_file() and (out / _chunk_name("raw", k)).is_file():
        k += 1
    return k


def generate_runs(
    engine: Engine,
    items: Sequence[Mapping[str, Any]],
    out: Path,
    cfg: EvalConfig | None = None,
    progress: Progress | None = None,
) -> Path:
    """Generate every item into the run folder ``out`` (resuming a previous, interrupted run of the same
    items, model and CLT); returns ``out``."""
    cfg = cfg or EvalConfig()
    out.mkdir(parents=True, exist_ok=True)
    n_layers = engine.clt.n_layers
    bad = [layer for layer in cfg.raw_layers if not 0 <= layer < n_layers]
    if bad:
        raise InvalidInput(f"raw_layers {bad} outside the model's {n_layers} layers")
    head = {
        "model": engine.prepared.name,
        "clt_id": engine.clt_id,
        "n_features": engine.clt.cfg.n_features,
        "config": asdict(cfg),
        "items": [str(it["id"]) for it in items],
    }
    head = json.loads(json.dumps(head))  # tuples → lists, as stored
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        same = {k: old.get(k) for k in head} == head
        if not same:
            raise ArtifactMismatch(
                f"{out} holds a run of other items, model, CLT or settings: use a new folder"
            )
    else:
        cfg_path.write_text(json.dumps(head | {"machine": machine_info()}, indent=1) + "\n")
    chunks = _done_chunks(out)
    start = chunks * CHUNK
    lines_path = out / "runs.jsonl"
    kept = _read_lines(lines_path)[:start] if lines_path.is_file() else []
    if len(kept) < start:
        raise InvalidInput(f"{lines_path} has {len(kept)} lines but {chunks} chunks were written")
    lines_path.write_text("".join(json.dumps(x) + "\n" for x in kept))
    t0 = time.perf_counter()
    sigs: dict[str, ResidueSignature] = {}
    raw: list[np.ndarray] = []
    with lines_path.open("a") as f:
        for i in range(start, len(items)):
            line, sig, x = _run_one(engine, items[i], cfg)
            f.write(json.dumps(line, allow_nan=False) + "\n")
            f.flush()
            sigs[line["id"]] = sig
            raw.append(x)
            if len(sigs) == CHUNK or i == len(items) - 1:
                k = i // CHUNK
                save_signatures(out / _chunk_name("signatures", k), sigs)
                np.savez(out / _chunk_name("raw", k), ids=np.array(list(sigs)), x=np.stack(raw))
                sigs, raw = {}, []
            if progress is not None:
                progress(i + 1, len(items))
    logger.info("generated %d runs in %.0f s", len(items) - start, time.perf_counter() - t0)
    return out


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _run_one(
    engine: Engine, item: Mapping[str, Any], cfg: EvalConfig
) -> tuple[dict[str, Any], ResidueSignature, np.ndarray]:
    chat = bool(item.get("chat", True))
    ids = prompt_ids(engine.tok, str(item["prompt"]), chat)
    a = analyze_ids(
        engine.model, engine.tok, engine.builder, ids, cfg.generation(chat), raw_layers=cfg.raw_layers
    )
    result = outcome(a.output_text, list(item["answers"]), str(item.get("match", "contains")))
    task = str(item["task"])
    line = {
        "id": str(item["id"]),
        "task": task,
        "group": str(item.get("group") or item["id"]),
        "source": str(item.get("source", "")),
        "output": a.output_text,
        "outcome": result,
        "failure_class": failure_class(task, result),
        "prompt_tokens": len(ids),
        "output_tokens": len(a.output_ids),
        "stopped": a.signature.stopped,
        "baselines": {k: _finite(v) for k, v in a.baselines.as_dict().items()},
        "detectors": {n: r.score for n, r in a.detectors.items()},
    }
    assert a.raw_mlp_in is not None
    return line, a.signature, a.raw_mlp_in.numpy().astype(np.float32)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    texts = path.read_text().split("\n")  # not splitlines(): outputs may hold U+2028 & co.
    out = []
    for n, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError as e:
            # A line cut by a crash can only be the last one; anything else is corruption.
            if not any(t.strip() for t in texts[n:]):
                break
            raise InvalidInput(f"{path}:{n}: not JSON ({e.msg})") from e
    return out


def load_runs(out: Path) -> Runs:
    """Read a run folder written by ``generate_runs`` (only runs whose chunk was written)."""
    if not (out / "config.json").is_file() or not (out / "runs.jsonl").is_file():
        raise NotFound(
            f"{out} is not an eval run folder (no config.json / runs.jsonl): run `residue eval` first"
        )
    config = json.loads((out / "config.json").read_text())
    chunks = _done_chunks(out)
    lines = _read_lines(out / "runs.jsonl")[: chunks * CHUNK]
    sigs: dict[str, ResidueSignature] = {}
    raw: dict[str, np.ndarray] = {}
    for k in range(chunks):
        sigs.update(load_signatures(out / _chunk_name("signatures", k)))
        with np.load(out / _chunk_name("raw", k), allow_pickle=False) as z:
            for rid, x in zip(z["ids"].tolist(), z["x"], strict=True):
                raw[str(rid)] = x
    missing = [x["id"] for x in lines if x["id"] not in sigs or x["id"] not in raw]
    if missing:
        raise InvalidInput(f"{out}: {len(missing)} runs lack arrays (first: {missing[0]})")
    if not lines:
        raise NotFound(f"{out} holds no finished runs yet")
    return Runs(
        lines=lines,
        sigs=[sigs[x["id"]] for x in lines],
        raw=np.stack([raw[x["id"]] for x in lines]),
        config=config,
    )


def merge_runs(parts: Sequence[Runs]) -> Runs:
    """Shards of one evaluation (``residue eval --shard K/N``) as one run; they must share model, CLT,
    transcoder size and generation settings."""
    if not parts:
        raise InvalidInput("no run folders to merge")
    keys = ("model", "clt_id", "n_features", "config")
    first = {k: parts[0].config.get(k) for k in keys}
    for p in parts[1:]:
        if {k: p.config.get(k) for k in keys} != first:
            raise ArtifactMismatch("run shards differ in model, CLT or generation settings")
    lines = [x for p in parts for x in p.lines]
    if len({x["id"] for x in lines}) != len(lines):
        raise InvalidInput("run shards overlap: an item id occurs in more than one")
    return Runs(
        lines=lines,
        sigs=[s for p in parts for s in p.sigs],
        raw=np.concatenate([p.raw for p in parts]),
        config=parts[0].config | {"items": [x["id"] for x in lines]},
    )
