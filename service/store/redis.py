"""``RedisStore``: records and flags in Redis (redis.asyncio + hiredis), surviving sidecar restarts.

Key layout (all keys of a tenant share the Redis Cluster hash tag ``{tenant}``; '' is ``{-}``):

    residue:{t}:req:<request id>      serialized ResidueRecord, PX = TTL (default 24 h)
    residue:{t}:idx:time              zset  request id → record time      (query order, time range)
    residue:{t}:idx:exp               zset  request id → wall-clock expiry (prunes the indexes)
    residue:{t}:idx:flagged           zset  request id → record time      (flagged_only)
    residue:{t}:idx:model:<model>     zset  request id → record time      (model filter)
    residue:{t}:idx:fp:<fingerprint>  zset  request id → fingerprint score (fingerprint / min_score)
    residue:{t}:flags                 stream, XADD MAXLEN ~ N, field "e" = serialized FlagEvent
    residue:{t}:tmp:<uuid>            one query's index intersection, deleted after it (PX 60 s backstop)

Outage policy (DESIGN.md §6): ingest never fails because Redis is down. A write that hits a connection
error goes to a bounded in-memory backlog (``_backlog.Backlog``), and while anything is backlogged new
writes queue behind it, so order is kept and ingest does not pay a connect timeout per message. A
background task retries with backoff and flushes; reads flush first and raise ``StoreUnavailable``
while Redis cannot answer. Writes Redis itself rejects (not connection errors) raise
``StoreUnavailable`` instead of being buffered, since retrying them would never succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from residue_monitor.detectors.exceptions import InvalidInput, NotFound, StoreUnavailable
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.store import _redis_ops as ops
from residue_monitor.service.store._backlog import Backlog, PendingRecord
from residue_monitor.service.store.base import (
    DEFAULT_TTL_S,
    MAX_BLOCK_S,
    PageCursor,
    RecordFilter,
    StoreStats,
    check_flags_args,
    check_page_size,
    check_request_id,
    check_tenant,
    record_time,
)

logger = logging.getLogger(__name__)

# "Redis is not reachable now" (AuthenticationError and BusyLoadingError derive from ConnectionError;
# builtin TimeoutError is an OSError). Any other RedisError is the server refusing the command.
_DOWN_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
_FLUSH_BATCH = 200
_GROUP_MAX = 256
"""Records written in one group commit at most."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    """``Store`` on Redis; the module docstring gives the key layout and the outage policy."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        flags_maxlen: int = 10_000,
        backlog_max: int = 10_000,
        reconnect_interval_s: float = 0.5,
        reconnect_max_s: float = 5.0,
        where: str = "redis",
        blocking: aioredis.Redis | None = None,
        max_blocking: int = 16,
    ) -> None:
        """Wrap ``client`` (created with ``decode_responses=False``: records are binary).

        ``blocking``: the client for blocking reads (``flags_since`` with ``block_s``; default ``client``),
        on a pool of its own so that watchers waiting for flags never hold the connections writes need;
        at most ``max_blocking`` such reads run at once, and one that finds no slot within its ``block_s``
        returns no events, as if none had come (the caller's next read gets them: nothing is lost).
        ``backlog_max`` bounds records and flag events buffered during an outage (each);
        the reconnect task retries every ``reconnect_interval_s``, doubling up to ``reconnect_max_s``;
        ``where`` names the server in logs and errors (never with a password).
        """
        if ttl_s <= 0 or reconnect_interval_s <= 0 or min(flags_maxlen, backlog_max, max_blocking) < 1:
            raise InvalidInput(
                "ttl_s and reconnect_interval_s must be positive, flags_maxlen, backlog_max and max_blocking "
                f"at least 1 (got {ttl_s}, {reconnect_interval_s}, {flags_maxlen}, {backlog_max}, "
                f"{max_blocking})"
            )
        self._r = client
        self._blocking = client if blocking is None else blocking
        self._block_slots = asyncio.Semaphore(max_blocking)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._flags_maxlen = flags_maxlen
        self._retry_s = reconnect_interval_s
        self._retry_max_s = max(reconnect_max_s, reconnect_interval_s)
        self._where = where
        self._prune = client.register_script(ops.PRUNE_LUA)
        self._backlog = Backlog(backlog_max)
        self._flush_lock = asyncio.Lock()
        self._reconnector: asyncio.Task[None] | None = None
        self._written = self._flags_written = self._errors = 0
        self._available = True
        self._refreshed: dict[str, float] = {}
        """Index key → when this store last refreshed its TTL (``ops.write_records``)."""
        self._group: list[tuple[PendingRecord, asyncio.Future[None]]] = []
        """Records waiting for the next group commit, with the futures their writers wait on."""
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        """Set by ``close``: the reconnect loop stops even if its cancel is swallowed (``flags.watch``)."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 10.0,
        max_connections: int = 64,
        max_blocking: int = 16,
        **kwargs: Any,
    ) -> RedisStore:
        """A store for ``redis://[user:password@]host:port/db`` or ``rediss://…`` (TLS).

        ``socket_timeout_s`` must exceed ``MAX_BLOCK_S`` so a blocking ``flags_since`` is not cut off;
        at most ``max_connections`` connections are open for commands, and a command that finds them all
        busy waits up to ``socket_timeout_s`` for one (redis-py's default pool instead fails it with "Too
        many connections", which would pass for an outage). Blocking flag reads (WatchFlags tails) use
        ``max_blocking`` further connections of their own (``__init__``); ``kwargs`` go to ``__init__``.
        Nothing is contacted until the first call.
        """
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss"):
            raise InvalidInput(
                f"REDIS_URL {redact_url(url)!r} has scheme {scheme!r}: expected redis:// or rediss:// (TLS)"
            )
        if socket_timeout_s <= MAX_BLOCK_S:
            raise InvalidInput(f"socket_timeout_s must exceed {MAX_BLOCK_S} s, got {socket_timeout_s}")
        if max_connections < 1 or max_blocking < 1:
            raise InvalidInput(
                f"max_connections and max_blocking must be at least 1, got {max_connections}, {max_blocking}"
            )

        def client(connections: int) -> aioredis.Redis:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=connections,
                timeout=socket_timeout_s,
                decode_responses=False,
                socket_connect_timeout=connect_timeout_s,
                socket_timeout=socket_timeout_s,
                # One quick retry covers a pooled connection that died with a Redis restart; more would
                # only delay the switch to the backlog (redis-py's default backs off for seconds).
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            )
            return aioredis.Redis.from_pool(pool)

        return cls(
            client(max_connections),
            where=redact_url(url),
            blocking=client(max_blocking),
            max_blocking=max_blocking,
            **kwargs,
        )

    # ---- records ---------------------------------------------------------------------------------

    async def put_record(self, record: pb.ResidueRecord) -> None:
        """Write ``record`` and its index entries in one transaction; buffer it while Redis is down."""
        w = PendingRecord(
            tenant=check_tenant(record.tenant),
            request_id=check_request_id(record.request_id),
            data=record.SerializeToString(),
            t=record_time(record, time.time()),
            model=record.model,
            flagged=bool(record.flags),
            scores=tuple((m.fingerprint, m.score) for m in record.fingerprint_matches if m.fingerprint),
        )
        if self._backlog:
            self._buffer(self._backlog.add_record(w))
            return
        # Group commit: records put while a write is in flight go out together in the next transaction,
        # one round trip and one set of index TTL refreshes for all of them (ingest finishes many requests
        # per round trip under load). The caller still returns only once its record is written.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._group.append((w, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_groups())
        await asyncio.shield(done)

    async def _commit_groups(self) -> None:
        """Write the waiting records, a group at a time, until none wait; settle each writer's future."""
        while self._group:
            group, self._group = self._group[:_GROUP_MAX], self._group[_GROUP_MAX:]
            batch = [w for w, _ in group]
            error: BaseException | None = None
            try:
                if self._backlog:  # an outage began while this group waited: keep the order
                    for w in batch:
                        self._buffer(self._backlog.add_record(w))
                else:
                    async with self._writing("record write") as down:
                        await ops.write_records(self._r, batch, self._ttl_ms, self._refreshed)
                        self._written += len(batch)
                    if down:
                        for w in batch:
                            self._buffer(self._backlog.add_record(w))
            except BaseException as e:  # StoreUnavailable (refused), or cancelled at close
                error = e
            for _, fut in group:
                if fut.done():
                    continue
                if error is None:
                    fut.set_result(None)
                elif isinstance(error, Exception):
                    fut.set_exception(error)
                else:
                    fut.cancel()
            if error is not None and not isinstance(error, Exception):
                raise error

    async def get_record(self, request_id: str, tenant: str = "") -> pb.ResidueRecord:
        """The stored record; ``NotFound`` if absent or expired, ``StoreUnavailable`` if Redis is down."""
        check_tenant(tenant)
        check_request_id(request_id)
        async with self._reading("get_record"):
            await self._flush_first()
            blob = await self._r.get(ops.key(tenant, "req", request_id))
        if blob is None:
            raise NotFound(f"no residue record for request_id {request_id!r} in tenant {tenant!r}")
        return pb.ResidueRecord.FromString(blob.encode() if isinstance(blob, str) else blob)

    async def query(
        self, flt: RecordFilter, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.ResidueRecord], str]:
        """Prune expired index entries, intersect the filter's indexes, walk newest first (keyset)."""
        size = check_page_size(page_size)
        cursor = PageCursor.decode(page_token, flt)
        async with self._reading("query"):
            await self._flush_first()
            prune_before = time.time() - ops.CLOCK_SLACK_S
            await self._prune(keys=ops.prune_keys(flt.tenant), args=[prune_before, ops.PRUNE_BATCH])
            source, temps = await ops.candidates(self._r, flt)
            try:
                hits = await ops.scan(self._r, source, flt, size + 1, cursor)
            finally:
                if temps:
                    await self._r.delete(*temps)
        token = hits[size - 1][0].encode(flt) if len(hits) > size else ""
        return [rec for _, rec in hits[:size]], token

    # ---- flags -----------------------------------------------------------------------------------

    async def append_flag(self, event: pb.FlagEvent) -> str:
        """XADD to the tenant's capped stream and return the id Redis assigned; while Redis is down the
        event waits in the backlog and '' is returned."""
        check_tenant(event.tenant)
        ev = pb.FlagEvent()
        ev.CopyFrom(event)
        ev.ClearField("event_id")
        if self._backlog:
            self._buffer(self._backlog.add_flag(ev))
            return ""
        ids: list[str] = []
        async with self._writing("flag write") as down:
            ids = await ops.write_flags(self._r, [ev], self._flags_maxlen, self._ttl_ms)
            self._flags_written += 1
        if down:
            self._buffer(self._backlog.add_flag(ev))
            return ""
        return ids[0] if ids else ""

    async def flags_since(
        self, tenant: str = "", after_id: str = "", limit: int = 100, block_s: float = 0.0
    ) -> list[pb.FlagEvent]:
        """XRANGE after ``after_id``; when that is empty and ``block_s`` > 0, XREAD BLOCK for new ones."""
        check_tenant(tenant)
        check_flags_args(after_id, limit, block_s)
        k = ops.key(tenant, "flags")
        async with self._reading("flags_since"):
            await self._flush_first()
            if after_id != "$":
                entries = await self._r.xrange(k, min=f"({after_id}" if after_id else "-", count=limit)
                if entries or block_s <= 0:
                    return ops.parse_events(entries or [])
            elif block_s <= 0:
                return []
            start = time.monotonic()
            try:  # a slot for a blocking connection: at most max_blocking reads wait at once
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (flags.watch)
                async with asyncio.timeout(block_s):
                    await self._block_slots.acquire()
            except TimeoutError:
                return []  # as if nothing came in block_s; the caller's next read catches up
            try:
                block_ms = max(1, round((block_s - (time.monotonic() - start)) * 1000))
                res = await self._blocking.xread({k: after_id or "0-0"}, count=limit, block=block_ms)
            finally:
                self._block_slots.release()
        # RESP2 answers [[key, entries]], RESP3 {key: entries}; None on timeout.
        streams: Iterable[Any] = res.values() if isinstance(res, dict) else (e for _, e in res or [])
        return ops.parse_events(itertools.chain.from_iterable(streams))

    # ---- health, stats, lifecycle ----------------------------------------------------------------

    async def ping(self) -> bool:
        """True when Redis answers PING now."""
        try:
            await self._r.ping()
        except (RedisError, OSError):
            return False
        return True

    def stats(self) -> StoreStats:
        """Counters since creation; backlog sizes are current values."""
        return StoreStats(
            backend="redis",
            records_written=self._written,
            flags_written=self._flags_written,
            backlog_records=self._backlog.n_records,
            backlog_flags=self._backlog.n_flags,
            backlog_dropped=self._backlog.dropped,
            errors=self._errors,
            available=self._available,
        )

    async def close(self) -> None:
        """Finish the group commit in flight, stop the reconnect task, try one last flush (2 s at most),
        close the connection pool."""
        if self._committer is not None:
            with contextlib.suppress(Exception):  # its writers were told
                await self._committer
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnector
            self._reconnector = None
        if self._backlog:
            try:
                await asyncio.wait_for(self._flush(), timeout=2.0)
            except (RedisError, OSError):
                records, flags = self._backlog.clear()
                logger.warning(
                    "closing with Redis at %s unreachable: %d records and %d flag events lost",
                    self._where, records, flags,
                )  # fmt: skip
        await self._r.aclose()
        if self._blocking is not self._r:
            await self._blocking.aclose()

    # ---- outage handling ---------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Write the backlog out, oldest first; raises (leaving the rest queued) if Redis fails again."""
        async with self._flush_lock:
            while batch := self._backlog.record_batch(_FLUSH_BATCH):
                await ops.write_records(self._r, batch, self._ttl_ms, self._refreshed)
                self._backlog.records_done(batch)
                self._written += len(batch)
            while events := self._backlog.flag_batch(_FLUSH_BATCH):
                await ops.write_flags(self._r, events, self._flags_maxlen, self._ttl_ms)
                self._backlog.flags_done(events)
                self._flags_written += len(events)
        if not self._available:
            self._available = True
            logger.info("Redis at %s reachable again; backlog flushed", self._where)

    async def _flush_first(self) -> None:
        """Reads see everything written before them: flush the backlog first (raises if still down)."""
        if self._backlog:
            await self._flush()

    def _buffer(self, kept_all: bool) -> None:
        if not kept_all and self._backlog.dropped == 1:
            logger.warning("Redis backlog full: dropping the oldest buffered entries (counted in stats)")
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = self._retry_s
        while self._backlog and not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._flush()
            except _DOWN_ERRORS:
                self._errors += 1
                delay = min(delay * 2, self._retry_max_s)
            except RedisError:
                self._errors += 1
                logger.exception("flushing the Redis backlog failed; retrying in %.1f s", self._retry_max_s)
                delay = self._retry_max_s

    def _went_down(self, e: BaseException) -> None:
        self._errors += 1
        if self._available:
            logger.warning("Redis at %s unreachable (%s); buffering writes in memory", self._where, e)
        self._available = False

    @contextlib.asynccontextmanager
    async def _writing(self, what: str) -> AsyncIterator[list[BaseException]]:
        """Run a write: yields a list that holds the error if Redis was unreachable (then buffer)."""
        down: list[BaseException] = []
        try:
            yield down
        except _DOWN_ERRORS as e:
            self._went_down(e)
            down.append(e)
        except RedisError as e:
            self._errors += 1
            raise StoreUnavailable(f"Redis at {self._where} refused the {what}: {e}") from e
        else:
            self._available = True

    @contextlib.asynccontextmanager
    async def _reading(self, what: str) -> AsyncIterator[None]:
        """Map Redis failures during a read to ``StoreUnavailable`` (gRPC UNAVAILABLE: retry later)."""
        try:
            yield
        except _DOWN_ERRORS as e:
            self._went_down(e)
            raise StoreUnavailable(f"Redis at {self._where} is unreachable ({what}); retry later") from e
        except RedisError as e:
            self._errors += 1
            raise StoreUnavailable(f"Redis at {self._where} failed during {what}: {e}") from e
        self._available = True
