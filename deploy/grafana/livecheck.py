"""Run the dashboard's queries against a real Prometheus scraping a residue /metrics endpoint.

Shared by tests/integration/test_deploy.py (every panel must return data) and render_preview.py (the PNG).
Four pieces, each replaceable on its own:

- :func:`serve_sidecar` + :class:`ReplayTraffic`: the real sidecar (``residue serve`` as a subprocess on
  free loopback ports) and a thread that streams given ``IngestMessage`` requests (real frames, built by
  ``service/frames.py``) into it over one long-lived Ingest stream, as the vLLM plugin does. This is what
  the test scrapes.
- :func:`synthetic_sidecar`: a ``/metrics`` endpoint (``service/exporter.py`` on port 0) fed by a thread of
  realistic observations through :class:`StatsAccumulator`, including the families only the vLLM plugin
  reports (capture overhead, prefill risk); render_preview.py uses it for the PNG.
- :class:`PrometheusServer`: the ``prometheus`` binary on a free loopback port, a temp config and data dir,
  exemplar storage on, scraping the given targets every second.
- :func:`panel_targets` / :func:`substitute`: the queries of the generated dashboard JSON with Grafana's
  template variables replaced by what "All" and a short ``$__rate_interval`` would give.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.exporter import (
    LAYER_BANDS,
    StatsAccumulator,
    register_collectors,
    start_metrics_server,
)

JOB = "residue-sidecar"  # the job name deploy/prometheus/rules and the dashboard's $job expect
SCRAPE_INTERVAL_S = 1.0
# Fingerprint names as the shells catalogue (v1..v5) would register them.
FINGERPRINTS = (
    "v1-memtrace",
    "v2-value-collapse",
    "v3-layer-salience",
    "v4-temporal-inference",
    "v5-instruction-disruption",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the /metrics source ---------------------------------------------------------------------------


class SyntheticTraffic:
    """Observations shaped like a served model's, from a seeded RNG (deterministic per seed).

    Per request: frames for the last prompt token, a few sampled decode steps and the final token; per
    frame, error ratios by layer band (later layers reconstruct worse) and per-head attention entropies;
    one score per fingerprint, ``failure_rate`` of the requests failing and scoring high on one
    fingerprint (with more error and lower entropy); a prefill risk; now and then dropped frames, a store
    error and a backlog.
    """

    def __init__(self, seed: int = 0, failure_rate: float = 0.1) -> None:
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate  # a caller may change it while traffic flows (an "incident")
        self.n = 0

    def request(self, acc: StatsAccumulator) -> None:
        rng = self.rng
        self.n += 1
        rid = f"cmpl-{rng.getrandbits(64):016x}-0"
        acc.inc_requests()
        failing = rng.random() < self.failure_rate
        culprit = rng.choice(FINGERPRINTS)
        n_decode = rng.randint(2, 8)
        for phase, n in (("prompt_last", 1), ("decode", n_decode), ("final", 1)):
            acc.inc_frames(phase, n)
        for _ in range(n_decode + 2):
            for band, mu in zip(LAYER_BANDS, (0.35, 0.55, 0.7), strict=True):
                acc.observe_error_ratio(band, max(0.0, rng.gauss(mu + (0.1 if failing else 0.0), 0.08)))
            for _ in range(3):
                acc.observe_attention_entropy(rng.gammavariate(4.0, 0.6 if not failing else 0.35))
            acc.observe_capture_overhead(rng.lognormvariate(math.log(3e-4), 0.5))
            acc.observe_ingest_latency(rng.lognormvariate(math.log(2e-4), 0.6))
        for fp in FINGERPRINTS:
            score = rng.betavariate(6, 2) if failing and fp == culprit else rng.betavariate(2, 6)
            acc.observe_fingerprint_score(fp, score, rid, flagged=score > 0.7)
        risk = rng.betavariate(5, 3) if failing else rng.betavariate(2, 8)
        acc.observe_prefill_risk(risk, rid, flagged=risk > 0.6)
        if rng.random() < 0.05:
            acc.inc_frames_dropped(rng.choice(("queue_full", "queue_full", "send_error")), rng.randint(1, 3))
        if rng.random() < 0.03:
            acc.inc_store_errors()
            acc.set_store_backlog(rng.randint(1, 40))
        elif rng.random() < 0.2:
            acc.set_store_backlog(0)


@contextmanager
def synthetic_sidecar(
    traffic: SyntheticTraffic | None = None,
    requests_per_s: float = 20.0,
    fingerprints: Sequence[str] = FINGERPRINTS,
) -> Iterator[str]:
    """A live ``/metrics`` endpoint on 127.0.0.1 with traffic flowing; yields its ``host:port``."""
    acc = StatsAccumulator(fingerprints)
    registry = CollectorRegistry()
    register_collectors(registry, acc.snapshot)
    server = start_metrics_server(registry, "127.0.0.1", 0)
    source = traffic or SyntheticTraffic()
    stop = threading.Event()
    tick_s = 0.1

    def run() -> None:
        owed = 0.0
        while not stop.wait(tick_s):
            owed += requests_per_s * tick_s
            while owed >= 1:
                source.request(acc)
                owed -= 1

    source.request(acc)  # the first scrape already sees every family with data
    thread = threading.Thread(target=run, name="synthetic-residue-traffic", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        stop.set()
        thread.join(5)
        server.stop()


# --- the real sidecar ----------------------------------------------------------------------------------


class SidecarError(RuntimeError):
    """``residue serve`` did not start, or died while traffic flowed."""


@dataclass(frozen=True, slots=True)
class SidecarProcess:
    """A running ``residue serve``: its gRPC and /metrics addresses and its log file."""

    grpc_target: str
    metrics_target: str
    log: Path


@contextmanager
def serve_sidecar(
    workdir: Path, env: Mapping[str, str] | None = None, timeout_s: float = 120.0, grpc_port: int = 0
) -> Iterator[SidecarProcess]:
    """``residue serve`` on free 127.0.0.1 ports (gRPC and /metrics; ``grpc_port`` fixes the former);
    ``env`` adds ``RESIDUE_*`` / ``REDIS_URL`` settings. Yields once health answers SERVING; SIGTERM
    (graceful drain) on exit."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    grpc_port, metrics_port = grpc_port or free_port(), free_port()
    cmd = [sys.executable, "-c", "from residue_monitor.service.cli import app; app()", "serve",
           "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port)]  # fmt: skip
    full_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "RESIDUE_METRICS_HOST": "127.0.0.1",
        "RESIDUE_DRAIN_DELAY_S": "0",
        "RESIDUE_GRACE_S": "2",
        **(env or {}),
    }
    log_path = workdir / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])

    try:
        target = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(target) as ch:
            health: Any = health_pb2_grpc.HealthStub(ch)
            while True:
                with suppress(grpc.RpcError):
                    ok = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if ok.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SidecarError(f"residue serve did not become SERVING:\n{tail()}")
                time.sleep(0.2)
        yield SidecarProcess(target, f"127.0.0.1:{metrics_port}", log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def renamed(msgs: Sequence[pb.IngestMessage], request_id: str) -> list[pb.IngestMessage]:
    """Copies of one request's messages under another request id."""
    out = []
    for m in msgs:
        c = pb.IngestMessage()
        c.CopyFrom(m)
        kind = c.WhichOneof("kind")
        assert kind is not None, "an IngestMessage without a kind"
        getattr(c, kind).request_id = request_id
        out.append(c)
    return out


class ReplayTraffic:
    """Streams ``requests`` (each a whole request's messages: start, frames, end) round-robin into a
    sidecar at ``requests_per_s``, each replay under a fresh ``cmpl-…`` request id, on one Ingest stream
    (reopened if the sidecar ends it). Every ``duplicate_every``-th request resends one frame, as a
    plugin retrying a send would, so the dropped-frames panels see real drops. ``start()`` / ``stop()``."""

    def __init__(
        self,
        grpc_target: str,
        requests: Sequence[Sequence[pb.IngestMessage]],
        requests_per_s: float = 5.0,
        duplicate_every: int = 3,
    ) -> None:
        assert requests, "nothing to replay"
        self.grpc_target = grpc_target
        self.requests = [list(r) for r in requests]
        self.interval_s = 1.0 / requests_per_s
        self.duplicate_every = duplicate_every
        self.sent = 0
        """Requests sent so far."""
        self.errors: list[str] = []
        """Ingest streams that ended with an error (each reopened)."""
        self._steps = 0
        self._capture_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="residue-replay", daemon=True)

    def _messages(self) -> Iterator[pb.IngestMessage]:
        while not self._stop.is_set():
            i = self.sent
            msgs = renamed(self.requests[i % len(self.requests)], f"cmpl-replay{i:06d}-0")
            if self.duplicate_every and i % self.duplicate_every == 0 and len(msgs) > 2:
                msgs.insert(2, msgs[1])  # the first frame again, right after itself
            yield from msgs
            self.sent += 1
            # What the plugin reports every few seconds: its cumulative drops and time in capture hooks
            # (here 60 forward steps a request at 0.2–0.4 ms each, so the overhead panel has data).
            self._steps += 60
            self._capture_s += 60 * (2e-4 + 2e-4 * (i % 5) / 4)
            stats = pb.PluginStats(
                instance_id="replay", captured_steps=self._steps, capture_seconds=self._capture_s
            )
            yield pb.IngestMessage(plugin_stats=stats)
            self._stop.wait(self.interval_s)

    def _run(self) -> None:
        with grpc.insecure_channel(self.grpc_target) as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            while not self._stop.is_set():
                try:
                    stub.Ingest(self._messages(), timeout=3600)
                except grpc.RpcError as e:
                    self.errors.append(str(e))
                    self._stop.wait(0.5)

    def start(self) -> None:
        self._thread.start()

    def wait_for(self, n: int, timeout_s: float = 60.0) -> None:
        """Until ``n`` requests have been sent."""
        deadline = time.monotonic() + timeout_s
        while self.sent < n:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise SidecarError(f"only {self.sent} of {n} requests sent; stream errors: {self.errors}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --- Prometheus ----------------------------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API answered with an error."""


class PrometheusServer:
    """One private ``prometheus`` process scraping ``targets`` as job ``residue-sidecar``."""

    def __init__(self, binary: str, workdir: Path, targets: Sequence[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.targets = list(targets)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Write the config, start Prometheus, and wait until ``/-/ready`` answers."""
        assert self.proc is None, "already running"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S:g}s", "scrape_timeout": "900ms"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        self.port = free_port()
        log = (self.workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            with suppress(OSError), urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus did not become ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; reaps the process."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, n: int = 20) -> str:
        path = self.workdir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def api(self, endpoint: str, **params: str | float) -> Any:
        """GET ``/api/v1/<endpoint>`` and return its ``data``; an error raises with Prometheus' text."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{endpoint} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at now; the result vector (or ``[]``)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.api("query_exemplars", query=expr, start=start, end=end)

    def wait_for_scrapes(self, n: int = 2, timeout_s: float = 30.0) -> None:
        """Block until every target has been scraped successfully at least ``n`` times."""
        deadline = time.monotonic() + timeout_s
        expr = f'min(count_over_time(up{{job="{JOB}"}}[1h]) and on (instance) up{{job="{JOB}"}} == 1)'
        while True:
            result = self.query(expr)
            if result and float(result[0]["value"][1]) >= n:
                return
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"fewer than {n} successful scrapes in {timeout_s} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)


@contextmanager
def running_prometheus(binary: str, workdir: Path, targets: Sequence[str]) -> Iterator[PrometheusServer]:
    server = PrometheusServer(binary, workdir, targets)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def prometheus_binary() -> str | None:
    """The ``prometheus`` server binary (Debian's package installs it as /usr/bin/prometheus)."""
    return shutil.which("prometheus")


# --- the dashboard's queries ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PanelTarget:
    """One query of one panel of the dashboard JSON."""

    panel_id: int
    panel_title: str
    panel_type: str
    ref_id: str
    expr: str
    legend: str
    exemplar: bool
    heatmap: bool

    @property
    def name(self) -> str:
        return f"{self.panel_id}-{self.panel_title.replace(' ', '_')}-{self.ref_id}"


def panel_targets(dashboard: Mapping[str, Any]) -> list[PanelTarget]:
    """Every query of every panel (rows included, collapsed or not), in dashboard order."""
    out: list[PanelTarget] = []

    def visit(panels: Sequence[Mapping[str, Any]]) -> None:
        for p in panels:
            visit(p.get("panels") or [])
            for t in p.get("targets") or []:
                out.append(
                    PanelTarget(
                        int(p["id"]), str(p["title"]), str(p["type"]), str(t["refId"]), str(t["expr"]),
                        str(t.get("legendFormat", "")), bool(t.get("exemplar")), t.get("format") == "heatmap",
                    )
                )  # fmt: skip

    visit(dashboard["panels"])
    return out


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana's ``$name`` / ``${name}`` by ``variables[name]``; any variable left over raises."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"query uses ${name}, which has no value: {expr}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def query_variables(rate_interval: str = "10s") -> dict[str, str]:
    """What Grafana sends with every multi-select variable on "All" (its allValue, ``.+``)."""
    return {"job": ".+", "instance": ".+", "fingerprint": ".+", "__rate_interval": rate_interval}
