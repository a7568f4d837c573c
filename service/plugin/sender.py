"""The plugin's background half: bounded queues of capture events, encoder threads that turn them into
residue frames (CLT encoding, signature statistics, protobuf), and one gRPC Ingest stream to the sidecar.

The forward thread only calls ``offer`` (``put_nowait``: never waits). When a queue is full the event is
dropped and counted. Two encoder threads:

* the **urgent** one takes request starts and last-prompt rows, at once and at normal priority: the
  sidecar's prefill forecast is only worth something before the answer is generated;
* the **batch** one takes every other row and the request ends, gathering up to ``BATCH_WAIT_S`` so rows
  share one read of the transcoder's weights, at nice ``SENDER_NICE`` so vLLM's threads come first. It
  never encodes a request's event before that request's urgent events are encoded, so the sidecar still
  sees start → prompt row → … → end.

Encoded messages wait in a bounded list for the stream; when it is full the encoders stop taking events
and the queues fill (then new events are dropped and counted). The stream sends what is waiting as one
``IngestBatch`` (a single message alone). The stream keeps one client stream open;
when the sidecar is unreachable it reconnects with exponential backoff (0.1 s → 5 s) and, on reconnect,
first re-sends the RequestStart of every request still open, so a restarted sidecar accepts their later
frames.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from residue_monitor.detectors.capture import probs_from_qk
from residue_monitor.detectors.signature import SignatureBuilder, head_stats
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.frames import frame_message, logit_stats, packed_residue
from residue_monitor.service.plugin.capture import EndEvent, Event, RowEvent, StartEvent

logger = logging.getLogger(__name__)

FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "vanished": pb.FINISH_REASON_ABORT,
}
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
SWEEP_EVERY_S = 1.0
MAX_BATCH = 256
"""Events taken off the queue at once; their rows are encoded together."""
BATCH_WAIT_S = 1.0
"""How long the sender waits for more events after the first of a batch."""
SENDER_NICE = 10
"""Scheduling niceness of the encoding thread (Linux: per thread), so vLLM's threads get the CPU first."""
SEND_BATCH = 64
"""Encoded messages sent together in one IngestBatch at most (fewer when fewer are pending)."""
HEADS_CHUNK_KEYS = 2048
"""Padded keys (rows × longest position) whose head statistics are computed in one go: bounds the
temporary (L, rows, H_kv, keys, d_head) tensor (30 × 3 × 2048 × 64 floats ≈ 47 MB for SmolLM2)."""
STATS_EVERY_S = 2.0
"""How often changed drop counters are reported to the sidecar (``PluginStats``)."""


def encoder_cpus(inherited: set[int], n_cpus: int) -> set[int]:
    """The cores the encoder threads may run on: those vLLM left out of its worker's OpenMP binding
    (``inherited``: the worker's affinity, which new threads inherit), so encoding never takes the
    forward pass's cores; every core when vLLM bound them all."""
    every = set(range(n_cpus))
    return (every - inherited) or every


def _urgent(ev: Event) -> bool:
    """A request start or a last-prompt row: encoded and sent at once (the prefill forecast needs them)."""
    return isinstance(ev, StartEvent) or (isinstance(ev, RowEvent) and ev.phase == "prompt_last")


@dataclass
class SenderStats:
    queued: int = 0
    dropped_queue_full: int = 0
    encode_errors: int = 0
    messages_sent: int = 0
    frames_sent: int = 0
    connects: int = 0
    connect_failures: int = 0
    lost_in_flight: int = 0
    """Streams that failed with messages in flight (the sidecar may or may not have them)."""


