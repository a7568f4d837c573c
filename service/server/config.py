"""The sidecar's settings: one frozen dataclass, read once from the environment (STYLE.md rule 7).

Every field has a default and names the variable it comes from; an invalid value raises ``InvalidInput``
naming the variable and what it accepts. The ``trace_*`` fields configure the Trace RPC
(``service.server.trace``), which is off unless ``RESIDUE_TRACE_MODEL`` names a model. The store's own
settings (TTL, backlog size, …) stay in ``service.store.StoreConfig``; only ``REDIS_URL`` is repeated here
so the CLI can override it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service.settings import read_env

MiB = 1 << 20
GiB = 1 << 30

# Field name → environment variable.
ENV: Mapping[str, str] = {
    "host": "RESIDUE_HOST",
    "port": "RESIDUE_PORT",
    "health_port": "RESIDUE_HEALTH_PORT",
    "metrics_host": "RESIDUE_METRICS_HOST",
    "metrics_port": "RESIDUE_METRICS_PORT",
    "redis_url": "REDIS_URL",
    "max_message_bytes": "RESIDUE_MAX_MESSAGE_BYTES",
    "max_concurrent_rpcs": "RESIDUE_MAX_CONCURRENT_RPCS",
    "request_expiry_s": "RESIDUE_REQUEST_EXPIRY_S",
    "orphan_grace_s": "RESIDUE_ORPHAN_GRACE_S",
    "max_open_requests": "RESIDUE_MAX_OPEN_REQUESTS",
    "max_frames_per_request": "RESIDUE_MAX_FRAMES_PER_REQUEST",
    "max_layers": "RESIDUE_MAX_LAYERS",
    "max_features_per_layer": "RESIDUE_MAX_FEATURES_PER_LAYER",
    "max_heads": "RESIDUE_MAX_HEADS",
    "clt_path": "RESIDUE_CLT",
    "prompt_error_threshold": "RESIDUE_PROMPT_ERROR_THRESHOLD",
    "fingerprints_path": "RESIDUE_FINGERPRINTS",
    "forecast_path": "RESIDUE_FORECAST",
    "token": "RESIDUE_TOKEN",
    "tenant_tokens_path": "RESIDUE_TENANT_TOKENS",
    "tls_cert": "RESIDUE_TLS_CERT",
    "tls_key": "RESIDUE_TLS_KEY",
    "drain_delay_s": "RESIDUE_DRAIN_DELAY_S",
    "grace_s": "RESIDUE_GRACE_S",
    "trace_model": "RESIDUE_TRACE_MODEL",
    "trace_max_tokens": "RESIDUE_TRACE_MAX_TOKENS",
    "trace_max_bytes": "RESIDUE_TRACE_MAX_BYTES",
    "trace_timeout_s": "RESIDUE_TRACE_TIMEOUT_S",
    "trace_max_feature_nodes": "RESIDUE_TRACE_MAX_FEATURE_NODES",
    "trace_workers": "RESIDUE_TRACE_WORKERS",
    "trace_queue": "RESIDUE_TRACE_QUEUE",
    "trace_max_response_bytes": "RESIDUE_TRACE_MAX_RESPONSE_BYTES",
}
TRACE_MODELS = ("smollm2", "tiny")
"""Model names ``RESIDUE_TRACE_MODEL`` accepts besides an HF folder (``service.models.resolve_model``)."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of ``residue serve``; each field is read from the variable named in ``ENV``."""

    host: str = "0.0.0.0"
    """``RESIDUE_HOST``: address the gRPC server listens on ('[::]' for IPv6)."""
    port: int = 50051
    """``RESIDUE_PORT``: gRPC port; 0 picks a free one (tests)."""
    health_port: int = -1
    """``RESIDUE_HEALTH_PORT``: a second port serving only ``grpc.health.v1``, in plaintext and without a
    token (kubelet's gRPC probe speaks neither TLS nor auth); -1 = none (health stays on the main port
    too), 0 picks a free one."""
    metrics_host: str = "0.0.0.0"
    """``RESIDUE_METRICS_HOST``: address of the Prometheus /metrics endpoint."""
    metrics_port: int = 9464
    """``RESIDUE_METRICS_PORT``: /metrics port; 0 picks a free one, -1 turns the endpoint off."""
    redis_url: str = ""
    """``REDIS_URL``: redis:// or rediss:// URL of the durable store; empty = the in-memory store."""
    max_message_bytes: int = 4 * MiB
    """``RESIDUE_MAX_MESSAGE_BYTES``: largest gRPC message received or sent (RESOURCE_EXHAUSTED above)."""
    max_concurrent_rpcs: int = 1000
    """``RESIDUE_MAX_CONCURRENT_RPCS``: calls served at once; more are refused with RESOURCE_EXHAUSTED."""
    request_expiry_s: float = 300.0
    """``RESIDUE_REQUEST_EXPIRY_S``: a request with no message for this long is stored as incomplete."""
    orphan_grace_s: float = 5.0
    """``RESIDUE_ORPHAN_GRACE_S``: how long frames that arrive before their RequestStart are held."""
    max_open_requests: int = 4096
    """``RESIDUE_MAX_OPEN_REQUESTS``: requests assembled at once; one more start is RESOURCE_EXHAUSTED."""
    max_frames_per_request: int = 256
    """``RESIDUE_MAX_FRAMES_PER_REQUEST``: frames kept per request; later ones are dropped and counted."""
    max_layers: int = 256
    """``RESIDUE_MAX_LAYERS``: layer entries a frame may carry (the CLT's layer count when one is loaded)."""
    max_features_per_layer: int = 256
    """``RESIDUE_MAX_FEATURES_PER_LAYER``: feature ids a frame may carry per layer (the plugin's top-k)."""
    max_heads: int = 4096
    """``RESIDUE_MAX_HEADS``: HeadStats entries a frame may carry."""
    clt_path: str = ""
    """``RESIDUE_CLT``: transcoder folder; when set, frames are checked against its layers, features and
    id, and Trace builds its graphs with it. Empty: only the generic limits above apply, and Trace uses
    the trace model's default transcoder (trained into the cache on first use)."""
    prompt_error_threshold: float = 0.9
    """``RESIDUE_PROMPT_ERROR_THRESHOLD``: the ``prompt_error_ratio`` scorer flags a request whose mean
    reconstruction error ratio at the last prompt token reaches this."""
    fingerprints_path: str = ""
    """``RESIDUE_FINGERPRINTS``: fingerprints JSON written by ``residue shells run``; each flags requests at
    its calibrated threshold. They must have been fitted with the loaded CLT (``RESIDUE_CLT``): the sidecar
    refuses to start otherwise. Empty: detectors only."""
    forecast_path: str = ""
    """``RESIDUE_FORECAST``: a prefill forecast artifact (``prefill_forecast.json`` from ``residue eval``).
    Every request's PROMPT_LAST frame is scored the moment it arrives: GetResidue answers with the forecast
    before the request ends, a forecast at or above its threshold raises the ``prefill_forecast`` flag on
    WatchFlags, and /metrics counts it. It must have been fitted with the loaded CLT (``RESIDUE_CLT``): the
    sidecar refuses to start otherwise. Empty: records say that no forecast model is loaded."""
    token: str = ""
    """``RESIDUE_TOKEN``: when set, every call except health checks needs 'authorization: Bearer <token>'."""
    tenant_tokens_path: str = ""
    """``RESIDUE_TENANT_TOKENS``: JSON file of read-only tokens scoped to tenants,
    ``{"tokens": [{"token": "...", "tenants": ["acme"]}]}``: a call with one may read only its tenants'
    records, queries, flags and replayed traces (PERMISSION_DENIED otherwise) and may not ingest. Needs
    ``RESIDUE_TOKEN`` (the operator's and plugins' token, which reaches every tenant). Empty: no tenant
    tokens."""
    tls_cert: str = ""
    """``RESIDUE_TLS_CERT``: PEM certificate chain file; with ``tls_key`` the port serves TLS only."""
    tls_key: str = ""
    """``RESIDUE_TLS_KEY``: PEM private key file matching ``tls_cert``."""
    drain_delay_s: float = 1.0
    """``RESIDUE_DRAIN_DELAY_S``: on SIGTERM, seconds between reporting NOT_SERVING and refusing new
    calls, so load balancers stop routing here first."""
    grace_s: float = 10.0
    """``RESIDUE_GRACE_S``: after that, seconds in-flight calls get to finish before they are cancelled."""
    trace_model: str = ""
    """``RESIDUE_TRACE_MODEL``: the model Trace builds attribution graphs on: ``smollm2``, ``tiny`` (the test
    model) or an HF model folder; it must be the model the plugin watches for replays by request id. It is
    loaded in worker processes, never in the sidecar's own. Empty: Trace is off and answers
    FAILED_PRECONDITION."""
    trace_max_tokens: int = 256
    """``RESIDUE_TRACE_MAX_TOKENS``: longest prompt Trace accepts, in tokens (chat template included);
    longer ones are refused with RESOURCE_EXHAUSTED before any work is done."""
    trace_max_bytes: int = 4 * GiB
    """``RESIDUE_TRACE_MAX_BYTES``: most memory one graph may need, as estimated from the prompt length, the
    transcoder's shape and the request's settings before it runs; above it, RESOURCE_EXHAUSTED."""
    trace_timeout_s: float = 120.0
    """``RESIDUE_TRACE_TIMEOUT_S``: longest a Trace call may run, whatever its deadline; the graph stops
    adding features shortly before the earlier of the two and is returned partial (its summary says so)."""
    trace_max_feature_nodes: int = 1024
    """``RESIDUE_TRACE_MAX_FEATURE_NODES``: features traced when a request leaves ``max_feature_nodes`` at 0,
    and the most a request may ask for: more is INVALID_ARGUMENT (not silently capped)."""
    trace_workers: int = 1
    """``RESIDUE_TRACE_WORKERS``: worker processes building graphs at once, each with its own copy of the
    model and transcoder."""
    trace_queue: int = 2
    """``RESIDUE_TRACE_QUEUE``: Trace calls that may wait for a busy worker; one more is refused with
    RESOURCE_EXHAUSTED (busy, retry later)."""
    trace_max_response_bytes: int = 64 * MiB
    """``RESIDUE_TRACE_MAX_RESPONSE_BYTES``: largest Trace answer the sidecar sends (a 64-token SmolLM2 graph
    at the default thresholds is ~5 MB of JSON); a larger graph is RESOURCE_EXHAUSTED. It raises only the
    send limit: what the sidecar accepts stays at ``RESIDUE_MAX_MESSAGE_BYTES``. Clients need a receive
    limit as large (Python: the ``grpc.max_receive_message_length`` channel option; the default is 4 MiB)."""

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "health_port"):
            low = -1 if name in ("metrics_port", "health_port") else 0
            if not low <= getattr(self, name) <= 65535:
                raise InvalidInput(f"{ENV[name]} must be a port in {low}..65535, got {getattr(self, name)}")
        for name in ("max_concurrent_rpcs", "max_open_requests", "max_frames_per_request", "max_layers",
                     "max_features_per_layer", "max_heads", "trace_max_tokens", "trace_max_bytes",
                     "trace_max_feature_nodes", "trace_workers", "trace_max_response_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise InvalidInput(f"{ENV[name]} must be an integer >= 1, got {getattr(self, name)}")
        if self.max_message_bytes < 64 * 1024:
            raise InvalidInput(
                f"{ENV['max_message_bytes']} must be at least 65536, got {self.max_message_bytes}"
            )
        if self.trace_queue < 0:
            raise InvalidInput(f"{ENV['trace_queue']} must be an integer >= 0, got {self.trace_queue}")
        for name in ("request_expiry_s", "orphan_grace_s", "trace_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise InvalidInput(
                    f"{ENV[name]} must be a positive number of seconds, got {getattr(self, name)}"
                )
        for name in ("drain_delay_s", "grace_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise InvalidInput(f"{ENV[name]} must be >= 0 seconds, got {getattr(self, name)}")
        if not math.isfinite(self.prompt_error_threshold):
            raise InvalidInput(f"{ENV['prompt_error_threshold']} must be a finite number")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInput(
                f"TLS needs both {ENV['tls_cert']} and {ENV['tls_key']} (PEM files), or neither for plaintext"
            )
        self._check_trace_model()
        if self.tenant_tokens_path and not self.token:
            raise InvalidInput(
                f"{ENV['tenant_tokens_path']} needs {ENV['token']}: they narrow an authenticated port"
            )
        if self.token != self.token.strip() or any(c.isspace() for c in self.token):
            raise InvalidInput(f"{ENV['token']} must not contain whitespace (it travels in an HTTP/2 header)")

    def _check_trace_model(self) -> None:
        # The names resolve_model knows (it accepts any "tiny…" and SmolLM2's full name too); else a folder.
        m = self.trace_model.lower()
        if not m or m.startswith(TRACE_MODELS) or m == "smollm2-135m-instruct":
            return
        if not (Path(self.trace_model) / "config.json").is_file():
            raise InvalidInput(
                f"{ENV['trace_model']} must be one of {', '.join(TRACE_MODELS)} or an HF model folder (with "
                f"config.json), got {self.trace_model!r}; leave it empty to turn Trace off"
            )

    @property
    def trace_enabled(self) -> bool:
        """Whether the Trace RPC builds graphs (``RESIDUE_TRACE_MODEL`` is set)."""
        return bool(self.trace_model)

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return bool(self.tls_cert)

    def read_tls(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) PEM bytes; an unreadable file raises ``InvalidInput``."""
        out: list[bytes] = []
        for name in ("tls_key", "tls_cert"):
            path = Path(getattr(self, name))
            try:
                out.append(path.read_bytes())
            except OSError as e:
                raise InvalidInput(f"{ENV[name]}={str(path)!r} cannot be read: {e.strerror}") from e
        return out[0], out[1]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServerConfig:
        """Settings from ``env`` (default ``os.environ``), then ``overrides`` (e.g. CLI options) on top.

        Unset or empty variables keep the default.
        """
        return read_env(cls, ENV, env, overrides)
