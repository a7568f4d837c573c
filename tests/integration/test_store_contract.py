"""The Store contract (DESIGN.md §6), one suite run against MemoryStore and RedisStore.

Redis cases run against a private, password-protected redis-server (tests/integration/conftest.py) and
carry the ``redis`` marker. The Redis-only section at the end pins the outage policy: writes buffer
while Redis is down, reads raise StoreUnavailable, the backlog flushes on reconnect, and a new store
instance (a sidecar restart) reads what an earlier one wrote.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio.connection import SSLConnection

from residue_monitor.detectors.exceptions import InvalidInput, NotFound, ResidueError, StoreUnavailable
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.store import (
    MemoryStore,
    RecordFilter,
    RedisStore,
    Store,
    StoreConfig,
    store_from_env,
)
from residue_monitor.service.store import _redis_ops as ops
from residue_monitor.service.store.base import MAX_PAGE_SIZE, PageCursor
from residue_monitor.service.store.redis import redact_url
from tests.integration.conftest import MakeStore, RedisServer

pytestmark = pytest.mark.asyncio

T0 = 1_700_000_000.0


def rec(
    rid: str,
    t: float = T0,
    *,
    model: str = "smollm2",
    tenant: str = "",
    fps: dict[str, float] | None = None,
    flags: tuple[str, ...] = (),
) -> pb.ResidueRecord:
    """A record with the fields the indexes use; ``fps`` maps fingerprint → score."""
    r = pb.ResidueRecord(request_id=rid, model=model, tenant=tenant, clt_id="clt-1", flags=list(flags))
    r.start_time.FromNanoseconds(round(t * 1e9))
    for name, score in (fps or {}).items():
        r.fingerprint_matches.add(fingerprint=name, score=score, threshold=0.5, matched=score >= 0.5)
    return r


def flag(rid: str, tenant: str = "") -> pb.FlagEvent:
    return pb.FlagEvent(request_id=rid, tenant=tenant, flag="fp-null", fingerprint="fp-null", score=0.9)


async def all_pages(store: Store, flt: RecordFilter, page_size: int) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page, token = await store.query(flt, page_size, token)
        assert len(page) <= page_size
        ids += [r.request_id for r in page]
        if not token:
            return ids


# ---- the contract, both stores ------------------------------------------------------------------


async def test_put_get_round_trip(store: Store) -> None:
    """Every field survives put → get, and later changes to the caller's message do not leak in."""
    r = rec("req-1", fps={"fp-null": 0.8}, flags=("fp-null",))
    r.end_time.FromSeconds(int(T0) + 3)
    r.signature.layers.add(layer=0, mean_error_ratio=0.12, mean_l0=31.5, mean_mass=4.25)
    r.signature.frame_count = 3
    r.detector_scores["errors"] = 0.7
    r.prefill_forecast.score.probability = 0.66
    r.prefill_forecast.score.threshold = 0.5
    r.prefill_forecast.score.flagged = True
    r.finish_reason = pb.FINISH_REASON_STOP
    r.prompt_tokens, r.output_tokens, r.complete = 17, 5, True
    r.prompt_token_ids.extend([1, 2, 3])
    await store.put_record(r)
    expected = pb.ResidueRecord()
    expected.CopyFrom(r)
    r.model = "changed-after-put"
    assert await store.get_record("req-1") == expected
    assert isinstance(store, Store)
    assert await store.ping()


async def test_unknown_id_is_not_found(store: Store) -> None:
    """An id nothing was stored under raises NotFound (a ResidueError), never returns an empty record."""
    with pytest.raises(NotFound, match="nope"):
        await store.get_record("nope")
    assert issubclass(NotFound, ResidueError)


async def test_put_replaces_record(store: Store) -> None:
    """A second put of the same (tenant, id) replaces the first, also in the indexes."""
    await store.put_record(rec("r", fps={"fp-a": 0.9}, flags=("fp-a",)))
    await store.put_record(rec("r", model="other"))
    assert (await store.get_record("r")).model == "other"
    assert await store.query(RecordFilter(flagged_only=True)) == ([], "")
    assert await store.query(RecordFilter(fingerprint="fp-a")) == ([], "")
    assert [x.request_id for x in (await store.query(RecordFilter(model="other")))[0]] == ["r"]


