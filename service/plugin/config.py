"""The plugin's settings: one frozen dataclass read once from the environment of the vLLM process.

Every field has a default and names its variable (``ENV``). The plugin never raises into vLLM: a bad
value is reported by ``PluginConfig.from_env`` as ``InvalidInput`` and the caller (``register`` /
``install``) logs it and leaves capture off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service.settings import read_env

ENV: Mapping[str, str] = {
    "enabled": "RESIDUE_ENABLED",
    "disabled": "RESIDUE_DISABLE",
    "target": "RESIDUE_SIDECAR_TARGET",
    "token": "RESIDUE_TOKEN",
    "tls_ca": "RESIDUE_TLS_CA",
    "clt_path": "RESIDUE_CLT",
    "model_name": "RESIDUE_MODEL_NAME",
    "tenant": "RESIDUE_TENANT",
    "sample_prompt_last": "RESIDUE_SAMPLE_PROMPT_LAST",
    "decode_every": "RESIDUE_SAMPLE_DECODE_EVERY",
    "sample_final": "RESIDUE_SAMPLE_FINAL",
    "request_fraction": "RESIDUE_SAMPLE_REQUEST_FRACTION",
    "top_k": "RESIDUE_TOP_K",
    "heads": "RESIDUE_SAMPLE_HEADS",
    "queue_size": "RESIDUE_QUEUE_SIZE",
    "send_token_ids": "RESIDUE_SEND_TOKEN_IDS",
}


@dataclass(frozen=True)
class PluginConfig:
    """Settings of the in-vLLM capture (DESIGN.md §4); each field is read from the variable in ``ENV``."""

    enabled: bool = False
    """``RESIDUE_ENABLED``: turn capture on (the plugin is installed with the package but idle by default)."""
    disabled: bool = False
    """``RESIDUE_DISABLE``: kill switch; wins over everything else, capture stays off."""
    target: str = "localhost:50051"
    """``RESIDUE_SIDECAR_TARGET``: the sidecar's gRPC address (host:port)."""
    token: str = ""
    """``RESIDUE_TOKEN``: bearer token sent on Ingest (the sidecar's ``RESIDUE_TOKEN``)."""
    tls_ca: str = ""
    """``RESIDUE_TLS_CA``: PEM file of the CA that signed the sidecar's certificate; empty = plaintext."""
    clt_path: str = ""
    """``RESIDUE_CLT``: transcoder folder (circuit-tracer format); required, nothing is captured without."""
    model_name: str = ""
    """``RESIDUE_MODEL_NAME``: model name recorded with each request; empty = the last part of vLLM's
    served model name (the folder name for a local path), which is what fingerprints are keyed by."""
    tenant: str = ""
    """``RESIDUE_TENANT``: tenant recorded with every request of this server."""
    sample_prompt_last: bool = True
    """``RESIDUE_SAMPLE_PROMPT_LAST``: capture the last prompt token's row."""
    decode_every: int = 16
    """``RESIDUE_SAMPLE_DECODE_EVERY``: capture every k-th decode row (1 = every row)."""
    sample_final: bool = True
    """``RESIDUE_SAMPLE_FINAL``: capture the row that produced the last generated token."""
    request_fraction: float = 1.0
    """``RESIDUE_SAMPLE_REQUEST_FRACTION``: share of requests captured, in [0, 1], decided by a hash of
    the request id (so every replica and restart picks the same requests)."""
    top_k: int = 32
    """``RESIDUE_TOP_K``: CLT features kept per layer and row."""
    heads: bool = True
    """``RESIDUE_SAMPLE_HEADS``: compute per-head attention statistics (needs the KV cache layout to be
    readable; checked at run time, turned off with a log line when it is not)."""
    queue_size: int = 1024
    """``RESIDUE_QUEUE_SIZE``: captured rows and request events waiting for the background sender; when
    full, new ones are dropped and counted (the forward pass never waits)."""
    send_token_ids: bool = False
    """``RESIDUE_SEND_TOKEN_IDS``: ship prompt token ids (DESIGN.md §8 opt-in; lets Trace replay)."""

    def __post_init__(self) -> None:
        if self.decode_every < 1:
            raise InvalidInput(f"{ENV['decode_every']} must be an integer >= 1, got {self.decode_every}")
        if self.top_k < 1:
            raise InvalidInput(f"{ENV['top_k']} must be an integer >= 1, got {self.top_k}")
        if self.queue_size < 1:
            raise InvalidInput(f"{ENV['queue_size']} must be an integer >= 1, got {self.queue_size}")
        if not (math.isfinite(self.request_fraction) and 0.0 <= self.request_fraction <= 1.0):
            raise InvalidInput(f"{ENV['request_fraction']} must be in [0, 1], got {self.request_fraction}")
        if not self.target or ":" not in self.target:
            raise InvalidInput(f"{ENV['target']} must be host:port, got {self.target!r}")
        if any(c.isspace() for c in self.token):
            raise InvalidInput(f"{ENV['token']} must not contain whitespace (it travels in an HTTP/2 header)")

    @property
    def active(self) -> bool:
        """Capture runs: enabled and not killed."""
        return self.enabled and not self.disabled

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> PluginConfig:
        """Settings from ``env`` (default ``os.environ``), then ``overrides``; unset or empty: the default."""
        return read_env(cls, ENV, env, overrides)
