"""``residue demo``: the whole stack on one machine, on the embedded defaults.

``residue serve`` (the sidecar; in-memory store unless ``REDIS_URL`` is set; the default CLT; the fitted
fingerprints when ``residue shells run`` has written them) and vLLM's OpenAI server with the plugin, both
as child processes. A mix of benign and shell prompts goes through the OpenAI chat API; the table shows
what the sidecar recorded for each (by the completion id the API returned), then a few metrics. The
stack keeps serving until Ctrl-C (or returns at once with ``wait=False``); both processes are stopped
cleanly either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.plugin.launch import VllmServer, free_port, vllm_command


@dataclass(frozen=True)
class DemoPrompt:
    kind: str
    """'benign' or the shell id the prompt comes from."""
    text: str


@dataclass(frozen=True)
class DemoResult:
    prompt: DemoPrompt
    request_id: str
    output: str
    record: pb.ResidueRecord | None
    error: str = ""


def demo_prompts(n_benign: int = 4) -> list[DemoPrompt]:
    """One held-out prompt per shell family (never used to fit fingerprints) and a few
    benign controls from the catalog."""
    from residue_monitor.shells.catalog import load_controls, load_shells, split

    reg = load_shells()
    out = [DemoPrompt("benign", c.prompt) for c in split(load_controls(), "heldout")[:n_benign]]
    for name in reg.names():
        inst = split(reg.get(name).instances, "heldout")
        if inst:
            out.append(DemoPrompt(name, inst[0].prompt))
    return out


@contextlib.contextmanager
def sidecar_process(
    clt: Path,
    fingerprints: Path | None,
    log: Path,
    port: int,
    metrics_port: int,
    forecast: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``residue serve`` on 127.0.0.1, SERVING before this yields; SIGTERM (graceful drain) on exit."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = {**os.environ, "RESIDUE_CLT": str(clt), "RESIDUE_METRICS_HOST": "127.0.0.1"}
    if fingerprints is not None:
        env["RESIDUE_FINGERPRINTS"] = str(fingerprints)
    if forecast is not None:
        env["RESIDUE_FORECAST"] = str(forecast)
    cmd = [sys.executable, "-c", "from residue_monitor.service.cli import app; app()", "serve",
           "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]  # fmt: skip
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health: Any = health_pb2_grpc.HealthStub(ch)
            while True:
                with contextlib.suppress(grpc.RpcError):
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"residue serve did not start; see {log}")
                time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _chat(url: str, model: str, text: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _record(target: str, request_id: str, timeout_s: float = 30.0) -> pb.ResidueRecord | None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.ResidueServiceStub(ch)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                rec = stub.GetResidue(pb.GetResidueRequest(request_id=request_id), timeout=5)
                if rec.complete:
                    return rec
            time.sleep(0.2)
    return None


def run_demo(
    model_path: Path,
    model_name: str,
    clt: Path,
    fingerprints: Path | None,
    workdir: Path,
    prompts: Sequence[DemoPrompt],
    *,
    max_tokens: int = 48,
    on_status: Callable[[str], None] = lambda _s: None,
    on_results: Callable[[list[DemoResult], str, dict[str, str]], None] = lambda *_a: None,
    wait: bool = True,
    forecast: Path | None = None,
) -> list[DemoResult]:
    """Start the stack, send ``prompts`` concurrently, report, then serve until Ctrl-C (``wait``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    on_status("starting the sidecar (residue serve) …")
    with sidecar_process(clt, fingerprints, workdir / "sidecar.log", grpc_port, metrics_port, forecast):
        on_status("starting vLLM with the residue plugin (≈40 s) …")
        argv, env = vllm_command(str(model_path), port=http_port, clt=str(clt), target=target,
                                 served_model_name=model_name)  # fmt: skip
        with VllmServer(argv, env, str(workdir / "vllm.log"), http_port) as vllm:
            on_status(f"sending {len(prompts)} prompts through the OpenAI chat API …")

            def one(p: DemoPrompt) -> DemoResult:
                try:
                    resp = _chat(vllm.url, model_name, p.text, max_tokens)
                except OSError as e:
                    return DemoResult(p, "", "", None, f"{type(e).__name__}: {e}")
                text = resp["choices"][0]["message"]["content"] or ""
                return DemoResult(p, resp["id"], text, _record(target, resp["id"]))

            with ThreadPoolExecutor(8) as ex:
                results = list(ex.map(one, prompts))
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            urls = {"OpenAI API": vllm.url + "/v1", "residue gRPC": target,
                    "sidecar /metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                    "plugin status": vllm.url + "/residue/status", "logs": str(workdir)}  # fmt: skip
            on_results(results, metrics, urls)
            if wait:
                stop = threading.Event()
                old = signal.signal(signal.SIGINT, lambda *_: stop.set())
                try:
                    while not stop.wait(0.5):
                        pass
                finally:
                    signal.signal(signal.SIGINT, old)
                on_status("stopping vLLM and the sidecar …")
    return results
