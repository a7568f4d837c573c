"""The assembler's step function, replayed: order, duplicates, orphans, expiry, bounds (STYLE.md rule 3).

Events are built from real wire messages (``service.frames`` packing → ``validate.to_event``) with
synthetic but well-formed statistics, so these tests need no model and run in milliseconds.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from residue_monitor.detectors.exceptions import InvalidInput, NotFound
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.frames import frame_message, pack_ids, pack_values
from residue_monitor.service.server.assembler import (
    Accepted,
    AssemblerLimits,
    AssemblerState,
    Dropped,
    Finalized,
    Held,
    Output,
    Refused,
    replay,
    step,
)
from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.convert import record_proto
from residue_monitor.service.server.events import End, Event, Flush, Start, Tick
from residue_monitor.service.server.record import score_request, summarize
from residue_monitor.service.server.scoring import (
    BUILTIN_SCORERS,
    PromptErrorRatio,
    Registry,
    default_scorers,
)
from residue_monitor.service.server.validate import FrameLimits, to_event

N_LAYERS, N_FEATURES = 4, 64
LIMITS = FrameLimits(n_layers=N_LAYERS, n_features=N_FEATURES)
ALIMITS = AssemblerLimits(
    max_open_requests=4, max_frames_per_request=8, idle_expiry_s=10.0, orphan_grace_s=2.0
)


def frame(rid: str, seq: int, phase: str = "decode", err: float = 0.5, position: int | None = None) -> Event:
    """A valid frame event: 4 layers × 3 features, error ratio ``err`` + 0.1 × layer."""
    rng = np.random.default_rng(seq)
    layers = [
        pb.LayerResidue(
            layer=i,
            feature_ids=pack_ids(rng.choice(N_FEATURES, 3, replace=False)),
            feature_values=pack_values(np.sort(rng.random(3))[::-1] + 0.1),
            l0=3 + i,
            mass=1.5 * (i + 1),
            error_ratio=err + 0.1 * i,
            in_norm=2.0,
            out_norm=1.0,
        )
        for i in range(N_LAYERS)
    ]
    pos = 10 + seq if position is None else position
    return to_event(frame_message(rid, pos, phase, seq, layers), LIMITS)  # type: ignore[arg-type]


def request(rid: str, n_decode: int = 3, model: str = "m") -> list[Event]:
    """start, PROMPT_LAST, n_decode DECODE, FINAL, end."""
    frames = [frame(rid, 0, "prompt_last", err=0.2)]
    frames += [frame(rid, i, "decode", err=0.4 + 0.1 * i) for i in range(1, n_decode + 1)]
    frames.append(frame(rid, n_decode + 1, "final", err=0.9))
    return [Start(rid, model=model, start_time=1_700_000_000.0), *frames, End(rid, finish_reason=1)]


def finalized(outputs: list[Output]) -> list[Finalized]:
    return [o for o in outputs if isinstance(o, Finalized)]


def timed(events: list[Event], t0: float = 0.0) -> list[tuple[float, Event]]:
    return [(t0 + 0.01 * i, e) for i, e in enumerate(events)]


def test_out_of_order_and_duplicates_give_the_in_order_record() -> None:
    """Shuffled frames with repeats (by sequence and by position+phase) assemble to the same record."""
    events = request("r1", n_decode=5)
    start, frames, end = events[0], events[1:-1], events[-1]
    shuffled = frames + frames[:3]  # exact repeats
    random.Random(7).shuffle(shuffled)
    _, in_order = replay(timed(events), ALIMITS)
    _, out = replay(timed([start, *shuffled, end]), ALIMITS)
    a, b = finalized(in_order)[0].request, finalized(out)[0].request
    assert [f.sequence for f in b.frames] == list(range(7))
    assert b.duplicates == 3 and a.duplicates == 0
    scorers = default_scorers(ServerConfig())
    rec_a, rec_b = record_proto(score_request(a, scorers)), record_proto(score_request(b, scorers))
    assert (rec_a.frames_duplicate, rec_b.frames_duplicate) == (0, 3)  # the record says what was dropped
    rec_b.frames_duplicate = 0
    assert rec_a.SerializeToString(deterministic=True) == rec_b.SerializeToString(deterministic=True)
    dropped = [o for o in out if isinstance(o, Dropped)]
    assert [d.reason for d in dropped] == ["duplicate"] * 3


def test_same_row_under_a_new_sequence_is_a_duplicate() -> None:
    """A resent row with a fresh sequence number (plugin restart) is recognized by (position, phase)."""
    ev = [Start("r"), frame("r", 0, "prompt_last", position=5), frame("r", 9, "prompt_last", position=5)]
    _, out = replay(timed(ev), ALIMITS)
    assert isinstance(out[-1], Dropped) and out[-1].reason == "duplicate"


def test_request_without_end_expires_as_incomplete_and_late_messages_are_dropped() -> None:
    """After idle_expiry_s without a message the request is finalized incomplete, with the reason; a
    frame or end arriving later is dropped as late and does not reopen it."""
    events = request("r1")[:-1]
    state, out = replay(timed(events), ALIMITS)
    assert not finalized(out)
    state, out = step(state, Tick(), 9.0, ALIMITS)
    assert not finalized(out), "not idle long enough yet"
    state, out = step(state, Tick(), 10.1, ALIMITS)
    (fin,) = finalized(out)
    assert not fin.request.complete and "expired" in fin.request.incomplete_reason
    assert len(fin.request.frames) == 5
    state, out = step(state, End("r1"), 10.2, ALIMITS)
    assert [type(o) for o in out] == [Dropped] and out[0].reason == "late"  # type: ignore[union-attr]
    state, out = step(state, Start("r1"), 10.3, ALIMITS)
    assert isinstance(out[0], Dropped) and out[0].reason == "late"
    assert not state.open


def test_frames_before_their_start_are_held_then_replayed() -> None:
    """Orphan frames wait orphan_grace_s for their RequestStart and join the request when it comes."""
    ev = request("r1")
    reordered = [*ev[1:3], ev[0], *ev[3:]]
    _, out = replay(timed(reordered), ALIMITS)
    assert isinstance(out[0], Held) and isinstance(out[1], Held)
    (fin,) = finalized(out)
    assert [f.sequence for f in fin.request.frames] == [0, 1, 2, 3, 4]


def test_orphans_without_start_are_dropped_as_unknown_request() -> None:
    """Frames of a request that never starts are dropped, counted, after the grace period."""
    state, out = replay(timed([frame("ghost", 0), frame("ghost", 1), End("ghost")]), ALIMITS)
    assert all(isinstance(o, Held) for o in out) and state.orphan_events == 3
    state, out = step(state, Tick(), 2.5, ALIMITS)
    (drop,) = out
    assert isinstance(drop, Dropped) and drop.reason == "unknown_request" and drop.frames == 2
    assert state.orphan_events == 0 and not state.orphans


def test_bounds_refuse_or_drop_without_touching_other_requests() -> None:
    """Over max_open_requests a start is refused; over max_frames_per_request frames are dropped; the
    requests already open assemble exactly as they would alone."""
    limits = AssemblerLimits(max_open_requests=2, max_frames_per_request=3)
    events: list[Event] = [Start("a"), Start("b"), Start("c")]
    state, out = replay(timed(events), limits)
    assert (
        isinstance(out[-1], Refused)
        and out[-1].why == "limit"
        and "RESIDUE_MAX_OPEN_REQUESTS" in out[-1].detail
    )
    assert set(state.open) == {"a", "b"}
    events = [frame("a", i, position=i) for i in range(5)] + [frame("b", 0), End("a"), End("b")]
    state, out = replay(timed(events, 1.0), limits, state)
    over = [o for o in out if isinstance(o, Dropped)]
    assert [(o.request_id, o.reason) for o in over] == [("a", "over_limit")] * 2
    fa, fb = (f.request for f in finalized(out))
    assert (len(fa.frames), fa.frames_over_limit) == (3, 2)
    assert (len(fb.frames), fb.frames_over_limit) == (1, 0)


def test_repeated_start_and_tenant_clash() -> None:
    """A repeated start of an open request is a counted duplicate; the same id from another tenant is
    refused (frames carry no tenant, so the two could not be told apart)."""
    _, out = replay(
        timed([Start("r", tenant="t1"), Start("r", tenant="t1"), Start("r", tenant="t2")]), ALIMITS
    )
    assert isinstance(out[0], Accepted)
    assert isinstance(out[1], Dropped) and out[1].reason == "duplicate"
    assert isinstance(out[2], Refused) and out[2].why == "conflict" and "t1" in out[2].detail


def test_flush_finalizes_every_open_request() -> None:
    """On shutdown, open requests become incomplete records and orphans are dropped."""
    state, _ = replay(timed([*request("a")[:-1], *request("b")[:2], frame("ghost", 0)]), ALIMITS)
    state, out = step(state, Flush(), 1.0, ALIMITS)
    fins = finalized(out)
    assert sorted(f.request.start.request_id for f in fins) == ["a", "b"]
    assert all("shut down" in f.request.incomplete_reason for f in fins)
    assert any(isinstance(o, Dropped) and o.request_id == "ghost" for o in out)
    assert state == AssemblerState(closed=state.closed)


def test_summaries_and_prompt_error_ratio_score() -> None:
    """Per-layer means are over all frames (overall) and the PROMPT_LAST frame (prefill); the scorer is
    the mean over layers at PROMPT_LAST."""
    _, out = replay(timed(request("r1", n_decode=2)), ALIMITS)
    req = finalized(out)[0].request
    outcome = score_request(req, default_scorers(ServerConfig(prompt_error_threshold=0.3)))
    errs = [0.2, 0.5, 0.6, 0.9]  # prompt_last, decode 1, decode 2, final
    assert outcome.overall.frame_count == 4 and outcome.prefill.frame_count == 1
    for s in outcome.overall.layers:
        assert s.mean_error_ratio == pytest.approx(np.mean(errs) + 0.1 * s.layer)
        assert s.mean_l0 == 3 + s.layer and s.mean_mass == pytest.approx(1.5 * (s.layer + 1))
    expected = 0.2 + 0.1 * np.mean(range(N_LAYERS))
    by_name = {r.name: r for r in outcome.results}
    assert by_name["prompt_error_ratio"].score == pytest.approx(expected)
    # The residue detectors score the same request (rebuilt as a signature from its frames).
    assert {"errors", "nullout"} <= set(by_name)
    assert "attention" not in by_name  # these frames carry no HeadStats: nothing to score
    assert by_name["errors"].score == pytest.approx(0.1 * (N_LAYERS - 1), abs=1e-6)  # last third − first
    assert outcome.flags[0].name == "prompt_error_ratio"  # 0.35 >= 0.3
    no_prompt = summarize([f for f in req.frames if f.phase == "decode"])
    assert no_prompt.frame_count == 2


def test_registry_shape() -> None:
    """Duplicate names raise; unknown names raise listing the known ones (STYLE.md rule 4)."""
    reg: Registry[int] = Registry("thing", {"a": 1})
    with pytest.raises(InvalidInput, match="already registered"):
        reg.register("a", 2)
    with pytest.raises(InvalidInput):
        reg.register("other", 3)
    with pytest.raises(NotFound, match="known: a"):
        reg.get("b")
    with pytest.raises(NotFound, match="prompt_error_ratio"):
        BUILTIN_SCORERS.get("nope")
    assert PromptErrorRatio(0.5).info.name in default_scorers(ServerConfig()).names()
