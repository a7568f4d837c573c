"""The WatchFlags feed's store tail (service/server/flags.py) ends with its watcher, even when a cancel is
swallowed on the way, as redis-py's sends swallow one now and then on Python 3.11."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import pytest

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.server.flags import FlagHub, WatchFilter, watch
from residue_monitor.service.store import Store

pytestmark = pytest.mark.asyncio


class SwallowingStore:
    """A flag stream that never has events and whose blocking read, when cancelled, finishes normally: what
    asyncio.wait_for does on Python 3.11 when the cancel lands as the future it waits on completes."""

    def __init__(self) -> None:
        self.reads = 0
        self.swallowed = 0
        self.broken = False
        """Set by the test when done: the next read raises, ending a tail that would read forever."""

    async def flags_since(
        self, tenant: str = "", after_id: str = "", limit: int = 100, block_s: float = 0.0
    ) -> list[pb.FlagEvent]:
        if self.broken:
            raise RuntimeError("test over")
        self.reads += 1
        try:
            await asyncio.sleep(block_s)
        except asyncio.CancelledError:
            self.swallowed += 1
            await asyncio.sleep(0.01)  # the read in hand completes; the cancel is gone
        return []


async def _until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


async def test_watch_ends_its_tail_and_unsubscribes_when_the_tails_cancel_is_swallowed() -> None:
    hub = FlagHub()
    store = SwallowingStore()
    events = watch(hub, cast(Store, store), WatchFilter(), tail_store=True)
    pending = asyncio.ensure_future(anext(events))
    await _until(lambda: hub.watchers == 1 and store.reads >= 1)
    pending.cancel()  # the client hung up: gRPC cancels the handler
    try:
        await asyncio.wait({pending}, timeout=5.0)
        assert pending.done(), "the watch still waits for its tail, which reads on"
        assert store.swallowed == 1
        assert hub.watchers == 0
        reads = store.reads
        await asyncio.sleep(0.1)
        assert store.reads == reads, "the tail stopped reading"
    finally:
        store.broken = True