class FrameSender:
    """Queue + thread + gRPC stream. ``offer`` is the only method the forward thread calls."""

    def __init__(
        self,
        builder: SignatureBuilder,
        target: str,
        *,
        token: str = "",
        tls_ca: bytes | None = None,
        tenant: str = "",
        queue_size: int = 1024,
        max_message_bytes: int = 4 * 1024 * 1024,
        attn_scale: float = 1.0,
    ) -> None:
        self.builder = builder
        self.attn_scale = attn_scale
        """Softmax scale of the model's attention scores (for the head statistics)."""
        self.target = target
        self.tenant = tenant
        self.stats = SenderStats()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls_ca = tls_ca
        self._q: queue.Queue[Event] = queue.Queue(maxsize=queue_size)
        """Rows and ends, for the batch encoder."""
        self._urgent: queue.Queue[Event] = queue.Queue(maxsize=queue_size)
        """Starts and last-prompt rows, for the urgent encoder."""
        self._max_pending = MAX_BATCH
        """Encoded messages the stream has not taken yet; past it the encoders stop taking events."""
        self.instance_id = uuid.uuid4().hex
        self.capture_counters: Callable[[], tuple[int, float, int]] = lambda: (0, 0.0, 0)
        """The capture's (hook errors, seconds in hooks, planned steps), reported with the sender's drops."""
        self.on_idle: Callable[[], None] | None = None
        """Called about once a second from the sender thread (the capture's ``sweep``)."""
        self._max_bytes = max_message_bytes
        self._pending: collections.deque[pb.IngestMessage] = collections.deque()
        """Encoded messages not yet handed to a stream (a failed stream's leftovers go to the next one)."""
        self._pending_lock = threading.Lock()
        self._ready = threading.Condition(self._pending_lock)
        """Notified when encoded messages are added to ``_pending``."""
        self._state = threading.Lock()
        """Guards ``_open``, ``_seq`` and ``_urgent_left`` (the encoders and the stream share them)."""
        self._open: dict[str, pb.IngestMessage] = {}  # request id → its RequestStart, until its end
        self._seq: dict[str, int] = {}
        self._urgent_left: collections.Counter[str] = collections.Counter()
        """Urgent events queued per request and not yet encoded; the batch encoder waits for 0."""
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="residue-sender", daemon=True)
        self._encoders = [
            threading.Thread(target=self._encode_loop, args=(self._urgent, True), name="residue-urgent",
                             daemon=True),
            threading.Thread(target=self._encode_loop, args=(self._q, False), name="residue-encoder",
                             daemon=True),
        ]  # fmt: skip

    def start(self) -> None:
        for t in self._encoders:
            t.start()
        self._thread.start()

    def offer(self, ev: Event) -> bool:
        """Queue an event without waiting; False (and counted) when its queue is full."""
        urgent = _urgent(ev)
        if urgent:
            with self._state:
                self._urgent_left[ev.request_id] += 1
        try:
            (self._urgent if urgent else self._q).put_nowait(ev)
        except queue.Full:
            if urgent:
                self._urgent_done(ev.request_id)
            self.stats.dropped_queue_full += 1
            return False
        self.stats.queued += 1
        self._idle.clear()
        return True

    def _urgent_done(self, request_id: str) -> None:
        with self._state:
            self._urgent_left[request_id] -= 1
            if self._urgent_left[request_id] <= 0:
                del self._urgent_left[request_id]

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event was handed to the stream (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0 and self._urgent.unfinished_tasks == 0 and not self._pending:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        self._thread.join(timeout_s)
        for t in self._encoders:
            t.join(timeout_s)

    # --------------------------------------------------------------------------------------- messages
    def _messages(self, events: Sequence[Event]) -> list[pb.IngestMessage]:
        """The messages of a batch of events, in event order. Rows are encoded together: one pass over the
        transcoder's weights for the whole batch (a row alone costs the same weight reads as 32)."""
        rows = self._rows([ev for ev in events if isinstance(ev, RowEvent)])
        out: list[pb.IngestMessage] = []
        for ev in events:
            if isinstance(ev, StartEvent):
                out.append(self._start(ev))
            elif isinstance(ev, RowEvent):
                with self._state:
                    seq = self._seq.get(ev.request_id, 0)
                    self._seq[ev.request_id] = seq + 1
                row = rows.pop(0)
                out.append(frame_message(ev.request_id, ev.position, ev.phase, seq, packed_residue(row),
                                         logit_stats(row), captured_time=ev.time or None))  # fmt: skip
            else:
                out.append(self._end(ev))
        return out

    def _start(self, ev: StartEvent) -> pb.IngestMessage:
        start = pb.RequestStart(
            request_id=ev.request_id,
            model=self.builder.model,
            clt_id=self.builder.clt_id,
            prompt_tokens=ev.prompt_tokens,
            num_cached_tokens=ev.num_cached_tokens,
            tenant=self.tenant,
        )
        start.start_time.FromNanoseconds(round(ev.time * 1e9))
        if ev.prompt_token_ids is not None:
            start.prompt_token_ids.extend(ev.prompt_token_ids)
            start.token_ids_opted_in = True
        msg = pb.IngestMessage(start=start)
        with self._state:
            self._open[ev.request_id] = msg
            self._seq.setdefault(ev.request_id, 0)
        return msg

    def _end(self, ev: EndEvent) -> pb.IngestMessage:
        end = pb.RequestEnd(
            request_id=ev.request_id,
            finish_reason=FINISH[ev.reason],
            prompt_tokens=ev.prompt_tokens,
            output_tokens=ev.output_tokens,
            empty_output=ev.empty_output,
        )
        end.end_time.FromNanoseconds(round(ev.time * 1e9))
        with self._state:
            self._open.pop(ev.request_id, None)
            self._seq.pop(ev.request_id, None)
        return pb.IngestMessage(end=end)

    def _heads(self, evs: list[RowEvent], batched: bool | None = None) -> torch.Tensor:
        """(L, H, n, 7) head statistics of rows from their queries and their requests' keys.

        On a GPU, rows are computed together, their keys padded to the longest (masked like future keys), in
        chunks of rows of similar length holding at most HEADS_CHUNK_KEYS padded keys: a handful of
        kernels instead of a dozen per row (measured on an H200: launches dominate otherwise).
        """
        out: list[torch.Tensor | None] = [None] * len(evs)
        order = sorted(range(len(evs)), key=lambda i: evs[i].position)
        # On the CPU a row at a time is faster (measured: padding and the larger copies cost more than
        # the per-row calls save); elsewhere (CUDA) rows go together. ``batched`` overrides (tests).
        if batched is None:
            batched = evs[0].mlp_in.device.type != "cpu"
        limit = HEADS_CHUNK_KEYS if batched else 0
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * (evs[order[end]].position + 1) <= limit:
                end += 1
            chunk = [evs[i] for i in order[start:end]]
            k0 = chunk[0].keys
            assert k0 is not None
            if len(chunk) == 1:
                keys = k0  # (L, H_kv, T, d): no padding, no copy
            else:
                L, H_kv, _, d = k0.shape
                keys = torch.zeros(L, len(chunk), H_kv, chunk[-1].position + 1, d, device=k0.device)
                for r, ev in enumerate(chunk):  # (L, m, H_kv, T, d), zero past each row's own keys
                    assert ev.keys is not None
                    keys[:, r, :, : ev.keys.shape[2]] = ev.keys
            q = torch.stack([ev.q for ev in chunk], dim=1)  # pyright: ignore[reportArgumentType]  # (L, m, H, d)
            pos = [ev.position for ev in chunk]
            probs = probs_from_qk(q, keys, pos, self.attn_scale)  # (L, H, m, T)
            stats = head_stats(probs, torch.tensor(pos))  # (L, H, m, 7)
            for r, i in enumerate(order[start:end]):
                out[i] = stats[:, :, r]
            start = end
        return torch.stack(out, dim=2)  # pyright: ignore[reportArgumentType]

    @torch.inference_mode()
    def _rows(self, evs: list[RowEvent]) -> list[Any]:
        """Captured rows → RowSignatures through the reference path's SignatureBuilder (heads were computed
        next to the KV cache; rows without them get none)."""
        if not evs:
            return []
        with_heads = [ev for ev in evs if ev.keys is not None]
        if with_heads and len(with_heads) != len(evs):  # heads were turned off mid-batch: two groups
            rest = [ev for ev in evs if ev.keys is None]
            done = dict(zip(map(id, with_heads), self._rows(with_heads), strict=True))
            done |= dict(zip(map(id, rest), self._rows(rest), strict=True))
            return [done[id(ev)] for ev in evs]
        L, n = evs[0].mlp_in.shape[0], len(evs)
        heads = self._heads(evs) if with_heads else torch.zeros(L, 0, n, 7, device=evs[0].mlp_in.device)
        return list(
            self.builder.build_rows(
                [ev.position for ev in evs],
                [ev.phase for ev in evs],
                torch.stack([ev.mlp_in for ev in evs], dim=1).float(),  # (L, n, D)
                torch.stack([ev.mlp_out for ev in evs], dim=1).float(),
                torch.stack([ev.logits for ev in evs]).float(),  # (n, V)
                torch.tensor([ev.target for ev in evs], device=evs[0].logits.device),
                heads,
            )
        )

    # ------------------------------------------------------------------------------------------ thread
    def _channel(self) -> grpc.Channel:
        opts = [("grpc.max_send_message_length", self._max_bytes), ("grpc.keepalive_time_ms", 30_000)]
        if self._tls_ca is not None:
            return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self._tls_ca), options=opts)
        return grpc.insecure_channel(self.target, options=opts)

    def plugin_stats(self) -> pb.IngestMessage:
        """The cumulative drop counters of this plugin process, as an IngestMessage."""
        hook_errors, seconds, steps = self.capture_counters()
        ps = pb.PluginStats(instance_id=self.instance_id, queue_full=self.stats.dropped_queue_full,
                            hook_errors=hook_errors, send_errors=self.stats.lost_in_flight,
                            capture_seconds=seconds, captured_steps=steps)  # fmt: skip
        return pb.IngestMessage(plugin_stats=ps)

    def _encode_loop(self, q: queue.Queue[Event], urgent: bool) -> None:
        """One encoder thread: take events off ``q``, encode them, add the messages to ``_pending``."""
        tid = threading.get_native_id()
        if not urgent:
            with contextlib.suppress(OSError, AttributeError):  # batch encoding yields the CPU to vLLM
                os.setpriority(os.PRIO_PROCESS, tid, SENDER_NICE)
        # vLLM's CPU worker pins its process to the cores its OpenMP threads are bound to (with
        # VLLM_CPU_OMP_THREADS_BIND=auto: all but one on a small machine), and threads inherit that: there
        # the encoders would wait for every forward pass, or, let run anywhere, preempt it. They run on
        # the cores vLLM reserved (measured on 2 cores: 0.936 of the plugin-off throughput against 0.914
        # on any core; the prefill forecast's latency was the same either way once gateways stopped
        # polling: GetResidue's wait_ms).
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(tid, encoder_cpus(os.sched_getaffinity(tid), os.cpu_count() or 1))
        while not self._stop.is_set():
            if len(self._pending) >= self._max_pending:  # the stream is behind (or down): stop taking
                self._stop.wait(0.05)
                continue
            try:
                batch = [q.get(timeout=0.2)]
            except queue.Empty:
                continue
            with contextlib.suppress(queue.Empty):
                if urgent:  # what is queued already, no waiting
                    while len(batch) < MAX_BATCH:
                        batch.append(q.get_nowait())
                else:  # gather what arrives within BATCH_WAIT_S: rows encoded together share a weight read
                    until = time.monotonic() + BATCH_WAIT_S
                    while len(batch) < MAX_BATCH and (left := until - time.monotonic()) > 0:
                        batch.append(q.get(timeout=left))
            if not urgent:
                self._wait_for_urgent({ev.request_id for ev in batch})
            try:
                msgs = self._messages(batch)
            except Exception as e:  # one bad batch must not stop the encoder
                self.stats.encode_errors += len(batch)
                logger.warning(
                    "residue sender: could not encode %d events (%s: %s)", len(batch), type(e).__name__, e
                )
                msgs = []
            finally:
                for ev in batch:
                    q.task_done()
                    if urgent:
                        self._urgent_done(ev.request_id)
            with self._ready:
                self._pending.extend(msgs)
                self._ready.notify_all()

    def _wait_for_urgent(self, request_ids: set[str]) -> None:
        """Block until the urgent events of these requests are encoded (they were offered first)."""
        while not self._stop.is_set():
            with self._state:
                if not any(self._urgent_left.get(r, 0) for r in request_ids):
                    return
            time.sleep(0.001)

    def _stream(self, resend: list[pb.IngestMessage], done: threading.Event) -> Iterator[pb.IngestMessage]:
        """One Ingest stream's messages. gRPC pulls them on its own thread and stops pulling when the call
        fails, without telling the generator: ``done`` (set by ``_run`` when the call ends) makes it stop,
        and encoded messages it could not hand over wait in ``_pending`` for the next stream (only the
        message or batch being sent when the call failed can be lost)."""
        yield from resend
        last = self.plugin_stats()
        yield last
        last_sweep = last_stats = time.monotonic()
        while not (self._stop.is_set() or done.is_set()):
            while batch := self._next_pending():
                if done.is_set():
                    self._requeue(batch)
                    return
                self.stats.messages_sent += len(batch)
                self.stats.frames_sent += sum(m.HasField("frame") for m in batch)
                yield batch[0] if len(batch) == 1 else pb.IngestMessage(batch=pb.IngestBatch(messages=batch))
            now = time.monotonic()
            if self.on_idle is not None and now - last_sweep >= SWEEP_EVERY_S:
                last_sweep = now
                self.on_idle()
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                current = self.plugin_stats()
                if current != last:
                    last = current
                    yield current
            with self._ready:
                if not self._pending:
                    self._ready.wait(0.2)

    def _next_pending(self) -> list[pb.IngestMessage]:
        """The next stream message's worth of encoded messages: all pending, up to SEND_BATCH messages and
        about a quarter of the message-size limit (one IngestBatch costs the sidecar about what one frame
        does, so under load most of the per-message cost is saved)."""
        out: list[pb.IngestMessage] = []
        size = 0
        with self._pending_lock:
            while self._pending and len(out) < SEND_BATCH:
                m = self._pending[0]
                n = m.ByteSize()
                if out and size + n > self._max_bytes // 4:
                    break
                out.append(self._pending.popleft())
                size += n
        return out

    def _requeue(self, msgs: list[pb.IngestMessage]) -> None:
        with self._pending_lock:
            self._pending.extendleft(reversed(msgs))

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            channel = self._channel()
            try:
                grpc.channel_ready_future(channel).result(timeout=backoff)
            except grpc.FutureTimeoutError:
                channel.close()
                self.stats.connect_failures += 1
                self._wait_disconnected(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self.stats.connects += 1
            backoff = BACKOFF_MIN_S
            sent_before = self.stats.messages_sent
            done = threading.Event()
            try:
                stub = pb_grpc.ResidueServiceStub(channel)
                with self._state:
                    resend = list(self._open.values())
                stub.Ingest(self._stream(resend, done), metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if self.stats.messages_sent > sent_before:
                    self.stats.lost_in_flight += 1
                logger.warning(
                    "residue sender: Ingest stream to %s ended (%s); reconnecting", self.target, code
                )
            finally:
                done.set()
                channel.close()

    def _wait_disconnected(self, seconds: float) -> None:
        """While the sidecar is away, keep closing vanished requests so their ends queue up in order."""
        if self.on_idle is not None:
            self.on_idle()
        self._stop.wait(seconds)
