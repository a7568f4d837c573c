"""The Trace RPC's domain: attribution graphs built in worker processes, off the ingest path.

A graph costs seconds to minutes of CPU and up to gigabytes of memory, so it never runs in the sidecar's
process: ``TraceService`` owns a ``ProcessPoolExecutor`` (spawned workers, each loading the trace model
and its transcoder once through ``service.tracing.worker_init``) and hands it ``TraceJob``s. The event loop
only validates, tokenizes (a tokenizer loaded from the worker's model folder, bounded work), looks the
request up in the store, and awaits the worker's future, so ingest and queries are served meanwhile.

What a call goes through, each refusal a typed error mapped to its status by ``errors.ErrorInterceptor``:

1. Trace is off (no ``RESIDUE_TRACE_MODEL``): ``FailedPrecondition``.
2. The prompt: the request's text with the model's chat template, or the prompt token ids stored for
   ``request_id`` (``NotFound`` if unknown; ``FailedPrecondition`` when the plugin did not send token ids;
   ``ArtifactMismatch`` when the record names another model).
3. Limits, before any worker sees the job: ``RESIDUE_TRACE_MAX_TOKENS`` and the memory estimate against
   ``RESIDUE_TRACE_MAX_BYTES`` (``LimitExceeded``); target token ids outside the vocabulary and
   ``max_feature_nodes`` above ``RESIDUE_TRACE_MAX_FEATURE_NODES`` (``InvalidInput``).
4. Admission: at most ``RESIDUE_TRACE_WORKERS`` jobs run and ``RESIDUE_TRACE_QUEUE`` wait; one more is
   ``LimitExceeded`` (busy). A slot is held until the worker is done with the job, not until the call
   ends, so cancelled calls cannot pile work up behind the bound.
5. The deadline: the earlier of the client's and ``RESIDUE_TRACE_TIMEOUT_S``. The worker stops adding
   features a margin before it and returns a partial graph (its summary says how many features were
   traced); if even that is late, ``DeadlineExceeded`` (or the interceptor's DEADLINE_EXCEEDED).
6. A worker that dies (killed, out of memory) breaks the pool: the call gets ``WorkerUnavailable`` and a
   new pool starts at once. Workers that cannot load the model (``ModelUnavailable``) are retried by the
   first call ``RETRY_START_S`` after the failed start began; calls before that get the same error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any

from residue_monitor.detectors.attribution.graph import GraphConfig, TargetSpec
from residue_monitor.detectors.exceptions import (
    ArtifactMismatch,
    InvalidInput,
    ModelUnavailable,
    ResidueError,
)
from residue_monitor.detectors.request import prompt_ids
from residue_monitor.service.exporter import StatsAccumulator
from residue_monitor.service.server.config import ENV, GiB, ServerConfig
from residue_monitor.service.server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    LimitExceeded,
    WorkerUnavailable,
    status_of,
)
from residue_monitor.service.store import Store
from residue_monitor.service.tracing import (
    TraceJob,
    TraceOutcome,
    WorkerInfo,
    worker_describe,
    worker_init,
    worker_run,
)

logger = logging.getLogger(__name__)

TRACE_OFF = (
    "Trace is off in this sidecar: set RESIDUE_TRACE_MODEL to smollm2, tiny or an HF model folder (the model "
    "the plugin watches), and optionally RESIDUE_CLT to its transcoder, then restart it"
)
MAX_MARGIN_S = 10.0
"""Most time kept back from the deadline for pruning, JSON and the trip back (a quarter of it below 40 s)."""
RETRY_START_S = 30.0
"""A failed worker start is reported, not retried, for this long (each start spawns processes)."""
RESPONSE_OVERHEAD = 64 * 1024
"""Bytes of a TraceResult besides the graph JSON (summary, node lists, names), with room to spare."""


@dataclass(frozen=True, slots=True)
class TraceCall:
    """A checked Trace request (``convert.trace_call``): the prompt's source, the target, the pruning."""

    target: TargetSpec
    prompt: str = ""
    """Prompt text; exactly one of ``prompt`` and ``request_id`` is set."""
    request_id: str = ""
    """A stored request whose opt-in prompt token ids are replayed."""
    tenant: str = ""
    node_threshold: float | None = None
    """None: ``GraphConfig``'s default."""
    edge_threshold: float | None = None
    max_feature_nodes: int = 0
    """0: ``RESIDUE_TRACE_MAX_FEATURE_NODES``."""

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.request_id):
            raise InvalidInput("give exactly one of prompt (non-empty text) and request_id")


