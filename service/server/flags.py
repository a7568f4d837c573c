"""The live flag feed behind WatchFlags: an in-process hub, plus replay from the store on resume.

Flags are appended to the store (durable, shared by replicas) *and* published to the hub, so a watcher
sees a flag the moment it is raised, also while Redis is down. A watcher that passes ``after_event_id``
first gets the retained events after it from the store, then the live ones (an event seen in both is
delivered once). Live events carry no ``event_id``: the store assigns ids inside ``append_flag``, which
does not return them; a client that needs to resume exactly should use the ids of replayed events.

Each watcher has a bounded queue; one that falls ``max_queue`` events behind is ended with
RESOURCE_EXHAUSTED instead of growing without bound. ``close()`` (graceful shutdown) ends every watch
cleanly, so draining does not wait the whole grace period for watchers that never hang up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.errors import LimitExceeded
from residue_monitor.service.store import Store
from residue_monitor.service.store.base import MAX_FLAG_BATCH, parse_event_id

logger = logging.getLogger(__name__)

_CLOSED = object()
_OVERFLOW = object()


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which flag events a watcher wants; every set condition must hold."""

    tenant: str = ""
    model: str = ""
    fingerprint: str = ""
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
            and (not self.fingerprint or ev.fingerprint == self.fingerprint)
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


async def watch(hub: FlagHub, store: Store, flt: WatchFilter) -> AsyncIterator[pb.FlagEvent]:
    """Replay (when ``flt.after_event_id`` is set) then live events matching ``flt``."""
    sub = hub.subscribe(flt)  # before the replay, so nothing raised meanwhile is missed
    try:
        replayed: set[tuple[str, str, str, int, int]] = set()
        cursor = flt.after_event_id
        while cursor:
            batch = await store.flags_since(flt.tenant, cursor, limit=MAX_FLAG_BATCH)
            for ev in batch:
                if flt.matches(ev):
                    replayed.add(_key(ev))
                    yield ev
            cursor = batch[-1].event_id if len(batch) == MAX_FLAG_BATCH else ""
        async for ev in sub.events():
            if replayed and _key(ev) in replayed:
                replayed.discard(_key(ev))
                continue
            yield ev
    finally:
        sub.close()
