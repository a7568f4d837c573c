"""The prefill forecast live in the sidecar (issue 13): a request's PROMPT_LAST frame is scored when it
arrives, readable over GetResidue before the request ends, flagged on WatchFlags and in the metrics, and
carried into the final record; requests without one say why.

In-process sidecar on port 0 with real aio clients and real tiny-model frames; the forecast has random
weights for the tiny CLT (the plumbing does not depend on what the weights learned).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import ArtifactMismatch, InvalidInput
from residue_monitor.detectors.forecast import FLAG_NAME, save_forecast
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.frames import request_messages
from residue_monitor.service.server import ServerConfig, Sidecar
from residue_monitor.service.server.forecasting import IN_FLIGHT, NO_FRAME, NO_MODEL, Forecaster
from residue_monitor.service.store import MemoryStore
from tests.integration.residue_data import prompt_row, random_forecast
from tests.integration.test_server import PROMPTS, Messages, _eventually, _until, frames_of, renamed

pytestmark = pytest.mark.asyncio
CAPTURED = 1_790_000_000.25  # the prompt frame's captured_time (Unix s)


@pytest.fixture(scope="module")
def requests(tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder) -> list[Messages]:
    """Four whole tiny-model requests (start, packed frames, end), as the plugin sends them."""
    model, tok = tiny_hf
    return [
        request_messages(model, tok, clt, p, f"req-{i}", max_new_tokens=10) for i, p in enumerate(PROMPTS[:4])
    ]


def stamped(msgs: Messages) -> Messages:
    """The messages with the PROMPT_LAST frame's captured_time set, as the plugin sends it."""
    out = [pb.IngestMessage() for _ in msgs]
    for o, m in zip(out, msgs, strict=True):
        o.CopyFrom(m)
        if o.HasField("frame") and o.frame.phase == pb.PHASE_PROMPT_LAST:
            o.frame.captured_time.FromNanoseconds(round(CAPTURED * 1e9))
    return out


class OpenStream:
    """An Ingest stream the test feeds message by message (so it can read while a request is open)."""

    def __init__(self, stub: pb_grpc.ResidueServiceStub) -> None:
        self.q: asyncio.Queue[pb.IngestMessage | None] = asyncio.Queue()

        async def gen() -> AsyncIterator[pb.IngestMessage]:
            while (m := await self.q.get()) is not None:
                yield m

        self.call = stub.Ingest(gen())

    async def send(self, msgs: Messages) -> None:
        for m in msgs:
            await self.q.put(m)

    async def close(self) -> pb.IngestSummary:
        await self.q.put(None)
        return await self.call


async def start(clt: CrossLayerTranscoder | None, forecaster: Forecaster | None, **cfg: Any) -> Sidecar:
    """A sidecar on port 0; ``clt`` None: no transcoder loaded (frames are checked against generic limits)."""
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "drain_delay_s": 0.0}
    sidecar = Sidecar(ServerConfig(**(settings | cfg)), store=MemoryStore(), clt=clt, forecaster=forecaster)
    await sidecar.start()
    return sidecar


def split_at_prompt(msgs: Messages) -> tuple[Messages, Messages]:
    """(start + frames up to and including PROMPT_LAST, the rest)."""
    i = next(i for i, m in enumerate(msgs) if m.HasField("frame") and m.frame.phase == pb.PHASE_PROMPT_LAST)
    return msgs[: i + 1], msgs[i + 1 :]


async def test_forecast_is_readable_before_the_request_ends_and_kept_in_the_record(
    clt: CrossLayerTranscoder, requests: list[Messages]
) -> None:
    fc = random_forecast(clt, threshold=1.0)  # never flags
    sidecar = await start(clt, Forecaster(fc))
    try:
        msgs = stamped(requests[0])
        rid = msgs[0].start.request_id
        head, tail = split_at_prompt(msgs)
        async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            stream = OpenStream(stub)
            await stream.send(head)
            rec = await _eventually(lambda: stub.GetResidue(pb.GetResidueRequest(request_id=rid)))
            # In flight: the forecast is there, nothing else of the generation yet.
            assert not rec.complete and rec.incomplete_reason == IN_FLIGHT
            assert rec.prefill_forecast.WhichOneof("result") == "score"
            sc = rec.prefill_forecast.score
            assert sc.probability == pytest.approx(fc.predict_row(prompt_row(msgs, clt)), rel=1e-9)
            assert sc.threshold == 1.0 and not sc.flagged and sc.forecast_id == fc.id
            assert sc.prefill_time.ToNanoseconds() == round(CAPTURED * 1e9)
            assert abs(sc.scored_time.ToNanoseconds() / 1e9 - time.time()) < 60
            assert rec.prefill_signature.frame_count == 1 and rec.signature.frame_count == 0
            assert FLAG_NAME not in rec.flags
            await stream.send(tail)
            summary = await stream.close()
            assert summary.requests_ended == 1
            final = await stub.GetResidue(pb.GetResidueRequest(request_id=rid))
            assert final.complete and final.incomplete_reason == ""
            assert final.prefill_forecast == rec.prefill_forecast  # the live forecast, scored once
            assert final.signature.frame_count == len(frames_of(msgs))
        snap = sidecar.stats.snapshot()
        assert sum(snap.prefill_risk.counts) == 1 and snap.prefill_flags == 0
    finally:
        await sidecar.stop(grace_s=0.5, drain_delay_s=0.0)