@dataclass(frozen=True, slots=True)
class _Workers:
    """A started pool whose workers loaded the model, and what the sidecar needs from it."""

    pool: ProcessPoolExecutor
    info: WorkerInfo
    tok: Any
    """The model's tokenizer (prompt → ids with the chat template; never the model itself)."""
    max_token_chars: int
    """Longest vocabulary entry: a prompt of n UTF-8 bytes has at least n / (4 × this) tokens."""
    tok_lock: threading.Lock
    """One tokenization at a time: a fast tokenizer shared across threads can fail with 'Already borrowed'."""

    def ids(self, prompt: str) -> list[int]:
        """``prompt``'s token ids with the chat template, as the plugin's vLLM would see them (blocking)."""
        with self.tok_lock:
            return prompt_ids(self.tok, prompt, True)


def _load_tokenizer(path: str) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok, max((len(t) for t in tok.get_vocab()), default=1)


def _shutdown(pool: ProcessPoolExecutor) -> None:
    """Stop a pool without waiting: queued jobs are cancelled and running workers terminated (a graph can
    run for minutes; nobody waits for it once the sidecar stops or the pool broke)."""
    pool.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.terminate()


class TraceService:
    """Trace calls → ``TraceOutcome``s, through a pool of worker processes (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, store: Store, stats: StatsAccumulator | None = None) -> None:
        self.cfg = cfg
        self._store = store
        self._stats = stats
        self._starting: asyncio.Task[_Workers] | None = None
        self._started_at = 0.0
        self._in_flight = 0
        self._closed = False
        self.jobs_submitted = 0
        """Jobs handed to a worker since the sidecar started (refused calls never count)."""

    @property
    def enabled(self) -> bool:
        return self.cfg.trace_enabled

    @property
    def in_flight(self) -> int:
        """Jobs a worker is building or that wait for one (cancelled calls count until their job ends)."""
        return self._in_flight

    def worker_pids(self) -> list[int]:
        """Process ids of the running trace workers (empty before they start); for operators and tests."""
        task = self._starting
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return []
        procs = getattr(task.result().pool, "_processes", None) or {}  # the executor keeps no public list
        return [p.pid for p in procs.values() if p.pid is not None and p.is_alive()]

    @property
    def capacity(self) -> int:
        """Jobs admitted at once: ``RESIDUE_TRACE_WORKERS`` running + ``RESIDUE_TRACE_QUEUE`` waiting."""
        return self.cfg.trace_workers + self.cfg.trace_queue

    # ------------------------------------------------------------------------------------ workers

    def warm_up(self) -> None:
        """Start the workers now, in the background, so the first call does not wait for the model."""
        if self.enabled and not self._closed:
            self._workers().add_done_callback(_log_start_failure)

    def _workers(self) -> asyncio.Task[_Workers]:
        """The pool's start task, shared by concurrent callers (a failed one: see ``RETRY_START_S``)."""
        if self._closed:
            raise WorkerUnavailable("the sidecar is stopping; retry on another replica")
        task = self._starting
        now = time.monotonic()
        if (
            task is None
            or (task.done() and task.cancelled())
            or (task.done() and task.exception() is not None and now - self._started_at >= RETRY_START_S)
        ):
            task = self._starting = asyncio.get_running_loop().create_task(self._start())
            self._started_at = now
        return task

    async def _start(self) -> _Workers:
        cfg = self.cfg
        pool = ProcessPoolExecutor(
            cfg.trace_workers,
            mp_context=multiprocessing.get_context("spawn"),  # fork would copy the loop, grpc and locks
            initializer=worker_init,
            initargs=(cfg.trace_model, cfg.clt_path),
        )
        try:
            info: WorkerInfo = await asyncio.wrap_future(pool.submit(worker_describe))
            if info.error:
                raise ModelUnavailable(
                    f"the trace workers could not load {ENV['trace_model']}={cfg.trace_model!r} "
                    f"({ENV['clt_path']}={cfg.clt_path!r}): {info.error}"
                )
            tok, max_chars = await asyncio.to_thread(_load_tokenizer, info.model_path)
        except BrokenProcessPool as e:
            _shutdown(pool)
            raise WorkerUnavailable(
                "a trace worker died while loading the model (out of memory?); the next call tries again"
            ) from e
        except BaseException:
            _shutdown(pool)
            raise
        if self._closed:  # close() ran while the model loaded
            _shutdown(pool)
            raise WorkerUnavailable("the sidecar is stopping")
        logger.info("trace workers ready: %d × model %s, CLT %s", cfg.trace_workers, info.model, info.clt_id)
        return _Workers(pool, info, tok, max_chars, threading.Lock())

    def _restart(self, broken: _Workers) -> None:
        """Replace a broken pool (once, however many calls saw it break) and start the new one now."""
        task = self._starting
        ok = task is not None and task.done() and not task.cancelled() and task.exception() is None
        if ok and task is not None and task.result() is broken:
            self._starting = None
            _shutdown(broken.pool)
            logger.warning("a trace worker died; restarting the trace workers")
            self.warm_up()

    async def close(self) -> None:
        """Stop the workers (sidecar drain): queued jobs are cancelled, running ones terminated."""
        self._closed = True
        task, self._starting = self._starting, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            workers = await task
            _shutdown(workers.pool)

    # ------------------------------------------------------------------------------------ a call

    async def trace(self, call: TraceCall, timeout_s: float | None) -> TraceOutcome:
        """Build the graph ``call`` asks for within ``timeout_s`` (the client's time left; None: none) and
        ``RESIDUE_TRACE_TIMEOUT_S``; counted in ``residue_trace_calls_total`` by status."""
        code = "cancelled"
        try:
            out = await self._trace(call, timeout_s)
            code = "ok"
            return out
        except ResidueError as e:
            code = status_of(e).name.lower()
            raise
        except Exception:  # a bug: the interceptor answers INTERNAL (CancelledError stays "cancelled")
            code = "internal"
            raise
        finally:
            if self._stats is not None:
                self._stats.inc_trace_calls(code)

    async def _trace(self, call: TraceCall, timeout_s: float | None) -> TraceOutcome:
        if not self.enabled:
            raise FailedPrecondition(TRACE_OFF)
        cap = self.cfg.trace_timeout_s
        budget = cap if timeout_s is None else min(max(timeout_s, 0.0), cap)
        end = time.monotonic() + budget
        cm = asyncio.timeout(budget)
        try:
            async with cm:
                workers = await asyncio.shield(self._workers())
                ids, text = await self._prompt(call, workers)
                job = self._job(call, workers, ids, text, end)
                return await self._run(job, workers)
        except TimeoutError as e:
            if not cm.expired():
                raise
            where = "client's deadline" if budget < cap else f"{ENV['trace_timeout_s']}={cap:g} s"
            raise DeadlineExceeded(
                f"Trace did not finish within {budget:.3g} s (the {where}); retry with a longer deadline, a "
                "shorter prompt or fewer max_feature_nodes"
            ) from e

    async def _prompt(self, call: TraceCall, w: _Workers) -> tuple[list[int], str]:
        """(token ids, prompt text for the JSON's metadata): the call's text, or a stored request's ids."""
        cfg = self.cfg
        if call.request_id:
            rec = await self._store.get_record(call.request_id, call.tenant)
            if not rec.prompt_token_ids:
                raise FailedPrecondition(
                    f"request {call.request_id!r} was stored without its prompt token ids, so it cannot be "
                    "replayed: the plugin sends them only when RESIDUE_SEND_TOKEN_IDS=1 (an opt-in, "
                    "DESIGN.md §8); trace its prompt text instead"
                )
            if rec.model and rec.model != w.info.model:
                raise ArtifactMismatch(
                    f"request {call.request_id!r} ran on model {rec.model!r}, but Trace loads "
                    f"{w.info.model!r} ({ENV['trace_model']}): its token ids mean nothing to that model"
                )
            ids = list(rec.prompt_token_ids)
            bad = [t for t in ids if not 0 <= t < w.info.vocab_size]
            if bad:
                raise ArtifactMismatch(
                    f"request {call.request_id!r} has token ids outside the vocabulary of {w.info.model!r} "
                    f"(size {w.info.vocab_size}), e.g. {bad[0]}"
                )
            return ids, ""
        # A cheap lower bound on the token count first: templating and tokenizing hold the GIL, so a
        # multi-megabyte prompt must not reach them (every token covers at most 4 × max_token_chars bytes).
        n_bytes = len(call.prompt.encode("utf-8", "surrogatepass"))
        at_least = math.ceil(n_bytes / (4 * w.max_token_chars))
        if at_least > cfg.trace_max_tokens:
            raise LimitExceeded(self._too_long(f"{n_bytes} bytes, so at least {at_least} tokens"))
        return await asyncio.to_thread(w.ids, call.prompt), call.prompt

    def _too_long(self, size: str) -> str:
        n = self.cfg.trace_max_tokens
        return f"the prompt is {size}, over the {n} that {ENV['trace_max_tokens']} allows: shorten it"

    def _job(self, call: TraceCall, w: _Workers, ids: list[int], text: str, end: float) -> TraceJob:
        """The job, once the limits allow it (``LimitExceeded`` / ``InvalidInput`` otherwise)."""
        cfg, info = self.cfg, w.info
        if not ids:
            raise InvalidInput("the prompt has no tokens")
        if len(ids) > cfg.trace_max_tokens:
            raise LimitExceeded(self._too_long(f"{len(ids)} tokens (chat template included)"))
        for name in ("token_id", "contrast_token_id"):
            t = getattr(call.target, name)
            if t is not None and not 0 <= t < info.vocab_size:
                raise InvalidInput(f"{name} must be in [0, {info.vocab_size}) for {info.model}, got {t}")
        n_max = call.max_feature_nodes or cfg.trace_max_feature_nodes
        if n_max > cfg.trace_max_feature_nodes:
            raise InvalidInput(
                f"max_feature_nodes is {n_max}; this sidecar allows at most {cfg.trace_max_feature_nodes} "
                f"({ENV['trace_max_feature_nodes']}); 0 means that"
            )
        gcfg = GraphConfig(max_feature_nodes=n_max)
        if call.node_threshold is not None:
            gcfg = replace(gcfg, node_threshold=call.node_threshold)
        if call.edge_threshold is not None:
            gcfg = replace(gcfg, edge_threshold=call.edge_threshold)
        need = info.estimate_bytes(len(ids), gcfg)
        if need > cfg.trace_max_bytes:
            raise LimitExceeded(
                f"this graph would need about {need / GiB:.2f} GiB ({len(ids)} tokens, max_feature_nodes "
                f"{n_max}); {ENV['trace_max_bytes']} allows {cfg.trace_max_bytes / GiB:.2f} GiB: shorten the "
                "prompt or ask for fewer max_feature_nodes"
            )
        if self._in_flight >= self.capacity:
            raise LimitExceeded(
                f"Trace is busy: {self._in_flight} graphs are being built or waiting "
                f"({ENV['trace_workers']}={cfg.trace_workers}, {ENV['trace_queue']}={cfg.trace_queue}); "
                "retry later"
            )
        left = end - time.monotonic()
        margin = min(0.25 * max(left, 0.0), MAX_MARGIN_S)
        return TraceJob(tuple(ids), call.target, gcfg, text, time.time() + left - margin)

    async def _run(self, job: TraceJob, w: _Workers) -> TraceOutcome:
        loop = asyncio.get_running_loop()
        try:
            fut: Future[TraceOutcome] = w.pool.submit(worker_run, job)
        except (BrokenProcessPool, RuntimeError) as e:  # RuntimeError: the pool was shut down meanwhile
            self._restart(w)
            raise WorkerUnavailable("the trace workers are restarting; retry the call") from e
        self._in_flight += 1
        self.jobs_submitted += 1

        def done(_f: Future[TraceOutcome]) -> None:
            # Runs in the pool's thread (or here, if already done): release the slot on the loop's thread.
            with contextlib.suppress(RuntimeError):  # the loop closed first: nothing left to count
                loop.call_soon_threadsafe(self._release)

        fut.add_done_callback(done)
        try:
            out = await asyncio.wrap_future(fut)  # cancelling this cancels a job that has not started
        except BrokenProcessPool as e:
            self._restart(w)
            raise WorkerUnavailable(
                "the trace worker died while building this graph (killed, or out of memory); the workers "
                "were restarted: retry, with a shorter prompt or fewer max_feature_nodes if it happens again"
            ) from e
        except MemoryError as e:
            raise LimitExceeded(
                f"the trace worker ran out of memory; lower {ENV['trace_max_bytes']} or ask for fewer "
                "max_feature_nodes"
            ) from e
        size = len(out.graph_json) + RESPONSE_OVERHEAD
        limit = self.cfg.trace_max_response_bytes
        if size > limit:
            raise LimitExceeded(
                f"the graph's JSON is {len(out.graph_json)} bytes, more than "
                f"{ENV['trace_max_response_bytes']}={limit} lets the sidecar send: lower node_threshold / "
                "edge_threshold or max_feature_nodes, or raise the limit (and the client's max receive size)"
            )
        return out

    def _release(self) -> None:
        self._in_flight -= 1


def _log_start_failure(task: asyncio.Task[_Workers]) -> None:
    if task.cancelled():
        return
    e = task.exception()
    if e is not None:
        logger.error("the trace workers did not start: %s", e)


def check_fraction(name: str, v: float) -> float | None:
    """A threshold field of TraceRequest: 0 → None (the default), else it must lie in (0, 1]."""
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise InvalidInput(f"{name} must be in (0, 1], or 0 for the default; got {v}")
    return v or None
