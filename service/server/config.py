"""The sidecar's settings: one frozen dataclass, read once from the environment (STYLE.md rule 7).

Every field has a default and names the variable it comes from; an invalid value raises ``InvalidInput``
naming the variable and what it accepts. The store's own settings (TTL, backlog size, …) stay in
``service.store.StoreConfig``; only ``REDIS_URL`` is repeated here so the CLI can override it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service.settings import read_env

MiB = 1 << 20

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
    "token": "RESIDUE_TOKEN",
    "tls_cert": "RESIDUE_TLS_CERT",
    "tls_key": "RESIDUE_TLS_KEY",
    "drain_delay_s": "RESIDUE_DRAIN_DELAY_S",
    "grace_s": "RESIDUE_GRACE_S",
}


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
    id. Empty: only the generic limits above apply."""
    prompt_error_threshold: float = 0.9
    """``RESIDUE_PROMPT_ERROR_THRESHOLD``: the ``prompt_error_ratio`` scorer flags a request whose mean
    reconstruction error ratio at the last prompt token reaches this."""
    fingerprints_path: str = ""
    """``RESIDUE_FINGERPRINTS``: fingerprints JSON written by ``residue shells run``; each flags requests at
    its calibrated threshold. They must have been fitted with the loaded CLT (``RESIDUE_CLT``): the sidecar
    refuses to start otherwise. Empty: detectors only."""
    token: str = ""
    """``RESIDUE_TOKEN``: when set, every call except health checks needs 'authorization: Bearer <token>'."""
    tls_cert: str = ""
    """``RESIDUE_TLS_CERT``: PEM certificate chain file; with ``tls_key`` the port serves TLS only."""
    tls_key: str = ""
    """``RESIDUE_TLS_KEY``: PEM private key file matching ``tls_cert``."""
    drain_delay_s: float = 1.0
    """``RESIDUE_DRAIN_DELAY_S``: on SIGTERM, seconds between reporting NOT_SERVING and refusing new
    calls, so load balancers stop routing here first."""
    grace_s: float = 10.0
    """``RESIDUE_GRACE_S``: after that, seconds in-flight calls get to finish before they are cancelled."""

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "health_port"):
            low = -1 if name in ("metrics_port", "health_port") else 0
            if not low <= getattr(self, name) <= 65535:
                raise InvalidInput(f"{ENV[name]} must be a port in {low}..65535, got {getattr(self, name)}")
        for name in ("max_concurrent_rpcs", "max_open_requests", "max_frames_per_request", "max_layers",
                     "max_features_per_layer", "max_heads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise InvalidInput(f"{ENV[name]} must be an integer >= 1, got {getattr(self, name)}")
        if self.max_message_bytes < 64 * 1024:
            raise InvalidInput(
                f"{ENV['max_message_bytes']} must be at least 65536, got {self.max_message_bytes}"
            )
        for name in ("request_expiry_s", "orphan_grace_s"):
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
        if self.token != self.token.strip() or any(c.isspace() for c in self.token):
            raise InvalidInput(f"{ENV['token']} must not contain whitespace (it travels in an HTTP/2 header)")

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
