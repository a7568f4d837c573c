"""``MemoryStore``: the embedded default store when no ``REDIS_URL`` is set (DESIGN.md §6).

Bounded in two ways so a busy sidecar cannot grow without limit: at most ``max_records`` records (least
recently used evicted first; reads and writes both count as use) and a TTL per record. Each tenant's
flag stream keeps the newest ``flags_maxlen`` events. Everything is lost when the process exits; that
is what RedisStore is for.

All methods run on the event loop thread and never await while mutating, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from residue_monitor.detectors.exceptions import InvalidInput, NotFound
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.store.base import (
    DEFAULT_TTL_S,
    PageCursor,
    RecordFilter,
    StoreStats,
    check_flags_args,
    check_page_size,
    check_request_id,
    check_tenant,
    parse_event_id,
    record_time,
)


@dataclass(slots=True)
class _Entry:
    record: pb.ResidueRecord  # private copy; callers only ever get copies of it
    t: float  # record time (Unix seconds), the query order key
    expires_at: float  # on the monotonic clock


class MemoryStore:
    """In-process ``Store``: an LRU- and TTL-bounded dict of records plus capped per-tenant flag deques."""

    def __init__(
        self,
        *,
        max_records: int = 10_000,
        ttl_s: float = DEFAULT_TTL_S,
        flags_maxlen: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` drives TTLs (monotonic, so wall-clock jumps do not expire records);
        ``wall_clock`` stamps records without times and flag event ids."""
        if max_records < 1:
            raise InvalidInput(f"max_records must be at least 1, got {max_records}")
        if ttl_s <= 0:
            raise InvalidInput(f"ttl_s must be positive, got {ttl_s}")
        if flags_maxlen < 1:
            raise InvalidInput(f"flags_maxlen must be at least 1, got {flags_maxlen}")
        self._max_records = max_records
        self._ttl_s = ttl_s
        self._flags_maxlen = flags_maxlen
        self._clock = clock
        self._wall = wall_clock
        # Key (tenant, request_id); order = least recently used first.
        self._records: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._flags: dict[str, deque[pb.FlagEvent]] = {}
        self._last_id = (0, 0)
        self._new_flag = asyncio.Condition()
        self._written = 0
        self._flags_written = 0
        self._evicted = 0

    async def put_record(self, record: pb.ResidueRecord) -> None:
        """Store a copy of ``record``, making it the most recently used; evict the LRU one if full."""
        key = (check_tenant(record.tenant), check_request_id(record.request_id))
        copy = pb.ResidueRecord()
        copy.CopyFrom(record)
        self._records[key] = _Entry(copy, record_time(record, self._wall()), self._clock() + self._ttl_s)
        self._records.move_to_end(key)
        self._written += 1
        while len(self._records) > self._max_records:
            self._records.popitem(last=False)
            self._evicted += 1

    async def get_record(self, request_id: str, tenant: str = "") -> pb.ResidueRecord:
        """A copy of the stored record; ``NotFound`` if unknown, expired or evicted."""
        key = (check_tenant(tenant), check_request_id(request_id))
        entry = self._records.get(key)
        if entry is None or entry.expires_at <= self._clock():
            self._records.pop(key, None)
            raise NotFound(f"no residue record for request_id {request_id!r} in tenant {tenant!r}")
        self._records.move_to_end(key)
        out = pb.ResidueRecord()
        out.CopyFrom(entry.record)
        return out

    async def query(
        self, flt: RecordFilter, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.ResidueRecord], str]:
        """Scan the tenant's live records, newest first; O(n log n) in the (bounded) record count."""
        size = check_page_size(page_size)
        cursor = PageCursor.decode(page_token, flt)
        self._purge_expired()
        hits = [
            (PageCursor(e.t, rid), e.record)
            for (tenant, rid), e in self._records.items()
            if tenant == flt.tenant and flt.matches(e.record, e.t)
        ]
        if cursor is not None:
            hits = [h for h in hits if h[0] < cursor]
        hits.sort(key=lambda h: h[0], reverse=True)
        page = hits[: size + 1]
        token = page[size - 1][0].encode(flt) if len(page) > size else ""
        out = []
        for _, rec in page[:size]:
            copy = pb.ResidueRecord()
            copy.CopyFrom(rec)
            out.append(copy)
        return out, token

    async def append_flag(self, event: pb.FlagEvent) -> str:
        """Append a copy of ``event`` with a fresh, increasing ``event_id``; wake blocked readers."""
        tenant = check_tenant(event.tenant)
        copy = pb.FlagEvent()
        copy.CopyFrom(event)
        copy.event_id = self._next_id()
        q = self._flags.get(tenant)
        if q is None:
            q = self._flags[tenant] = deque(maxlen=self._flags_maxlen)
        q.append(copy)
        self._flags_written += 1
        async with self._new_flag:
            self._new_flag.notify_all()
        return copy.event_id

    async def flags_since(
        self, tenant: str = "", after_id: str = "", limit: int = 100, block_s: float = 0.0
    ) -> list[pb.FlagEvent]:
        """Events after ``after_id`` (see ``Store.flags_since``), waiting up to ``block_s`` if none."""
        check_tenant(tenant)
        check_flags_args(after_id, limit, block_s)
        after = self._last_id if after_id == "$" else (parse_event_id(after_id) if after_id else (-1, -1))
        found = self._scan_flags(tenant, after, limit)
        if found or block_s <= 0:
            return found
        deadline = self._clock() + block_s

        async def _wait() -> None:
            async with self._new_flag:
                await self._new_flag.wait_for(lambda: bool(self._scan_flags(tenant, after, 1)))

        try:
            await asyncio.wait_for(_wait(), timeout=max(0.0, deadline - self._clock()))
        except TimeoutError:
            return []
        return self._scan_flags(tenant, after, limit)

    async def ping(self) -> bool:
        """Always True: memory is always reachable."""
        return True

    def stats(self) -> StoreStats:
        """Counters since creation; the backlog fields stay 0 (there is nothing to be down)."""
        return StoreStats(
            backend="memory",
            records_written=self._written,
            flags_written=self._flags_written,
            evicted=self._evicted,
        )

    async def close(self) -> None:
        """Drop everything held (the embedded store has no persistence)."""
        self._records.clear()
        self._flags.clear()

    def _scan_flags(self, tenant: str, after: tuple[int, int], limit: int) -> list[pb.FlagEvent]:
        out: list[pb.FlagEvent] = []
        for ev in self._flags.get(tenant, ()):
            if parse_event_id(ev.event_id) > after:
                copy = pb.FlagEvent()
                copy.CopyFrom(ev)
                out.append(copy)
                if len(out) == limit:
                    break
        return out

    def _next_id(self) -> str:
        # Same shape and ordering as Redis stream ids, so a client's resume id means the same on both.
        ms = int(self._wall() * 1000)
        last_ms, last_seq = self._last_id
        self._last_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._records.items() if e.expires_at <= now]:
            del self._records[key]
