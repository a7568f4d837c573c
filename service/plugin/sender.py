"""The plugin's background half: a bounded queue of capture events, and one thread that turns them into
residue frames (CLT encoding, signature statistics, protobuf) and streams them to the sidecar's Ingest.

The forward thread only calls ``offer`` (``put_nowait``: never waits). When the queue is full the event
is dropped and counted. The thread keeps one client stream open; when the sidecar is unreachable it
reconnects with exponential backoff (0.1 s → 5 s) and, on reconnect, first re-sends the RequestStart of
every request still open, so a restarted sidecar accepts their later frames. Events that arrive while
disconnected wait in the queue (bounded, so the oldest survive and the newest are dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from residue_monitor.detectors.capture import Activations
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.frames import frame_message, logit_stats, packed_residue
from residue_monitor.service.plugin.capture import Event, RowEvent, StartEvent

logger = logging.getLogger(__name__)

FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "vanished": pb.FINISH_REASON_ABORT,
}
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
SWEEP_EVERY_S = 1.0
STATS_EVERY_S = 2.0
"""How often changed drop counters are reported to the sidecar (``PluginStats``)."""


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
    ) -> None:
        self.builder = builder
        self.target = target
        self.tenant = tenant
        self.stats = SenderStats()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls_ca = tls_ca
        self._q: queue.Queue[Event] = queue.Queue(maxsize=queue_size)
        self.instance_id = uuid.uuid4().hex
        self.capture_counters: Callable[[], tuple[int, float, int]] = lambda: (0, 0.0, 0)
        """The capture's (hook errors, seconds in hooks, planned steps), reported with the sender's drops."""
        self.on_idle: Callable[[], None] | None = None
        """Called about once a second from the sender thread (the capture's ``sweep``)."""
        self._max_bytes = max_message_bytes
        self._open: dict[str, pb.IngestMessage] = {}  # request id → its RequestStart, until its end
        self._seq: dict[str, int] = {}
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="residue-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, ev: Event) -> bool:
        """Queue an event without waiting; False (and counted) when the queue is full."""
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            self.stats.dropped_queue_full += 1
            return False
        self.stats.queued += 1
        self._idle.clear()
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event was handed to the stream (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._stop.set()
        self._thread.join(timeout_s)

    # --------------------------------------------------------------------------------------- messages
    def _messages(self, ev: Event) -> list[pb.IngestMessage]:
        if isinstance(ev, StartEvent):
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
            self._open[ev.request_id] = msg
            self._seq[ev.request_id] = 0
            return [msg]
        if isinstance(ev, RowEvent):
            seq = self._seq.get(ev.request_id, 0)
            self._seq[ev.request_id] = seq + 1
            row = self._row(ev)
            return [
                frame_message(
                    ev.request_id, ev.position, ev.phase, seq, packed_residue(row), logit_stats(row)
                )
            ]
        end = pb.RequestEnd(
            request_id=ev.request_id,
            finish_reason=FINISH[ev.reason],
            prompt_tokens=ev.prompt_tokens,
            output_tokens=ev.output_tokens,
            empty_output=ev.empty_output,
        )
        end.end_time.FromNanoseconds(round(ev.time * 1e9))
        self._open.pop(ev.request_id, None)
        self._seq.pop(ev.request_id, None)
        return [pb.IngestMessage(end=end)]

    @torch.inference_mode()
    def _row(self, ev: RowEvent) -> Any:
        """One captured row → its RowSignature, through the same SignatureBuilder as the reference path."""
        L = ev.mlp_in.shape[0]
        acts = Activations(
            positions=(ev.position,),
            phases=(ev.phase,),
            mlp_in=ev.mlp_in.float()[:, None],
            mlp_out=ev.mlp_out.float()[:, None],
            q=torch.empty(L, 1, 0, 1),
            k=torch.empty(L, 0, 0, 1),  # no keys: the heads were computed next to the KV cache
            logits=ev.logits.float()[None],
            targets=torch.tensor([ev.target]),
            attn_scale=1.0,
        )
        heads = ev.heads[:, :, None] if ev.heads is not None else torch.zeros(L, 0, 1, 7)
        return self.builder.build(acts, heads=heads).rows[0]

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

    def _stream(self, resend: list[pb.IngestMessage]) -> Iterator[pb.IngestMessage]:
        yield from resend
        last = self.plugin_stats()
        yield last
        last_sweep = last_stats = time.monotonic()
        while not self._stop.is_set():
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
            try:
                ev = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                msgs = self._messages(ev)
            except Exception as e:  # one bad row must not stop the stream
                self.stats.encode_errors += 1
                logger.warning("residue sender: could not encode an event (%s: %s)", type(e).__name__, e)
                msgs = []
            finally:
                self._q.task_done()
            for m in msgs:
                self.stats.messages_sent += 1
                self.stats.frames_sent += int(m.HasField("frame"))
                yield m

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
            try:
                stub = pb_grpc.ResidueServiceStub(channel)
                stub.Ingest(self._stream(list(self._open.values())), metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if self.stats.messages_sent > sent_before:
                    self.stats.lost_in_flight += 1
                logger.warning(
                    "residue sender: Ingest stream to %s ended (%s); reconnecting", self.target, code
                )
            finally:
                channel.close()

    def _wait_disconnected(self, seconds: float) -> None:
        """While the sidecar is away, keep closing vanished requests so their ends queue up in order."""
        if self.on_idle is not None:
            self.on_idle()
        self._stop.wait(seconds)
