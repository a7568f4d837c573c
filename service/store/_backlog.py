"""The bounded in-memory backlog RedisStore writes to while Redis is down (DESIGN.md §6).

Pure bookkeeping, no I/O: what is waiting, in which order, and how much was dropped. Records are keyed by
(tenant, request id) so a record rewritten many times during an outage (start, frames, end) holds one
slot with its newest version; flag events are an ordered queue. When either is full the oldest entry is
dropped and counted: the newest residue is the most useful to an operator after an outage.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

from residue_monitor.service._proto import residue_pb2 as pb


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """A record ready to write: its bytes plus what the indexes need (computed once, at put time)."""

    tenant: str
    """Tenant ('' = default)."""
    request_id: str
    """Request id."""
    data: bytes
    """Serialized ResidueRecord."""
    t: float
    """Record time (Unix seconds): the score in the time-ordered indexes."""
    model: str
    """Served model name ('' = none, not indexed)."""
    flagged: bool
    """Whether the record has any flag."""
    scores: tuple[tuple[str, float], ...]
    """(fingerprint, score) pairs for the per-fingerprint indexes."""


class Backlog:
    """Records and flag events waiting for Redis, each side bounded by ``max_entries``."""

    def __init__(self, max_entries: int) -> None:
        """``max_entries`` bounds records and flag events separately."""
        self._max = max_entries
        self._records: OrderedDict[tuple[str, str], PendingRecord] = OrderedDict()
        self._flags: deque[pb.FlagEvent] = deque()
        self.dropped = 0
        """Entries dropped because the backlog was full (records and flags together)."""

    def __bool__(self) -> bool:
        return bool(self._records or self._flags)

    @property
    def n_records(self) -> int:
        """Records waiting."""
        return len(self._records)

    @property
    def n_flags(self) -> int:
        """Flag events waiting."""
        return len(self._flags)

    def add_record(self, w: PendingRecord) -> bool:
        """Queue ``w`` (replacing an older version of the same record); False if it cost a drop."""
        key = (w.tenant, w.request_id)
        dropped = False
        if key not in self._records and len(self._records) >= self._max:
            self._records.popitem(last=False)
            self.dropped += 1
            dropped = True
        self._records[key] = w
        self._records.move_to_end(key)
        return not dropped

    def add_flag(self, ev: pb.FlagEvent) -> bool:
        """Queue ``ev``; False if the oldest queued event was dropped to make room."""
        dropped = len(self._flags) >= self._max
        if dropped:
            self._flags.popleft()
            self.dropped += 1
        self._flags.append(ev)
        return not dropped

    def record_batch(self, n: int) -> list[PendingRecord]:
        """The oldest ``n`` waiting records (left queued until ``records_done``)."""
        return list(itertools.islice(self._records.values(), n))

    def records_done(self, batch: list[PendingRecord]) -> None:
        """Forget the written ``batch``, except records replaced by a newer version while it was written."""
        for w in batch:
            key = (w.tenant, w.request_id)
            if self._records.get(key) is w:
                del self._records[key]

    def flag_batch(self, n: int) -> list[pb.FlagEvent]:
        """The oldest ``n`` waiting flag events (left queued until ``flags_done``)."""
        return list(itertools.islice(self._flags, n))

    def flags_done(self, batch: list[pb.FlagEvent]) -> None:
        """Forget the written ``batch`` (by identity: drops may have happened while it was written)."""
        sent = {id(ev) for ev in batch}
        while self._flags and id(self._flags[0]) in sent:
            self._flags.popleft()

    def clear(self) -> tuple[int, int]:
        """Drop everything; returns the (records, flags) that were lost."""
        lost = (len(self._records), len(self._flags))
        self._records.clear()
        self._flags.clear()
        return lost