async def test_a_forecast_over_threshold_is_flagged_live_once(
    clt: CrossLayerTranscoder, requests: list[Messages]
) -> None:
    """Threshold 0: every forecast flags. The WatchFlags event (filter fingerprint=prefill_forecast) arrives
    while the request is still open; the final record carries the flag; the store holds one event."""
    sidecar = await start(clt, Forecaster(random_forecast(clt, threshold=0.0)))
    try:
        msgs = stamped(requests[2])
        rid = msgs[0].start.request_id
        head, tail = split_at_prompt(msgs)
        async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            watch = stub.WatchFlags(pb.WatchFlagsRequest(fingerprint=FLAG_NAME))
            await _until(lambda: sidecar.hub.watchers == 1)
            stream = OpenStream(stub)
            await stream.send(head)
            ev = await asyncio.wait_for(watch.read(), 5.0)
            assert isinstance(ev, pb.FlagEvent)
            assert (ev.request_id, ev.flag, ev.fingerprint, ev.threshold) == (rid, FLAG_NAME, "", 0.0)
            assert ev.event_id and 0 <= ev.score <= 1
            assert sidecar.pipeline is not None and rid in sidecar.pipeline.state.open  # not ended yet
            await stream.send(tail)
            await stream.close()
            final = await stub.GetResidue(pb.GetResidueRequest(request_id=rid))
            assert final.complete and FLAG_NAME in final.flags and final.prefill_forecast.score.flagged
            watch.cancel()
        events = await sidecar.store.flags_since("", "", limit=100)
        assert [e.flag for e in events if e.request_id == rid].count(FLAG_NAME) == 1  # raised once, live
        assert sidecar.stats.snapshot().prefill_flags == 1
    finally:
        await sidecar.stop(grace_s=0.5, drain_delay_s=0.0)


async def test_no_forecast_says_why(clt: CrossLayerTranscoder, requests: list[Messages]) -> None:
    """No model loaded; no PROMPT_LAST frame; a request of another CLT (a sidecar with no transcoder of its
    own accepts it): the record holds the reason, never a score."""
    fc = random_forecast(clt, threshold=0.5)
    no_model = await start(clt, None)
    with_model = await start(clt, Forecaster(fc))
    no_clt = await start(None, Forecaster(fc))
    try:
        no_prompt = [
            m for m in renamed(requests[1], "no-prompt")
            if not (m.HasField("frame") and m.frame.phase == pb.PHASE_PROMPT_LAST)
        ]  # fmt: skip
        other_clt = renamed(requests[3], "other-clt")
        other_clt[0].start.clt_id = "another-transcoder"
        for sc, msgs, reason in (
            (no_model, requests[0], NO_MODEL),
            (with_model, no_prompt, NO_FRAME),
            (no_clt, other_clt, "another-transcoder"),
        ):
            async with aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
                stub = pb_grpc.ResidueServiceStub(ch)
                await stub.Ingest(iter(msgs))
                rec = await stub.GetResidue(pb.GetResidueRequest(request_id=msgs[0].start.request_id))
                assert rec.complete and rec.prefill_forecast.WhichOneof("result") == "unavailable_reason"
                assert reason in rec.prefill_forecast.unavailable_reason
                assert FLAG_NAME not in rec.flags
    finally:
        for sc in (no_model, with_model, no_clt):
            await sc.stop(grace_s=0.5, drain_delay_s=0.0)