async def test_ttl_expiry(make_store: MakeStore) -> None:
    """A record is gone from get and query once its TTL has passed."""
    store = make_store(ttl_s=0.3)
    await store.put_record(rec("short"))
    assert (await store.get_record("short")).request_id == "short"
    await asyncio.sleep(0.6)
    with pytest.raises(NotFound):
        await store.get_record("short")
    assert await store.query(RecordFilter()) == ([], "")


async def test_tenant_isolation(store: Store) -> None:
    """Tenant A cannot read or query tenant B's records, even under the same request id."""
    await store.put_record(rec("shared-id", tenant="tenant-a", model="model-a"))
    await store.put_record(rec("only-b", tenant="tenant-b"))
    with pytest.raises(NotFound):
        await store.get_record("shared-id", tenant="tenant-b")
    with pytest.raises(NotFound):
        await store.get_record("shared-id")  # the default tenant is a tenant too
    await store.put_record(rec("shared-id", tenant="tenant-b", model="model-b"))
    assert (await store.get_record("shared-id", tenant="tenant-a")).model == "model-a"
    assert (await store.get_record("shared-id", tenant="tenant-b")).model == "model-b"
    page, _ = await store.query(RecordFilter(tenant="tenant-a"))
    assert [(r.request_id, r.tenant) for r in page] == [("shared-id", "tenant-a")]
    assert await store.query(RecordFilter()) == ([], "")
    await store.append_flag(flag("shared-id", tenant="tenant-a"))
    assert await store.flags_since("tenant-b") == []
    assert [e.tenant for e in await store.flags_since("tenant-a")] == ["tenant-a"]


async def test_query_filters(store: Store) -> None:
    """Time range [start, end), model, fingerprint (+ min score) and flagged-only select exactly,
    newest first, alone and combined."""
    rows = [
        rec("r0", T0 + 0, model="m1"),
        rec("r1", T0 + 1, model="m2", fps={"fp-a": 0.2}),
        rec("r2", T0 + 2, model="m1", fps={"fp-a": 0.9, "fp-b": 0.1}, flags=("fp-a",)),
        rec("r3", T0 + 3, model="m2", fps={"fp-b": 0.95}, flags=("fp-b",)),
        rec("r4", T0 + 4, model="m1", fps={"fp-a": 0.5}),
        rec("r5", T0 + 5, model="m1", flags=("null_output",)),
        rec("r6", T0 + 6, model="m2", fps={"fp-a": 0.7}, flags=("fp-a",)),
    ]
    for r in rows:
        await store.put_record(r)

    async def ids(**kw: Any) -> list[str]:
        return [r.request_id for r in (await store.query(RecordFilter(**kw)))[0]]

    assert await ids() == ["r6", "r5", "r4", "r3", "r2", "r1", "r0"]
    assert await ids(start=T0 + 2, end=T0 + 5) == ["r4", "r3", "r2"]
    assert await ids(start=T0 + 5) == ["r6", "r5"]
    assert await ids(end=T0 + 1) == ["r0"]
    assert await ids(model="m2") == ["r6", "r3", "r1"]
    assert await ids(model="nope") == []
    assert await ids(fingerprint="fp-a") == ["r6", "r4", "r2", "r1"]
    assert await ids(fingerprint="fp-a", min_score=0.5) == ["r6", "r4", "r2"]
    assert await ids(fingerprint="fp-b", min_score=0.5) == ["r3"]
    assert await ids(flagged_only=True) == ["r6", "r5", "r3", "r2"]
    assert await ids(model="m1", flagged_only=True, fingerprint="fp-a", min_score=0.6) == ["r2"]
    assert await ids(model="m2", fingerprint="fp-a", start=T0 + 1, end=T0 + 6) == ["r1"]


