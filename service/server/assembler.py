"""Assemble per-request residue from a stream of events: ``step(state, event, now) -> (state, outputs)``.

STYLE.md rule 3: the only state is the explicit ``AssemblerState``; time comes in as an argument; the
function does no I/O. A replay test is a fold over a list of events. (``step`` updates the state object
in place and returns it: copying thousands of open requests per frame would cost more than the frame.)

What it tolerates, and how (DESIGN.md §5 asks the plugin for start → frames → end per request, but a
reconnecting plugin can repeat or reorder messages):

* **Duplicates**: a frame whose ``sequence``, or whose (position, phase), was already accepted for its
  request is dropped and counted; the first copy wins.
* **Out of order**: frames are kept by sequence and the record is computed from them sorted, so the
  arrival order never changes the record.
* **Frames before their RequestStart** (a start sent on another stream, or delayed): held as *orphans*
  for ``orphan_grace_s`` and replayed when the start arrives; after that they are dropped as
  ``unknown_request``. Holding them is bounded by ``max_orphan_events``.
* **Late messages** for a request already finalized (remembered for ``idle_expiry_s``) are dropped as
  ``late``; a repeated RequestStart does not reopen the request and overwrite its record.
* **Requests that never end**: after ``idle_expiry_s`` without a message they are finalized as
  incomplete, with the reason.
* **Bounds**: at most ``max_open_requests`` (one more start is refused: RESOURCE_EXHAUSTED upstream) and
  ``max_frames_per_request`` frames each (later frames dropped as ``over_limit``). Nothing one request
  sends can change another request's state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.events import (
    AssembledRequest,
    End,
    Event,
    Flush,
    Frame,
    Start,
    Tick,
)

DropReason = Literal["duplicate", "late", "unknown_request", "over_limit"]


@dataclass(frozen=True, slots=True)
class AssemblerLimits:
    """The assembler's bounds and timeouts (from ``ServerConfig``)."""

    max_open_requests: int = 4096
    max_frames_per_request: int = 256
    idle_expiry_s: float = 300.0
    orphan_grace_s: float = 5.0
    max_orphan_events: int = 4096
    """Frames and ends held, over all requests, while waiting for their RequestStart."""
    remember_closed: int = 16384
    """Finalized request ids remembered (for ``idle_expiry_s``) to recognize late messages."""

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> AssemblerLimits:
        return cls(
            max_open_requests=cfg.max_open_requests,
            max_frames_per_request=cfg.max_frames_per_request,
            idle_expiry_s=cfg.request_expiry_s,
            orphan_grace_s=cfg.orphan_grace_s,
            max_orphan_events=cfg.max_open_requests,
            remember_closed=4 * cfg.max_open_requests,
        )


@dataclass(slots=True)
class _Open:
    start: Start
    last_seen: float
    frames: dict[int, Frame] = field(default_factory=dict)  # by sequence
    rows: set[tuple[int, str]] = field(default_factory=set)  # (position, phase) accepted
    over_limit: int = 0
    duplicates: int = 0


@dataclass(slots=True)
class _Orphans:
    first_seen: float
    events: list[Frame | End] = field(default_factory=list)


@dataclass(slots=True)
class AssemblerState:
    """Everything the assembler remembers; keyed by request id (frames carry no tenant)."""

    open: OrderedDict[str, _Open] = field(default_factory=OrderedDict)  # least recently active first
    orphans: OrderedDict[str, _Orphans] = field(default_factory=OrderedDict)  # oldest first
    closed: OrderedDict[str, float] = field(default_factory=OrderedDict)  # id → finalized at; oldest first
    orphan_events: int = 0


@dataclass(frozen=True, slots=True)
class Accepted:
    """An event became part of its request."""

    request_id: str
    kind: Literal["start", "frame", "end"]
    frame: Frame | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """A frame or end waits for its RequestStart (orphan)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """An event was discarded; ``frames`` is how many frames that lost (0 for a start or an end)."""

    request_id: str
    reason: DropReason
    frames: int
    detail: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A RequestStart that cannot be accepted: over the open-request bound, or the id clashes."""

    request_id: str
    why: Literal["limit", "conflict"]
    detail: str


@dataclass(frozen=True, slots=True)
class Finalized:
    """A request is done (ended, expired or flushed): compute and store its record."""

    request: AssembledRequest


Output = Accepted | Held | Dropped | Refused | Finalized


def step(
    state: AssemblerState, event: Event, now: float, limits: AssemblerLimits
) -> tuple[AssemblerState, list[Output]]:
    """Apply one event at time ``now`` (seconds, any monotonic clock); returns the state and outputs."""
    out: list[Output] = []
    _expire(state, now, limits, out)
    if isinstance(event, Frame | End):
        _message(state, event, now, limits, out)
    elif isinstance(event, Start):
        _start(state, event, now, limits, out)
    elif isinstance(event, Flush):
        for rid in list(state.open):
            _finalize(state, rid, now, out, "the sidecar shut down before the request ended")
        for rid in list(state.orphans):
            _drop_orphans(state, rid, out, "the sidecar shut down before their RequestStart arrived")
    else:
        assert isinstance(event, Tick), event
    return state, out


