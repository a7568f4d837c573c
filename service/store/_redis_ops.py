"""Redis commands for RedisStore's key layout (documented in redis.py): writes, pruning, index
intersection and the keyset scan. No error policy here: callers decide what a failure means.

Every key of a tenant carries the hash tag ``{tenant}`` (``{-}`` for the default tenant ''), so each
multi-key command and transaction below touches a single Redis Cluster slot.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterable
from typing import Any, cast

import redis.asyncio as aioredis

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.store._backlog import PendingRecord
from residue_monitor.service.store.base import PageCursor, RecordFilter

SCAN_BATCH = 64
TMP_TTL_MS = 60_000
PRUNE_BATCH = 1000
INDEX_TTL_SLACK_S = 60.0
"""Indexes outlive the records they hold by this much, so each index's TTL needs refreshing at most this
often (a PEXPIRE per touched index per record was a third of a record write's commands)."""
MAX_REFRESHED = 10_000
"""Index keys whose last TTL refresh is remembered (past it, memory starts over: more refreshes, no harm)."""
# Indexes are pruned by this process's wall clock, records expire by Redis's: prune a little late so
# clock skew between sidecars can never hide a live record.
CLOCK_SLACK_S = 5.0

# Atomic, so a record re-written between "find expired" and "remove" keeps its index entries.
PRUNE_LUA = """
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
  for i = 1, #KEYS do redis.call('ZREM', KEYS[i], unpack(ids)) end
end
return #ids
"""


def key(tenant: str, *parts: str) -> str:
    """``residue:{tenant}:part:part…``: the one place key names are built."""
    return f"residue:{{{tenant or '-'}}}:" + ":".join(parts)


def text(v: bytes | str) -> str:
    """A Redis reply element as ``str`` (the client runs with ``decode_responses=False``)."""
    return v.decode() if isinstance(v, bytes) else v


def prune_keys(tenant: str) -> list[str]:
    """KEYS for ``PRUNE_LUA``: the expiry index first, then the other indexes keyed by every record.

    Model and fingerprint indexes are not pruned here (a record's entries there are unknown once it is
    gone); they only ever take part in intersections with the pruned time index, and expire as a whole.
    """
    return [key(tenant, "idx", "exp"), key(tenant, "idx", "time"), key(tenant, "idx", "flagged")]


async def write_records(
    client: aioredis.Redis,
    writes: list[PendingRecord],
    ttl_ms: int,
    refreshed: dict[str, float] | None = None,
) -> None:
    """SET each record with PX and update its indexes (one ZADD per index for the whole batch); one MULTI
    per tenant (one slot each).

    Every index a record touches gets a TTL of ``ttl_ms`` + ``INDEX_TTL_SLACK_S``, so an index nobody
    writes to any more vanishes after its records. ``refreshed`` (index key → monotonic time of its last
    refresh, kept by the caller) skips refreshing an index refreshed less than the slack ago: it then still
    outlives every record in it."""
    now = time.monotonic()
    index_ttl_ms = ttl_ms + round(INDEX_TTL_SLACK_S * 1000)
    for tenant, group in itertools.groupby(sorted(writes, key=lambda w: w.tenant), key=lambda w: w.tenant):
        pipe = client.pipeline(transaction=True)
        expiry = time.time() + ttl_ms / 1000
        k_time, k_exp, k_flagged = (key(tenant, "idx", name) for name in ("time", "exp", "flagged"))
        # Each index gets one ZADD (and the flagged index one ZREM) for the whole group: a member's last
        # write wins, exactly as when every record's commands ran one after another.
        index: dict[str, dict[str, float | None]] = {k_time: {}, k_exp: {}, k_flagged: {}}
        for w in group:
            pipe.set(key(tenant, "req", w.request_id), w.data, px=ttl_ms)
            index[k_time][w.request_id] = w.t
            index[k_exp][w.request_id] = expiry
            index[k_flagged][w.request_id] = w.t if w.flagged else None  # None: ZREM
            if w.model:
                index.setdefault(key(tenant, "idx", "model", w.model), {})[w.request_id] = w.t
            for fp, score in w.scores:
                index.setdefault(key(tenant, "idx", "fp", fp), {})[w.request_id] = score
        for k, members in index.items():
            add = {m: v for m, v in members.items() if v is not None}
            if add:
                pipe.zadd(k, add)
            if len(add) < len(members):
                pipe.zrem(k, *(m for m, v in members.items() if v is None))
        last = refreshed or {}
        due = sorted(k for k in index if now - last.get(k, -INDEX_TTL_SLACK_S) >= INDEX_TTL_SLACK_S)
        for k in due:
            pipe.pexpire(k, index_ttl_ms)
        await pipe.execute()
        if refreshed is not None:
            if len(refreshed) + len(due) > MAX_REFRESHED:
                refreshed.clear()
            refreshed.update(dict.fromkeys(due, now))


async def write_flags(
    client: aioredis.Redis, events: list[pb.FlagEvent], maxlen: int, ttl_ms: int
) -> list[str]:
    """XADD each event to its tenant's stream, capped with MAXLEN ~ ``maxlen`` (cheap trimming); the ids
    Redis assigned, in order."""
    pipe = client.pipeline(transaction=False)
    for ev in events:
        k = key(ev.tenant, "flags")
        pipe.xadd(k, {b"e": ev.SerializeToString()}, maxlen=maxlen, approximate=True)
        pipe.pexpire(k, ttl_ms)
    replies = await pipe.execute()
    return [text(r) for r in replies[0::2]]


def parse_events(entries: Iterable[Any]) -> list[pb.FlagEvent]:
    """XRANGE / XREAD entries ``(id, {b"e": bytes})`` → FlagEvents with ``event_id`` set."""
    out = []
    for event_id, fields in entries:
        ev = pb.FlagEvent.FromString(fields[b"e"])
        ev.event_id = text(event_id)
        out.append(ev)
    return out


async def candidates(client: aioredis.Redis, flt: RecordFilter) -> tuple[str, list[str]]:
    """The zset to walk (scores = record times) and the temporary keys to delete afterwards.

    Index filters are intersected server-side (ZINTERSTORE, weight 1 on the time index and 0 on the
    others so the score stays the record time); a min_score first cuts the fingerprint index with
    ZRANGESTORE. With no index filter the time index itself is walked.
    """
    t = flt.tenant
    k_time = key(t, "idx", "time")
    weights = {k_time: 1.0}
    temps: list[str] = []
    pipe = client.pipeline(transaction=True)
    if flt.model:
        weights[key(t, "idx", "model", flt.model)] = 0.0
    if flt.flagged_only:
        weights[key(t, "idx", "flagged")] = 0.0
    if flt.fingerprint:
        k_fp = key(t, "idx", "fp", flt.fingerprint)
        if flt.min_score is not None:
            temps.append(key(t, "tmp", uuid.uuid4().hex))
            pipe.zrangestore(temps[-1], k_fp, repr(flt.min_score), "+inf", byscore=True)
            k_fp = temps[-1]
        weights[k_fp] = 0.0
    if len(weights) == 1:
        return k_time, []
    temps.append(key(t, "tmp", uuid.uuid4().hex))
    pipe.zinterstore(temps[-1], weights, aggregate="SUM")
    for k in temps:  # a backstop in case the caller dies before deleting them
        pipe.pexpire(k, TMP_TTL_MS)
    await pipe.execute()
    return temps[-1], temps


async def scan(
    client: aioredis.Redis, source: str, flt: RecordFilter, want: int, cursor: PageCursor | None
) -> list[tuple[PageCursor, pb.ResidueRecord]]:
    """Up to ``want`` live matching records of ``source`` after ``cursor``, (time, id) descending."""
    lo = "-inf" if flt.start is None else repr(flt.start)
    hi = "+inf" if flt.end is None else f"({flt.end!r}"
    out: list[tuple[PageCursor, pb.ResidueRecord]] = []
    if cursor is not None:
        # Records sharing the cursor's time: Redis orders ties by member bytes, as PageCursor orders ids.
        ties = cast("list[bytes]", await client.zrange(source, repr(cursor.t), repr(cursor.t), byscore=True))
        tie_ids = sorted((i for i in map(text, ties) if i < cursor.request_id), reverse=True)
        await _collect(client, flt, [(cursor.t, i) for i in tie_ids], out)
        hi = f"({cursor.t!r}"
    offset = 0
    while len(out) < want:
        reply = await client.zrange(
            source, hi, lo, desc=True, byscore=True, withscores=True, offset=offset,
            num=max(want - len(out), SCAN_BATCH),
        )  # fmt: skip
        batch = cast("list[tuple[bytes, float]]", reply)
        if not batch:
            break
        offset += len(batch)
        await _collect(client, flt, [(float(score), text(member)) for member, score in batch], out)
    return out[:want]


async def _collect(
    client: aioredis.Redis,
    flt: RecordFilter,
    cands: list[tuple[float, str]],
    out: list[tuple[PageCursor, pb.ResidueRecord]],
) -> None:
    # Records that expired since the last prune come back as None and are skipped. The filter is
    # re-checked on the record itself because an index entry can be stale (e.g. a fingerprint match
    # that a later write of the same record no longer has).
    if not cands:
        return
    blobs = await client.mget([key(flt.tenant, "req", rid) for _, rid in cands])
    for (t, rid), blob in zip(cands, blobs, strict=True):
        if blob is None:
            continue
        rec = pb.ResidueRecord.FromString(blob.encode() if isinstance(blob, str) else blob)
        if flt.matches(rec, t):
            out.append((PageCursor(t, rid), rec))
