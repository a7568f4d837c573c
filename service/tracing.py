"""Attribution graphs as a job: load a model + transcoder once, trace token ids, package the result.

Used by ``residue trace`` in process and by the sidecar's Trace RPC in a separate worker process
(``worker_init`` / ``worker_describe`` / ``worker_run``: the model loads once per worker; the job, its
outcome and the worker's description are plain frozen dataclasses, so they cross the process boundary by
value).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from residue_monitor.detectors.attribution.draw import draw_graph
from residue_monitor.detectors.attribution.export import format_node_id, save_raw, to_json, write_json
from residue_monitor.detectors.attribution.graph import (
    AttributionGraph,
    GraphConfig,
    ProgressFn,
    TargetSpec,
    build_graph,
    estimate_bytes,
)
from residue_monitor.detectors.attribution.prune import Pruned, prune
from residue_monitor.detectors.attribution.summary import NodeInfo, render_text, summarize
from residue_monitor.detectors.clt.model import CLTConfig
from residue_monitor.detectors.exceptions import InvalidInput, ModelUnavailable, ResidueError
from residue_monitor.detectors.request import _eos_ids, generate, prompt_ids  # pyright: ignore[reportPrivateUsage]
from residue_monitor.service.engine import Engine, load_engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceJob:
    """One graph to build."""

    input_ids: tuple[int, ...]
    target: TargetSpec = field(default_factory=TargetSpec)
    cfg: GraphConfig = field(default_factory=GraphConfig)
    prompt: str = ""
    """The prompt text, for the JSON's metadata (empty when replayed from token ids)."""
    deadline_unix: float | None = None
    """Stop visiting features after this wall-clock time (the RPC's deadline, minus packaging time)."""


@dataclass(frozen=True)
class TraceOutcome:
    """What a trace returns across a process boundary (the Trace RPC's answer, before protobuf)."""

    graph_json: str
    replacement_score: float
    completeness_score: float
    summary: str
    top_features: tuple[NodeInfo, ...]
    top_errors: tuple[NodeInfo, ...]
    n_selected: int
    n_budget: int
    seconds: float
    model: str
    clt_id: str


