"""The live flag feed behind WatchFlags: an in-process hub, plus replay from the store on resume.

Flags are appended to the store (durable, shared by replicas) *and* published to the hub, so a watcher
sees a flag the moment it is raised, also while Redis is down. A watcher that passes ``after_event_id``
first gets the retained events after it from the store, then the live ones (an event seen in both is
delivered once). Live events carry the ``event_id`` the store assigned in ``append_flag`` (empty only
when the store was down and the event waits in its backlog), so a client can resume from any of them.

Replicas sharing a store (``tail_store``: a RedisStore behind several sidecars) also tail the store's flag
stream while a watch is open, so a watcher on one replica gets the flags raised by every replica. Its own
replica's flags then arrive twice (hub and store) and are delivered once, on whichever comes first; flags
tailed from the store carry their ``event_id``. Without ``after_event_id`` the tail starts
``TAIL_LOOKBACK_S`` before the watch opened by this host's clock (store ids are the store's clock in ms),
so a watcher also gets flags the other replicas raised just before it subscribed, and clock skew larger
than that between hosts and Redis can lose the other replicas' flags of the first moments. Each such
watcher holds one blocking store read (``TAIL_BLOCK_S``) at a time; while the store is down the tail
retries and the local hub keeps delivering.

Each watcher has a bounded queue; one that falls ``max_queue`` events behind is ended with
RESOURCE_EXHAUSTED instead of growing without bound. ``close()`` (graceful shutdown) ends every watch
cleanly, so draining does not wait the whole grace period for watchers that never hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from residue_monitor.detectors.exceptions import InvalidInput, ResidueError
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.errors import LimitExceeded
from residue_monitor.service.store import Store
from residue_monitor.service.store.base import MAX_FLAG_BATCH, parse_event_id

logger = logging.getLogger(__name__)

TAIL_BLOCK_S = 1.0
"""How long one tailing read of the store's flag stream waits for new events."""
TAIL_LOOKBACK_S = 1.0
"""Where a tail without ``after_event_id`` starts, before the watch opened."""
_SEEN_MAX = 4096
"""Keys of delivered events remembered for de-duplication, per watcher."""

_CLOSED = object()
_OVERFLOW = object()


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which flag events a watcher wants; every set condition must hold."""

    tenant: str = ""
    model: str = ""
    fingerprint: str = ""
    """A fingerprint name, or a flag name that no fingerprint raises (``prefill_forecast``)."""
    after_event_id: str = ""
    """Replay retained events after this id first ('' = live events only)."""

    def __post_init__(self) -> None:
        if self.after_event_id:
            try:
                parse_event_id(self.after_event_id)
            except InvalidInput as e:
                raise InvalidInput(
                    f"after_event_id: {e}; pass an event_id a replayed FlagEvent carried"
                ) from e

    def matches(self, ev: pb.FlagEvent) -> bool:
        return (
            ev.tenant == self.tenant
            and (not self.model or ev.model == self.model)
            and (not self.fingerprint or self.fingerprint in (ev.fingerprint, ev.flag))
        )


class Subscription:
    """One watcher's queue; iterate ``events()``; ``close()`` when done."""

    def __init__(self, hub: FlagHub, flt: WatchFilter, max_queue: int) -> None:
        self.filter = flt
        self._hub = hub
        self._max = max_queue
        self._q: asyncio.Queue[object] = asyncio.Queue()
        self._overflowed = False

    def offer(self, ev: pb.FlagEvent) -> None:
        if self._overflowed or not self.filter.matches(ev):
            return
        if self._q.qsize() >= self._max:
            self._overflowed = True
            self._q.put_nowait(_OVERFLOW)
            return
        self._q.put_nowait(ev)

    def end(self) -> None:
        self._q.put_nowait(_CLOSED)

    async def events(self) -> AsyncIterator[pb.FlagEvent]:
        """Live events until the hub closes; ``LimitExceeded`` if this watcher fell too far behind."""
        while True:
            item = await self._q.get()
            if item is _CLOSED:
                return
            if item is _OVERFLOW:
                raise LimitExceeded(
                    f"this watcher fell {self._max} flag events behind and was dropped; read faster, or "
                    "reconnect with after_event_id to replay retained events"
                )
            assert isinstance(item, pb.FlagEvent)
            yield item

    def close(self) -> None:
        self._hub.unsubscribe(self)


