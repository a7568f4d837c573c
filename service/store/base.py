"""The ``Store`` contract both stores implement, and the pieces they share (DESIGN.md §6).

A store keeps finished (or in-progress) ``ResidueRecord``s for a TTL and a capped stream of
``FlagEvent``s per tenant. Queries return records newest first, ordered by (record time, request id)
descending, and page with an opaque keyset token, so records inserted while a client pages never cause
duplicates or gaps in what it already walked past.

Validation lives here so that ``MemoryStore`` and ``RedisStore`` reject the same inputs with the same
``InvalidInput`` messages; the contract suite in tests/integration/test_store_contract.py pins that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service._proto import residue_pb2 as pb

DEFAULT_TTL_S = 24 * 3600.0
"""How long a record lives after its last write (DESIGN.md §6: 24 h)."""
DEFAULT_PAGE_SIZE = 100
"""Page size used when a query asks for 0 (the proto3 default)."""
MAX_PAGE_SIZE = 1000
"""Largest page a query may ask for; bounds the work one call can cause."""
MAX_BLOCK_S = 5.0
"""Longest ``flags_since`` may wait for new events; callers loop for longer watches."""
MAX_FLAG_BATCH = 1000
"""Most flag events one ``flags_since`` call returns."""
MAX_REQUEST_ID_LEN = 256

_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_EVENT_ID_RE = re.compile(r"(\d+)-(\d+)")
_TOKEN_VERSION = 1


def check_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant name ('' is the default tenant), else raise.

    The character set keeps tenant names safe inside a Redis Cluster hash tag ``{tenant}``: a '}' would
    end the tag early and scatter one tenant's keys over several slots.
    """
    if tenant == "" or _TENANT_RE.fullmatch(tenant):
        return tenant
    raise InvalidInput(
        f"tenant {tenant!r} is invalid: expected '' (default tenant) or up to 64 characters of letters, "
        "digits, '.', '_' or '-', starting with a letter or digit"
    )


def check_request_id(request_id: str) -> str:
    """Return ``request_id`` if it is non-empty and at most ``MAX_REQUEST_ID_LEN`` characters."""
    if not request_id:
        raise InvalidInput("request_id is empty: every record needs the vLLM request id")
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidInput(f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LEN}")
    return request_id


def check_page_size(page_size: int) -> int:
    """Map 0 to ``DEFAULT_PAGE_SIZE``; reject sizes outside 1..``MAX_PAGE_SIZE``."""
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInput(
            f"page_size {page_size} is out of range: expected 1..{MAX_PAGE_SIZE} "
            f"(0 means the default, {DEFAULT_PAGE_SIZE})"
        )
    return page_size


def check_flags_args(after_id: str, limit: int, block_s: float) -> None:
    """Validate ``Store.flags_since`` arguments (shared so both stores reject the same things)."""
    if after_id not in ("", "$") and not _EVENT_ID_RE.fullmatch(after_id):
        raise InvalidInput(
            f"after_id {after_id!r} is invalid: expected '' (oldest retained), '$' (only new events) or "
            "an event id '<milliseconds>-<sequence>'"
        )
    if not 1 <= limit <= MAX_FLAG_BATCH:
        raise InvalidInput(f"limit {limit} is out of range: expected 1..{MAX_FLAG_BATCH}")
    if not 0.0 <= block_s <= MAX_BLOCK_S:
        raise InvalidInput(f"block_s {block_s} is out of range: expected 0..{MAX_BLOCK_S} seconds")


def parse_event_id(event_id: str) -> tuple[int, int]:
    """``'<ms>-<seq>'`` → ``(ms, seq)``, the order Redis stream ids compare in."""
    m = _EVENT_ID_RE.fullmatch(event_id)
    if m is None:
        raise InvalidInput(f"event id {event_id!r} is not '<milliseconds>-<sequence>'")
    return int(m.group(1)), int(m.group(2))


def record_time(record: pb.ResidueRecord, now: float) -> float:
    """The time a record is indexed and ordered by, in Unix seconds.

    ``start_time`` when set (the documented query field), else ``end_time``, else the write time
    ``now``, so a record without timestamps still shows up in recent-time queries.
    """
    for ts in (record.start_time, record.end_time):
        if ts.seconds or ts.nanos:
            return ts.seconds + ts.nanos / 1e9
    return now


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """What ``Store.query`` selects; every set condition must hold. Invalid values raise ``InvalidInput``."""

    tenant: str = ""
    """Tenant to search ('' = default tenant); queries never cross tenants."""
    start: float | None = None
    """Inclusive lower bound on the record time (Unix seconds); None = unbounded."""
    end: float | None = None
    """Exclusive upper bound on the record time (Unix seconds); None = unbounded; must exceed ``start``."""
    model: str = ""
    """Served model name that must match exactly ('' = any)."""
    fingerprint: str = ""
    """Only records scored against this fingerprint ('' = any)."""
    min_score: float | None = None
    """Only records whose ``fingerprint`` score is at least this; requires ``fingerprint``."""
    flagged_only: bool = False
    """Only records with at least one flag."""

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        for name in ("start", "end", "min_score"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise InvalidInput(f"{name} must be a finite number, got {v!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise InvalidInput(
                f"time range is empty or reversed: end ({self.end}) must be after start ({self.start})"
            )
        if self.min_score is not None and not self.fingerprint:
            raise InvalidInput("min_score needs a fingerprint: scores are per fingerprint")

    def matches(self, record: pb.ResidueRecord, t: float) -> bool:
        """Whether ``record``, indexed at time ``t``, passes every condition except the tenant."""
        if self.start is not None and t < self.start:
            return False
        if self.end is not None and t >= self.end:
            return False
        if self.model and record.model != self.model:
            return False
        if self.flagged_only and not record.flags:
            return False
        if self.fingerprint:
            scores = [m.score for m in record.fingerprint_matches if m.fingerprint == self.fingerprint]
            if not scores:
                return False
            if self.min_score is not None and max(scores) < self.min_score:
                return False
        return True

    def digest(self) -> str:
        """Short hash of the filter, bound into page tokens so a token cannot be reused with another."""
        parts = (
            self.tenant,
            self.start,
            self.end,
            self.model,
            self.fingerprint,
            self.min_score,
            self.flagged_only,
        )
        raw = repr(parts)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True, order=True)