class Tracer:
    """A model + transcoder loaded for attribution (float32)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.eos = sorted(_eos_ids(engine.model, engine.tok))

    @classmethod
    def load(cls, model_ref: str, clt_path: Path | None = None) -> Tracer:
        return cls(load_engine(model_ref, clt_path))

    @property
    def model_name(self) -> str:
        return self.engine.prepared.name

    @property
    def clt_id(self) -> str:
        return self.engine.clt_id

    def decode(self, token: int) -> str:
        return str(self.engine.tok.decode([token]))

    def ids_for(self, prompt: str, chat: bool = True) -> list[int]:
        return prompt_ids(self.engine.tok, prompt, chat)

    def token_id(self, text_or_id: str) -> int:
        """A token given as an id (``"42"``) or as text that encodes to exactly one token (``" Paris"``)."""
        s = text_or_id.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        ids = self.engine.tok(text_or_id, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InvalidInput(f"{text_or_id!r} is {len(ids)} tokens {ids}; give one token, or its id")
        return int(ids[0])

    def continue_to_stop(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[int], bool]:
        """Generate greedily; return (the ids the final token was read from, the generated tokens, whether
        the model stopped on a stop token). Tracing at those ids with target ``eos`` explains why the model
        stopped where it did: a null output when nothing came before the stop."""
        out = generate(self.engine.model, self.engine.tok, ids, max_new_tokens)
        stopped = bool(out) and out[-1] in self.eos
        return ids + out[:-1], out, stopped

    def estimate_bytes(self, n_pos: int, cfg: GraphConfig) -> int:
        return _estimate(self.engine.clt.cfg, n_pos, cfg)

    def trace(self, job: TraceJob, progress: ProgressFn | None = None) -> tuple[AttributionGraph, Pruned]:
        deadline = None
        if job.deadline_unix is not None:
            deadline = time.monotonic() + (job.deadline_unix - time.time())
        g = build_graph(
            self.engine.model,
            self.engine.clt,
            job.input_ids,
            job.target,
            job.cfg,
            eos_id=self.eos[0] if self.eos else None,
            decode=self.decode,
            progress=progress,
            deadline=deadline,
            clt_id=self.clt_id,
        )
        return g, prune(g.adjacency, g.layout, g.weights, job.cfg.node_threshold, job.cfg.edge_threshold)

    def outcome(self, job: TraceJob, g: AttributionGraph, pruned: Pruned) -> TraceOutcome:
        s = summarize(g, pruned)
        doc = to_json(g, pruned, slug=f"residue-{g.clt_id}", prompt=job.prompt, scan=self.model_name)
        budget = min(job.cfg.max_feature_nodes, int(g.active_features.shape[0]))
        text = render_text(s)
        if s.n_selected < budget:
            why = "no other feature reaches a target, or time ran out"
            text += f"note: {s.n_selected} of {budget} features traced ({why})\n"
        return TraceOutcome(
            graph_json=json.dumps(doc, separators=(",", ":")),  # compact: ~8 % smaller on the wire
            replacement_score=s.replacement_score,
            completeness_score=s.completeness_score,
            summary=text,
            top_features=s.top_features,
            top_errors=s.top_errors,
            n_selected=s.n_selected,
            n_budget=budget,
            seconds=g.seconds,
            model=self.model_name,
            clt_id=g.clt_id,
        )


def _estimate(c: CLTConfig, n_pos: int, cfg: GraphConfig) -> int:
    k = c.k if c.k is not None else max(1, c.n_features // 16)
    return estimate_bytes(n_pos, c.n_layers, c.d_model, c.n_features, k, cfg,
                          c.model_kind == "cross_layer_transcoder")  # fmt: skip


def write_outputs(
    g: AttributionGraph,
    pruned: Pruned,
    prompt: str,
    json_path: Path | None = None,
    raw_path: Path | None = None,
    png_path: Path | None = None,
    slug: str = "",
) -> list[Path]:
    """Write the requested forms of a graph; returns the paths written."""
    out: list[Path] = []
    if json_path is not None:
        out.append(write_json(to_json(g, pruned, slug=slug or json_path.stem, prompt=prompt), json_path))
    if raw_path is not None:
        out.append(save_raw(g, raw_path))
    if png_path is not None:
        out.append(draw_graph(g, png_path, pruned))
    return out


# ---------------------------------------------------------------------------- worker process

_TRACER: Tracer | None = None
_INIT_ERROR: str = ""


def worker_init(model_ref: str, clt_path: str) -> None:
    """ProcessPoolExecutor initializer: load the model once. A failure is kept and reported per job
    (an initializer that raises would break the pool and hide the reason)."""
    global _TRACER, _INIT_ERROR
    logging.basicConfig(level=logging.WARNING)
    try:
        _TRACER = Tracer.load(model_ref, Path(clt_path) if clt_path else None)
    except ResidueError as e:
        _INIT_ERROR = str(e)
    except Exception as e:
        _INIT_ERROR = f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class WorkerInfo:
    """What the sidecar learns from a trace worker before sending it jobs (``worker_describe``)."""

    model: str = ""
    """The prepared model's name (what replayed records must name)."""
    model_path: str = ""
    """Its HF folder: the sidecar loads only the tokenizer from it, to count and template prompts."""
    vocab_size: int = 0
    clt_id: str = ""
    clt: CLTConfig | None = None
    """The transcoder's shape, for :meth:`estimate_bytes` without a round trip to a busy worker."""
    error: str = ""
    """Why the worker has no model (then every other field is empty)."""

    def estimate_bytes(self, n_pos: int, cfg: GraphConfig) -> int:
        """``Tracer.estimate_bytes`` of the worker's tracer, computed where the worker is not."""
        assert self.clt is not None, "a worker that failed to load has no transcoder"
        return _estimate(self.clt, n_pos, cfg)


def worker_describe() -> WorkerInfo:
    """The loaded tracer's model, vocabulary and transcoder shape, or the load error."""
    if _TRACER is None:
        return WorkerInfo(error=_INIT_ERROR or "the trace worker has no model")
    e = _TRACER.engine
    return WorkerInfo(
        model=_TRACER.model_name,
        model_path=str(e.prepared.path),
        vocab_size=int(e.model.config.vocab_size),
        clt_id=_TRACER.clt_id,
        clt=e.clt.cfg,
    )


def node_id(n: NodeInfo) -> str:
    """circuit-tracer's id of a feature, error or logit node, as ``export.node_ids`` writes it into the
    JSON (a token node's id needs its token id, which ``NodeInfo`` does not carry)."""
    if n.kind not in ("feature", "error", "logit"):
        raise InvalidInput(f"node_id covers feature, error and logit nodes, got a {n.kind!r} node")
    # NodeInfo.layer is L for logits; the JSON puts them at L + 1.
    return format_node_id(n.kind, n.layer + (n.kind == "logit"), n.pos, n.feature)


def worker_run(job: TraceJob) -> TraceOutcome:
    """Build, prune and package one graph in the worker process."""
    if _TRACER is None:
        raise ModelUnavailable(
            f"the trace worker could not load its model: {_INIT_ERROR or 'not initialised'}"
        )
    g, pruned = _TRACER.trace(job)
    return _TRACER.outcome(job, g, pruned)
