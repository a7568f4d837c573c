"""GetResidue calls that wait for a record (``GetResidueRequest.wait_ms``): the pipeline wakes them the
moment it stores a request's record, so a gateway asks once per request instead of polling.

Records stored by another replica (a shared Redis) wake nobody here: a waiting call also looks at the
store again every ``RECHECK_S``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator

RECHECK_S = 0.05
"""How often a waiting call looks at the store again without being woken (records of other replicas)."""
MAX_WAIT_MS = 60_000
"""The longest ``wait_ms`` a GetResidue call may ask for."""


class RecordWaiters:
    """Per (tenant, request id): the events of the calls waiting for its record. Event-loop only."""

    def __init__(self) -> None:
        self._events: collections.defaultdict[tuple[str, str], set[asyncio.Event]] = collections.defaultdict(
            set
        )

    def __len__(self) -> int:
        """Requests with at least one waiting call."""
        return len(self._events)

    def notify(self, tenant: str, request_id: str) -> None:
        """A record of this request was stored: wake its waiting calls."""
        for ev in self._events.get((tenant, request_id), ()):
            ev.set()

    @contextlib.contextmanager
    def watch(self, tenant: str, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when this request's record is stored, registered until the block ends.
        Register *before* looking at the store, so a record stored in between is not missed."""
        key = (tenant, request_id)
        ev = asyncio.Event()
        self._events[key].add(ev)
        try:
            yield ev
        finally:
            waiting = self._events.get(key)
            if waiting is not None:
                waiting.discard(ev)
                if not waiting:
                    del self._events[key]
