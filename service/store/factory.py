"""Choose the store from the environment: ``RedisStore`` when ``REDIS_URL`` is set, else ``MemoryStore``.

Configuration is one frozen dataclass read once from the environment (STYLE.md rule 7); invalid values
raise ``InvalidInput`` naming the variable and what it accepts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service.store.base import DEFAULT_TTL_S, Store
from residue_monitor.service.store.memory import MemoryStore
from residue_monitor.service.store.redis import RedisStore, redact_url

logger = logging.getLogger(__name__)

# Field name → environment variable.
_ENV = {
    "redis_url": "REDIS_URL",
    "ttl_s": "RESIDUE_STORE_TTL_S",
    "max_records": "RESIDUE_STORE_MAX_RECORDS",
    "flags_maxlen": "RESIDUE_FLAGS_MAXLEN",
    "backlog_max": "RESIDUE_STORE_BACKLOG",
    "redis_max_connections": "RESIDUE_REDIS_MAX_CONNECTIONS",
    "redis_max_blocking": "RESIDUE_REDIS_MAX_BLOCKING",
}


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Store settings; each field is read from the environment variable named in ``_ENV``."""

    redis_url: str = ""
    """``REDIS_URL``: redis:// or rediss:// URL, password allowed; empty selects the in-memory store."""
    ttl_s: float = DEFAULT_TTL_S
    """``RESIDUE_STORE_TTL_S``: seconds a record lives after its last write (default 24 h)."""
    max_records: int = 10_000
    """``RESIDUE_STORE_MAX_RECORDS``: MemoryStore's bound (least recently used evicted first)."""
    flags_maxlen: int = 10_000
    """``RESIDUE_FLAGS_MAXLEN``: flag events kept per tenant (Redis trims approximately)."""
    backlog_max: int = 10_000
    """``RESIDUE_STORE_BACKLOG``: records (and, separately, flag events) buffered while Redis is down."""
    redis_max_connections: int = 64
    """``RESIDUE_REDIS_MAX_CONNECTIONS``: connections to Redis for commands at most; further commands wait
    for a free one."""
    redis_max_blocking: int = 16
    """``RESIDUE_REDIS_MAX_BLOCKING``: connections to Redis for blocking flag reads (WatchFlags tails of
    other replicas' flags), apart from the command connections so that watchers never starve writes; a
    watcher that finds them all busy polls instead and sees other replicas' flags up to 1 s later."""

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise InvalidInput(f"{_ENV['ttl_s']} must be a positive number of seconds, got {self.ttl_s}")
        for name in (
            "max_records",
            "flags_maxlen",
            "backlog_max",
            "redis_max_connections",
            "redis_max_blocking",
        ):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{_ENV[name]} must be an integer >= 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreConfig:
        """Read the settings from ``env`` (default ``os.environ``); unset or empty means the default."""
        env = os.environ if env is None else env
        values: dict[str, str | float | int] = {}
        for f in fields(cls):
            raw = env.get(_ENV[f.name], "").strip()
            if not raw:
                continue
            if f.name == "redis_url":
                values[f.name] = raw
                continue
            try:
                values[f.name] = float(raw) if f.name == "ttl_s" else int(raw)
            except ValueError as e:
                raise InvalidInput(f"{_ENV[f.name]}={raw!r} is not a number") from e
        return cls(**values)  # type: ignore[arg-type]  # keys are exactly the field names


def store_from_config(cfg: StoreConfig) -> Store:
    """``RedisStore`` for ``cfg.redis_url``, else a ``MemoryStore``; neither connects yet."""
    if cfg.redis_url:
        logger.info("residue store: Redis at %s", redact_url(cfg.redis_url))
        return RedisStore.from_url(
            cfg.redis_url,
            ttl_s=cfg.ttl_s,
            flags_maxlen=cfg.flags_maxlen,
            backlog_max=cfg.backlog_max,
            max_connections=cfg.redis_max_connections,
            max_blocking=cfg.redis_max_blocking,
        )
    logger.info("residue store: in memory (no REDIS_URL), at most %d records", cfg.max_records)
    return MemoryStore(max_records=cfg.max_records, ttl_s=cfg.ttl_s, flags_maxlen=cfg.flags_maxlen)


def store_from_env(env: Mapping[str, str] | None = None) -> Store:
    """The sidecar's store: ``RedisStore`` if ``REDIS_URL`` is set, else ``MemoryStore`` (DESIGN.md §6)."""
    return store_from_config(StoreConfig.from_env(env))