async def test_paging_250_records_without_loss_or_duplicates(store: Store) -> None:
    """Paging 250 records (many sharing a time) returns each exactly once, newest first, and records
    inserted mid-walk with newer times neither appear nor shift the remaining pages."""
    rows = [rec(f"req-{i:03d}", T0 + (i % 50), flags=("f",) if i % 3 == 0 else ()) for i in range(250)]
    for r in rows:
        await store.put_record(r)
    order = sorted(((r.start_time.seconds, r.request_id) for r in rows), reverse=True)
    expected = [rid for _, rid in order]

    flt = RecordFilter()
    page, token = await store.query(flt, 7)
    walked = [r.request_id for r in page]
    for i in range(10):  # newer than everything: must not disturb the keyset walk
        await store.put_record(rec(f"late-{i}", T0 + 1000))
    while token:
        page, token = await store.query(flt, 7, token)
        assert 0 < len(page) <= 7
        walked += [r.request_id for r in page]
    assert walked == expected

    flagged = await all_pages(store, RecordFilter(flagged_only=True, end=T0 + 50), 10)
    assert flagged == [rid for rid in expected if int(rid[4:]) % 3 == 0]
    assert len(await all_pages(store, RecordFilter(), MAX_PAGE_SIZE)) == 260
    assert len((await store.query(RecordFilter(), 0))[0]) == 100  # 0 = the default page size


INVALID_FILTERS: dict[str, Callable[[], Any]] = {
    "end before start": lambda: RecordFilter(start=T0 + 5, end=T0),
    "empty range": lambda: RecordFilter(start=T0, end=T0),
    "min_score without fingerprint": lambda: RecordFilter(min_score=0.5),
    "nan bound": lambda: RecordFilter(start=math.nan),
    "infinite score": lambda: RecordFilter(fingerprint="fp", min_score=math.inf),
    "tenant breaking the hash tag": lambda: RecordFilter(tenant="a}b"),
    "tenant too long": lambda: RecordFilter(tenant="t" * 65),
}


@pytest.mark.parametrize("case", list(INVALID_FILTERS))
async def test_invalid_filter_values_raise_invalid_input(case: str) -> None:
    """Bad filter values are rejected when the filter is built, with a message naming the field."""
    with pytest.raises(InvalidInput):
        INVALID_FILTERS[case]()


async def test_invalid_query_arguments_raise_invalid_input(store: Store) -> None:
    """Out-of-range page sizes and malformed or foreign page tokens raise InvalidInput (not a crash)."""
    for size in (-1, MAX_PAGE_SIZE + 1):
        with pytest.raises(InvalidInput, match="page_size"):
            await store.query(RecordFilter(), size)
    for bad in ("!!!", "abc", "eyJ2IjoxfQ==", PageCursor(T0, "x").encode(RecordFilter())[:-3]):
        with pytest.raises(InvalidInput, match="page_token"):
            await store.query(RecordFilter(), 5, bad)
    foreign = PageCursor(T0, "x").encode(RecordFilter(model="m1"))
    with pytest.raises(InvalidInput, match="different filter"):
        await store.query(RecordFilter(model="m2"), 5, foreign)
    with pytest.raises(InvalidInput, match="request_id"):
        await store.put_record(rec(""))
    with pytest.raises(InvalidInput, match="tenant"):
        await store.get_record("x", tenant="bad tenant")
    bad_flag_args: list[dict[str, Any]] = [{"after_id": "yesterday"}, {"limit": 0}, {"block_s": 60.0}]
    for kw in bad_flag_args:
        with pytest.raises(InvalidInput):
            await store.flags_since(**kw)


async def test_flag_stream_is_capped(make_store: MakeStore, backend: str) -> None:
    """A tenant's flag stream keeps about the newest N events (Redis trims whole nodes: MAXLEN ~)."""
    store = make_store(flags_maxlen=20)
    for i in range(600):
        await store.append_flag(flag(f"r{i}"))
    events = await store.flags_since(limit=1000)
    assert 20 <= len(events) <= 20 + 100
    if backend == "memory":
        assert len(events) == 20
    assert events[-1].request_id == "r599"
    assert [int(e.request_id[1:]) for e in events] == list(range(600 - len(events), 600))
    assert store.stats().flags_written == 600


async def test_flags_resume_and_block(store: Store) -> None:
    """Events come back oldest first with increasing ids (the ids append_flag returned); after_id
    resumes; '$' and block_s wait for the next event instead of polling."""
    ids = [await store.append_flag(flag(f"r{i}")) for i in range(3)]
    events = await store.flags_since()
    assert [e.request_id for e in events] == ["r0", "r1", "r2"]
    assert [e.event_id for e in events] == ids
    ids = [tuple(map(int, e.event_id.split("-"))) for e in events]
    assert ids == sorted(set(ids))
    assert [e.request_id for e in await store.flags_since(after_id=events[0].event_id)] == ["r1", "r2"]
    assert await store.flags_since(after_id=events[-1].event_id) == []
    assert await store.flags_since(after_id="$") == []

    for after in (events[-1].event_id, "$"):
        waiter = asyncio.ensure_future(store.flags_since(after_id=after, block_s=3.0))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await store.append_flag(flag(f"new-{after}"))
        got = await asyncio.wait_for(waiter, timeout=3.0)
        assert [e.request_id for e in got] == [f"new-{after}"]
        assert time.monotonic() - started < 2.0
    assert await store.flags_since(after_id="$", block_s=0.2) == []