def replay(
    events: Iterable[tuple[float, Event]], limits: AssemblerLimits, state: AssemblerState | None = None
) -> tuple[AssemblerState, list[Output]]:
    """Fold ``(now, event)`` pairs through ``step``; all outputs in order."""
    state = AssemblerState() if state is None else state
    outputs: list[Output] = []
    for now, event in events:
        state, out = step(state, event, now, limits)
        outputs += out
    return state, outputs


def _start(state: AssemblerState, s: Start, now: float, limits: AssemblerLimits, out: list[Output]) -> None:
    rid = s.request_id
    current = state.open.get(rid)
    if current is not None:
        if current.start.tenant != s.tenant:
            detail = (
                f"request_id {rid!r} is already open for tenant {current.start.tenant!r}; request ids "
                "must be unique among open requests because frames carry no tenant"
            )
            out.append(Refused(rid, "conflict", detail))
        else:
            out.append(Dropped(rid, "duplicate", 0, f"repeated RequestStart of open request {rid!r}"))
        return
    if rid in state.closed:
        out.append(Dropped(rid, "late", 0, f"RequestStart of request {rid!r}, which already ended"))
        return
    if len(state.open) >= limits.max_open_requests:
        detail = (
            f"{len(state.open)} requests are open, the limit (RESIDUE_MAX_OPEN_REQUESTS): end requests with "
            "RequestEnd, or raise the limit"
        )
        out.append(Refused(rid, "limit", detail))
        return
    state.open[rid] = _Open(s, now)
    out.append(Accepted(rid, "start"))
    held = state.orphans.pop(rid, None)
    if held is not None:
        state.orphan_events -= len(held.events)
        for ev in held.events:
            _message(state, ev, now, limits, out)


def _message(
    state: AssemblerState, ev: Frame | End, now: float, limits: AssemblerLimits, out: list[Output]
) -> None:
    rid = ev.request_id
    n_frames = 1 if isinstance(ev, Frame) else 0
    o = state.open.get(rid)
    if o is None:
        if rid in state.closed:
            out.append(Dropped(rid, "late", n_frames, f"request {rid!r} already ended"))
        elif state.orphan_events >= limits.max_orphan_events:
            detail = f"{state.orphan_events} messages already wait for their RequestStart; send starts first"
            out.append(Dropped(rid, "unknown_request", n_frames, detail))
        else:
            held = state.orphans.get(rid)
            if held is None:
                held = state.orphans[rid] = _Orphans(now)
            held.events.append(ev)
            state.orphan_events += 1
            out.append(Held(rid))
        return
    o.last_seen = now
    state.open.move_to_end(rid)
    if isinstance(ev, End):
        out.append(Accepted(rid, "end"))
        _finalize(state, rid, now, out, "", ev)
        return
    if ev.sequence in o.frames or (ev.position, ev.phase) in o.rows:
        o.duplicates += 1
        detail = f"frame {ev.sequence} (position {ev.position}, {ev.phase}) of {rid!r} was already received"
        out.append(Dropped(rid, "duplicate", 1, detail))
    elif len(o.frames) >= limits.max_frames_per_request:
        o.over_limit += 1
        detail = f"request {rid!r} already has {len(o.frames)} frames (RESIDUE_MAX_FRAMES_PER_REQUEST)"
        out.append(Dropped(rid, "over_limit", 1, detail))
    else:
        o.frames[ev.sequence] = ev
        o.rows.add((ev.position, ev.phase))
        out.append(Accepted(rid, "frame", ev))


def _finalize(
    state: AssemblerState, rid: str, now: float, out: list[Output], reason: str, end: End | None = None
) -> None:
    o = state.open.pop(rid)
    state.closed[rid] = now
    frames = tuple(o.frames[k] for k in sorted(o.frames))
    out.append(Finalized(AssembledRequest(o.start, frames, end, reason, o.over_limit, o.duplicates)))


def _drop_orphans(state: AssemblerState, rid: str, out: list[Output], why: str) -> None:
    held = state.orphans.pop(rid)
    state.orphan_events -= len(held.events)
    n = sum(isinstance(e, Frame) for e in held.events)
    out.append(Dropped(rid, "unknown_request", n, f"{len(held.events)} message(s) of {rid!r}: {why}"))


def _expire(state: AssemblerState, now: float, limits: AssemblerLimits, out: list[Output]) -> None:
    # Each map is ordered oldest first, so this stops at the first live entry: O(1) when nothing expires.
    while state.open:
        rid, o = next(iter(state.open.items()))
        if now - o.last_seen < limits.idle_expiry_s:
            break
        why = f"expired: no RequestEnd and no message for {limits.idle_expiry_s:g} s"
        _finalize(state, rid, now, out, why)
    while state.orphans:
        rid, held = next(iter(state.orphans.items()))
        if now - held.first_seen < limits.orphan_grace_s:
            break
        _drop_orphans(state, rid, out, f"no RequestStart within {limits.orphan_grace_s:g} s")
    while state.closed:
        rid, t = next(iter(state.closed.items()))
        if len(state.closed) <= limits.remember_closed and now - t < limits.idle_expiry_s:
            break
        del state.closed[rid]