async def test_forecast_artifacts_are_checked_at_start(clt: CrossLayerTranscoder, tmp_path: Path) -> None:
    """RESIDUE_FORECAST for another CLT or a corrupt file: the sidecar refuses to start, naming why."""
    good = save_forecast(tmp_path / "good.json", random_forecast(clt, 0.5))
    sidecar = await start(clt, None, forecast_path=str(good))
    assert sidecar.forecaster is not None and sidecar.forecaster.id == random_forecast(clt, 0.5).id
    await sidecar.stop(grace_s=0.5, drain_delay_s=0.0)
    other = save_forecast(tmp_path / "other.json", random_forecast(clt, 0.5, clt_id="another-clt"))
    with pytest.raises(ArtifactMismatch, match="another-clt"):
        await start(clt, None, forecast_path=str(other))
    with pytest.raises(ArtifactMismatch, match="another-clt"):
        await start(clt, Forecaster(random_forecast(clt, 0.5, clt_id="another-clt")))
    doc = json.loads(good.read_text())
    doc["weights"] = doc["weights"][:3]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match=r"bad\.json"):
        await start(clt, None, forecast_path=str(tmp_path / "bad.json"))


async def test_a_waiting_get_residue_answers_when_the_forecast_is_stored(
    clt: CrossLayerTranscoder, requests: list[Messages]
) -> None:
    """``wait_ms``: a gateway asks once, before the plugin has sent anything; the answer is the provisional
    record with the forecast, as soon as it is stored (woken, not found by polling)."""
    sidecar = await start(clt, Forecaster(random_forecast(clt, threshold=1.0)))
    try:
        msgs = stamped(renamed(requests[1], "waited"))
        head, tail = split_at_prompt(msgs)
        async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            asked = asyncio.ensure_future(
                stub.GetResidue(pb.GetResidueRequest(request_id="waited", wait_ms=20_000))
            )
            assert sidecar.pipeline is not None
            await _until(lambda: len(sidecar.pipeline.waiters) == 1)  # pyright: ignore[reportOptionalMemberAccess]
            assert not asked.done()
            stream = OpenStream(stub)
            t0 = time.monotonic()
            await stream.send(head)
            rec = await asyncio.wait_for(asked, 5.0)
            assert time.monotonic() - t0 < 1.0
            assert rec.incomplete_reason == IN_FLIGHT and rec.prefill_forecast.WhichOneof("result") == "score"
            assert len(sidecar.pipeline.waiters) == 0  # the waiter is gone with its call
            await stream.send(tail)
            await stream.close()
            # A record that exists is answered at once, waiting or not.
            final = await stub.GetResidue(
                pb.GetResidueRequest(request_id="waited", wait_ms=60_000), timeout=5
            )
            assert final.complete
    finally:
        await sidecar.stop(grace_s=0.5, drain_delay_s=0.0)


async def test_a_waiting_get_residue_sees_records_of_other_replicas_and_times_out(
    clt: CrossLayerTranscoder, requests: list[Messages]
) -> None:
    """A record written to the store by someone else (another replica) wakes nobody here: the waiting call
    finds it by looking again. No record: NOT_FOUND after wait_ms, or before the caller's deadline. Over
    the limit: INVALID_ARGUMENT."""
    sidecar = await start(clt, None)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            t0 = time.monotonic()
            with pytest.raises(aio.AioRpcError) as nf:
                await stub.GetResidue(pb.GetResidueRequest(request_id="never", wait_ms=300))
            assert nf.value.code() == grpc.StatusCode.NOT_FOUND and 0.25 < time.monotonic() - t0 < 3.0
            t0 = time.monotonic()
            with pytest.raises(aio.AioRpcError) as early:
                await stub.GetResidue(pb.GetResidueRequest(request_id="never", wait_ms=60_000), timeout=0.5)
            assert early.value.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() - t0 < 3.0
            with pytest.raises(aio.AioRpcError) as big:
                await stub.GetResidue(pb.GetResidueRequest(request_id="never", wait_ms=60_001))
            assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "wait_ms" in (
                big.value.details() or ""
            )

            asked = asyncio.ensure_future(
                stub.GetResidue(pb.GetResidueRequest(request_id="elsewhere", wait_ms=20_000))
            )
            await _until(lambda: len(sidecar.pipeline.waiters) == 1)  # pyright: ignore[reportOptionalMemberAccess]
            rec = pb.ResidueRecord(request_id="elsewhere", model="m", complete=True)
            await sidecar.store.put_record(rec)  # behind the pipeline's back
            got = await asyncio.wait_for(asked, 5.0)
            assert got.request_id == "elsewhere" and got.complete
    finally:
        await sidecar.stop(grace_s=0.5, drain_delay_s=0.0)