class PageCursor:
    """Keyset position: the (time, request id) of the last record a page returned."""

    t: float
    """Record time of the last returned record."""
    request_id: str
    """Its request id; breaks ties between records with the same time."""

    def encode(self, flt: RecordFilter) -> str:
        """Opaque URL-safe token for ``next_page_token``."""
        body = {"v": _TOKEN_VERSION, "t": self.t, "id": self.request_id, "f": flt.digest()}
        return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()

    @staticmethod
    def decode(token: str, flt: RecordFilter) -> PageCursor | None:
        """Parse ``page_token`` ('' → None); malformed or foreign tokens raise ``InvalidInput``."""
        if not token:
            return None
        malformed = "page_token is malformed: pass the previous response's next_page_token unchanged"
        try:
            body = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
            ok = (
                isinstance(body, dict)
                and body.get("v") == _TOKEN_VERSION
                and isinstance(body.get("t"), int | float)
                and math.isfinite(body["t"])
                and isinstance(body.get("id"), str)
            )
        except (binascii.Error, UnicodeError, ValueError) as e:
            raise InvalidInput(malformed) from e
        if not ok:
            raise InvalidInput(malformed)
        if body.get("f") != flt.digest():
            raise InvalidInput(
                "page_token was issued for a different filter: repeat that query's filter exactly"
            )
        return PageCursor(float(body["t"]), body["id"])


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters since the store was created, for service/exporter.py (STYLE.md rule 2)."""

    backend: Literal["memory", "redis"]
    """Which implementation produced the snapshot."""
    records_written: int = 0
    """Records that reached the backing store (backlogged ones count once flushed)."""
    flags_written: int = 0
    """Flag events that reached the backing store."""
    backlog_records: int = 0
    """Records waiting in memory for the backing store to come back."""
    backlog_flags: int = 0
    """Flag events waiting in memory for the backing store to come back."""
    backlog_dropped: int = 0
    """Records and flag events lost because the backlog was full."""
    evicted: int = 0
    """Records removed before their TTL to respect a size bound (MemoryStore's LRU)."""
    errors: int = 0
    """Backing-store operations that failed (connection or server errors)."""
    available: bool = True
    """Whether the last contact with the backing store succeeded."""


@runtime_checkable
class Store(Protocol):
    """Where the sidecar keeps residue records and flag events (DESIGN.md §6).

    Reads raise ``NotFound`` for unknown ids, ``InvalidInput`` for bad arguments and
    ``StoreUnavailable`` when the backing store cannot answer; ``put_record`` and ``append_flag`` keep
    working through an outage by buffering (bounded), so ingest never fails because of the store.
    """

    async def put_record(self, record: pb.ResidueRecord) -> None:
        """Store (or replace) ``record`` under (record.tenant, record.request_id) and restart its TTL."""
        ...

    async def get_record(self, request_id: str, tenant: str = "") -> pb.ResidueRecord:
        """The record stored under (tenant, request_id); ``NotFound`` if absent or expired."""
        ...

    async def query(
        self, flt: RecordFilter, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.ResidueRecord], str]:
        """One page of matching records, newest first, and the next page's token ('' when done)."""
        ...

    async def append_flag(self, event: pb.FlagEvent) -> str:
        """Append ``event`` to its tenant's capped flag stream and return the ``event_id`` the store
        assigned ('' when the event waits in the outage backlog: it gets its id when flushed)."""
        ...

    async def flags_since(
        self, tenant: str = "", after_id: str = "", limit: int = 100, block_s: float = 0.0
    ) -> list[pb.FlagEvent]:
        """Retained events after ``after_id``, oldest first, waiting up to ``block_s`` for one.

        ``after_id``: '' = from the oldest retained event, '$' = only events appended after the call,
        else an ``event_id`` previously returned.
        """
        ...

    async def ping(self) -> bool:
        """True when the backing store answers now; never raises."""
        ...

    def stats(self) -> StoreStats:
        """A snapshot of the store's counters."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks; best-effort flush of any backlog."""
        ...
