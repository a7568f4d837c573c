"""Where the sidecar keeps residue records and flag events (DESIGN.md §6).

``Store`` is the protocol; ``MemoryStore`` is the embedded default, ``RedisStore`` the durable one;
``store_from_env()`` picks between them from ``REDIS_URL``.
"""

from residue_monitor.service.store.base import RecordFilter, Store, StoreStats
from residue_monitor.service.store.factory import StoreConfig, store_from_env
from residue_monitor.service.store.memory import MemoryStore
from residue_monitor.service.store.redis import RedisStore

__all__ = [
    "MemoryStore",
    "RecordFilter",
    "RedisStore",
    "Store",
    "StoreConfig",
    "StoreStats",
    "store_from_env",
]