async def test_stats_snapshot_is_frozen(store: Store) -> None:
    """stats() is an immutable snapshot counting what was written."""
    await store.put_record(rec("a"))
    await store.append_flag(flag("a"))
    stats = store.stats()
    assert (stats.records_written, stats.flags_written, stats.backlog_records, stats.available) == (
        1,
        1,
        0,
        True,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.records_written = 5  # type: ignore[misc]
    assert store.stats().records_written == 1


async def test_memory_store_lru_bound() -> None:
    """MemoryStore holds at most max_records; the least recently used (read or written) goes first."""
    store = MemoryStore(max_records=5)
    for i in range(5):
        await store.put_record(rec(f"r{i}", T0 + i))
    await store.get_record("r0")  # r0 is now the most recently used
    await store.put_record(rec("r5", T0 + 5))
    await store.put_record(rec("r6", T0 + 6))
    for gone in ("r1", "r2"):
        with pytest.raises(NotFound):
            await store.get_record(gone)
    page, _ = await store.query(RecordFilter())
    assert [r.request_id for r in page] == ["r6", "r5", "r4", "r3", "r0"]
    assert store.stats().evicted == 2


# ---- Redis only: outages, restarts, configuration ----------------------------------------------


async def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_redis_down_buffers_writes_and_flushes_on_reconnect(fresh_redis_server: RedisServer) -> None:
    """Redis killed: put_record and append_flag still succeed (into the backlog), reads raise
    StoreUnavailable; Redis back on the same port: the background task flushes without any call."""
    store = RedisStore.from_url(fresh_redis_server.url, reconnect_interval_s=0.05, reconnect_max_s=0.2)
    try:
        await store.put_record(rec("before"))
        fresh_redis_server.stop()
        await store.put_record(rec("during-1", T0 + 1, flags=("f",)))
        await store.put_record(rec("during-2", T0 + 2))
        assert await store.append_flag(flag("during-1")) == ""  # no id until the backlog is flushed
        stats = store.stats()
        assert (stats.backlog_records, stats.backlog_flags, stats.available) == (2, 1, False)
        assert stats.errors >= 1
        assert not await store.ping()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.get_record("before")
        with pytest.raises(StoreUnavailable):
            await store.query(RecordFilter())
        with pytest.raises(StoreUnavailable):
            await store.flags_since()

        fresh_redis_server.start()
        await _until(lambda: store.stats().backlog_records == 0 and store.stats().backlog_flags == 0)
        assert store.stats().available
        assert (await store.get_record("during-1")).flags == ["f"]
        page, _ = await store.query(RecordFilter())
        # "before" died with the unpersisted server; everything buffered during the outage is back.
        assert [r.request_id for r in page] == ["during-2", "during-1"]
        assert [e.request_id for e in await store.flags_since()] == ["during-1"]
        assert store.stats().records_written == 3
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_backlog_is_bounded_and_next_read_flushes(fresh_redis_server: RedisServer) -> None:
    """The backlog keeps the newest backlog_max records (one slot per request id), counts drops, and
    the first read after Redis returns flushes it even before the reconnect task would."""
    store = RedisStore.from_url(fresh_redis_server.url, backlog_max=3, reconnect_interval_s=60.0)
    try:
        fresh_redis_server.stop()
        for i in range(5):
            await store.put_record(rec(f"r{i}", T0 + i))
        await store.put_record(rec("r4", T0 + 4, model="newer"))  # replaces r4 in place
        stats = store.stats()
        assert (stats.backlog_records, stats.backlog_dropped) == (3, 2)

        fresh_redis_server.start()
        assert (await store.get_record("r4")).model == "newer"
        assert store.stats().backlog_records == 0
        for lost in ("r0", "r1"):
            with pytest.raises(NotFound):
                await store.get_record(lost)
        assert [r.request_id for r in (await store.query(RecordFilter()))[0]] == ["r4", "r3", "r2"]
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_restart_of_sidecar_keeps_records(redis_server: RedisServer) -> None:
    """A new RedisStore (a restarted sidecar) reads records, indexes and flags an earlier one wrote."""
    redis_server.flushall()
    first = RedisStore.from_url(redis_server.url)
    await first.put_record(rec("kept", tenant="t1", fps={"fp-a": 0.9}, flags=("fp-a",)))
    await first.append_flag(flag("kept", tenant="t1"))
    await first.close()

    second = RedisStore.from_url(redis_server.url)
    try:
        assert (await second.get_record("kept", tenant="t1")).fingerprint_matches[0].score == 0.9
        page, _ = await second.query(RecordFilter(tenant="t1", fingerprint="fp-a", min_score=0.5))
        assert [r.request_id for r in page] == ["kept"]
        assert [e.request_id for e in await second.flags_since("t1")] == ["kept"]
    finally:
        await second.close()


@pytest.mark.redis
async def test_redis_query_prunes_indexes_and_temp_keys(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query removes expired records from the indexes and leaves no temporary intersection keys."""
    redis_server.flushall()
    monkeypatch.setattr(ops, "CLOCK_SLACK_S", 0.0)  # prune as soon as the TTL passed
    store = RedisStore.from_url(redis_server.url, ttl_s=0.3)
    try:
        await store.put_record(rec("old", fps={"fp-a": 0.9}, flags=("fp-a",)))
        await asyncio.sleep(0.5)
        await store.put_record(rec("new", fps={"fp-a": 0.9}, flags=("fp-a",)))
        flt = RecordFilter(model="smollm2", fingerprint="fp-a", min_score=0.5, flagged_only=True)
        assert [r.request_id for r in (await store.query(flt))[0]] == ["new"]
        with redis_server.client() as client:
            for index in ("time", "exp", "flagged"):
                assert client.zrange(f"residue:{{-}}:idx:{index}", 0, -1) == [b"new"]
            assert client.keys("residue:*:tmp:*") == []
    finally:
        await store.close()


async def test_redis_url_schemes_and_redaction() -> None:
    """redis:// and rediss:// (TLS) with a password are accepted, other schemes rejected, and the
    password never appears in what the store reports."""
    plain = RedisStore.from_url("redis://:s3cret@localhost:6379/0")
    tls = RedisStore.from_url("rediss://user:s3cret@redis.example:6380/1")
    try:
        assert tls._r.connection_pool.connection_class is SSLConnection
        assert plain._r.connection_pool.connection_class is not SSLConnection
        assert (
            redact_url("rediss://user:s3cret@redis.example:6380/1")
            == "rediss://user:***@redis.example:6380/1"
        )
        assert "s3cret" not in plain._where
    finally:
        await plain.close()
        await tls.close()
    with pytest.raises(InvalidInput, match="redis:// or rediss://"):
        RedisStore.from_url("http://localhost:6379")


async def test_store_from_env() -> None:
    """No REDIS_URL → MemoryStore; REDIS_URL → RedisStore; bad numbers name the variable."""
    mem = store_from_env({"RESIDUE_STORE_MAX_RECORDS": "7"})
    assert isinstance(mem, MemoryStore)
    red = store_from_env({"REDIS_URL": "redis://:pw@127.0.0.1:1/0", "RESIDUE_STORE_TTL_S": "60"})
    assert isinstance(red, RedisStore)
    await red.close()
    assert StoreConfig.from_env({}).ttl_s == 24 * 3600
    with pytest.raises(InvalidInput, match="RESIDUE_STORE_TTL_S"):
        StoreConfig.from_env({"RESIDUE_STORE_TTL_S": "-1"})
    with pytest.raises(InvalidInput, match="RESIDUE_FLAGS_MAXLEN"):
        StoreConfig.from_env({"RESIDUE_FLAGS_MAXLEN": "many"})
    pools = StoreConfig.from_env({"RESIDUE_REDIS_MAX_CONNECTIONS": "8", "RESIDUE_REDIS_MAX_BLOCKING": "4"})
    assert (pools.redis_max_connections, pools.redis_max_blocking) == (8, 4)
    with pytest.raises(InvalidInput, match="RESIDUE_REDIS_MAX_BLOCKING"):
        StoreConfig.from_env({"RESIDUE_REDIS_MAX_BLOCKING": "0"})


@pytest.mark.redis
async def test_redis_watchers_never_starve_writes(redis_server: RedisServer) -> None:
    """Blocking flag reads (WatchFlags tails) have connections of their own: with more watchers waiting
    than the store has command connections, writes and reads still go through at once and the store stays
    available. Watchers beyond ``max_blocking`` wait for a slot; one that gets none within its block_s
    returns no events instead of failing, and an event appended meanwhile reaches every watcher."""
    redis_server.flushall()
    store = RedisStore.from_url(redis_server.url, max_connections=2, max_blocking=3)
    try:
        last = await store.append_flag(flag("before"))
        watchers = [asyncio.ensure_future(store.flags_since(after_id=last, block_s=3.0)) for _ in range(8)]
        await asyncio.sleep(0.2)
        for i in range(20):
            await store.put_record(rec(f"w{i}"))
            assert (await store.get_record(f"w{i}")).request_id == f"w{i}"
        assert not any(w.done() for w in watchers)  # the writes did not wait for the watchers' connections
        await store.append_flag(flag("during"))
        got = await asyncio.wait_for(asyncio.gather(*watchers), timeout=5.0)
        assert [[e.request_id for e in g] for g in got] == [["during"]] * 8

        holders = [
            asyncio.ensure_future(store.flags_since("other", after_id="$", block_s=2.0)) for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        assert await store.flags_since(after_id="$", block_s=0.3) == []  # no slot within 0.3 s
        assert 0.25 < time.monotonic() - started < 1.5
        assert [len(g) for g in await asyncio.gather(*holders)] == [0, 0, 0]
        assert store.stats().available and store.stats().errors == 0
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_group_commit_writes_concurrent_puts_together(redis_server: RedisServer) -> None:
    """Records put while a write is in flight go out in one transaction (group commit): 200 concurrent
    puts take far fewer MULTI/EXECs than records, and each put returns only once its record is readable.
    Every index outlives the records in it, and an index's TTL is refreshed once, not once per record.
    The 200 concurrent reads exceed redis-py's default pool (100 connections, then "Too many connections",
    which the store would take for an outage): the store's pool makes them wait for a connection instead."""
    redis_server.flushall()
    store = RedisStore.from_url(redis_server.url, ttl_s=600)
    try:
        with redis_server.client() as client:
            client.config_resetstat()

            async def put(i: int) -> str:
                flags = ("fp-a",) if i >= 100 else ()
                await store.put_record(rec(f"g{i}", T0 + i, fps={"fp-a": i / 200}, flags=flags))
                return (await store.get_record(f"g{i}")).request_id  # readable once put returned

            assert await asyncio.gather(*(put(i) for i in range(200))) == [f"g{i}" for i in range(200)]
            execs = int(client.info("commandstats")["cmdstat_exec"]["calls"])
            pexpires = int(client.info("commandstats")["cmdstat_pexpire"]["calls"])
            assert execs < 50, execs
            assert pexpires == 5, pexpires  # time, exp, flagged, model, fp-a: once each
            record_ttl = client.pttl("residue:{-}:req:g199")
            for index in ("time", "exp", "flagged", "model:smollm2", "fp:fp-a"):
                assert client.pttl(f"residue:{{-}}:idx:{index}") > record_ttl
        page, _ = await store.query(RecordFilter(fingerprint="fp-a", min_score=0.5), page_size=500)
        assert len(page) == 100
        # One record rewritten within a group (a provisional record, then the final one): the last wins.
        await asyncio.gather(
            store.put_record(rec("twice", fps={"fp-a": 0.9}, flags=("fp-a",))),
            store.put_record(rec("twice", fps={"fp-a": 0.1})),
        )
        assert not (await store.get_record("twice")).flags
        assert [r.request_id for r in (await store.query(RecordFilter(flagged_only=True), 500))[0]].count(
            "twice"
        ) == 0
        page, _ = await store.query(RecordFilter(fingerprint="fp-a", min_score=0.5), page_size=500)
        assert "twice" not in {r.request_id for r in page}
    finally:
        await store.close()