class FlagHub:
    """Fan-out of raised flags to live watchers (event-loop thread only, so no locks)."""

    def __init__(self, max_queue: int = 1024) -> None:
        self._subs: set[Subscription] = set()
        self._max_queue = max_queue
        self._closed = False

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def subscribe(self, flt: WatchFilter) -> Subscription:
        sub = Subscription(self, flt, self._max_queue)
        if self._closed:
            sub.end()
        else:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, ev: pb.FlagEvent) -> None:
        for sub in self._subs:
            sub.offer(ev)

    def close(self) -> None:
        """End every watch (graceful shutdown); later subscriptions end at once."""
        self._closed = True
        for sub in self._subs:
            sub.end()
        self._subs.clear()


def _key(ev: pb.FlagEvent) -> tuple[str, str, str, int, int]:
    return (ev.tenant, ev.request_id, ev.flag, ev.time.seconds, ev.time.nanos)


async def _tail(store: Store, sub: Subscription, cursor: str, stop: asyncio.Event) -> None:
    """Offer every event the store's flag stream gets after ``cursor`` to ``sub`` until ``stop`` is set
    (or the task is cancelled)."""
    tenant = sub.filter.tenant
    while not stop.is_set():
        try:
            batch = await store.flags_since(tenant, cursor, limit=MAX_FLAG_BATCH, block_s=TAIL_BLOCK_S)
        except ResidueError as e:  # the store is down: the hub still delivers this replica's flags
            logger.debug("tailing the flag stream failed (retrying): %s", e)
            await asyncio.sleep(TAIL_BLOCK_S)
            continue
        for ev in batch:
            sub.offer(ev)
        if batch:
            cursor = batch[-1].event_id


async def watch(
    hub: FlagHub, store: Store, flt: WatchFilter, *, tail_store: bool = False
) -> AsyncGenerator[pb.FlagEvent, None]:
    """Replay (when ``flt.after_event_id`` is set) then live events matching ``flt``: this replica's from
    the hub and, with ``tail_store``, every replica's from the store's flag stream (module docstring)."""
    sub = hub.subscribe(flt)  # before the replay, so nothing raised meanwhile is missed
    tail: asyncio.Task[None] | None = None
    stop_tail = asyncio.Event()
    seen: OrderedDict[tuple[str, str, str, int, int], None] = OrderedDict()

    def first_sighting(ev: pb.FlagEvent) -> bool:
        """True the first time an event is seen; the second sighting (hub + store) is forgotten."""
        key = _key(ev)
        if key in seen:
            del seen[key]
            return False
        seen[key] = None
        if len(seen) > _SEEN_MAX:
            seen.popitem(last=False)
        return True

    try:
        cursor = flt.after_event_id
        last_id = cursor
        while cursor:
            batch = await store.flags_since(flt.tenant, cursor, limit=MAX_FLAG_BATCH)
            for ev in batch:
                if flt.matches(ev) and first_sighting(ev):
                    yield ev
            if batch:
                last_id = batch[-1].event_id
            cursor = batch[-1].event_id if len(batch) == MAX_FLAG_BATCH else ""
        if tail_store:
            start = last_id or f"{max(0, int((time.time() - TAIL_LOOKBACK_S) * 1000))}-0"
            tail = asyncio.get_running_loop().create_task(_tail(store, sub, start, stop_tail))
        async for ev in sub.events():
            if first_sighting(ev):
                yield ev
    finally:
        if tail is not None:
            # A cancel alone may not end the tail: on Python 3.11, asyncio.wait_for returns the result
            # instead of raising when the cancel lands just as the future it waits on completes, and
            # redis-py waits on every send that way (measured: 5 of 389 cancelled blocking XREADs returned
            # normally). The tail then read on forever and its watcher stayed subscribed (the "known leak"
            # of tests/integration/test_scale_out.py). The flag ends the loop after the read in hand.
            stop_tail.set()
            tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tail
        sub.close()
