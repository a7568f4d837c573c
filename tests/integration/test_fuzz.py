"""Hostile input against every RPC (a CI-sized run of ``benchmarks/fuzz.py``, which sends ≥ 100,000
messages): mutated and crafted protobuf bytes, NaN values, giant repeated fields, invalid UTF-8, deep
pagination, random bytes. Every call ends with a documented status and the sidecar keeps serving, and the
requests it had stored are unharmed."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.fuzz import run
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.frames import request_messages
from residue_monitor.service.server import ServerConfig, Sidecar
from residue_monitor.service.store import MemoryStore

pytestmark = pytest.mark.asyncio


async def test_fuzzed_rpcs_get_documented_statuses(
    tiny_hf: tuple[Any, Any], clt: CrossLayerTranscoder, caplog: pytest.LogCaptureFixture
) -> None:
    model, tok = tiny_hf
    requests = [request_messages(model, tok, clt, p, f"req-{i}", model_name="tiny", max_new_tokens=8)
                for i, p in enumerate(["Hello there", "Where is the key?"])]  # fmt: skip
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_s=1.0, drain_delay_s=0.0)
    sidecar = Sidecar(cfg, store=MemoryStore(), clt=clt)
    await sidecar.start()
    try:
        target = f"127.0.0.1:{sidecar.port}"
        async with aio.insecure_channel(target) as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            await stub.Ingest(iter(requests[0]))
            before = await stub.GetResidue(pb.GetResidueRequest(request_id="req-0"))
        result = await run(target, 600, seed=1, requests=requests)
        assert result["failures"] == [], result["failures"][:5]
        internal = [
            r for r in caplog.records if r.levelno >= logging.ERROR and "failed (ref" in r.getMessage()
        ]
        assert internal == [], [r.getMessage() for r in internal[:3]]  # no unexpected error in the sidecar
        assert sum(sum(c.values()) for c in result["statuses"].values()) == 600
        assert set(result["statuses"]) == {"Ingest", "GetResidue", "QueryResidues", "WatchFlags",
                                           "ListFingerprints", "Trace"}  # fmt: skip
        async with aio.insecure_channel(target) as ch:
            ok = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())  # type: ignore[arg-type]
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
            after = await pb_grpc.ResidueServiceStub(ch).GetResidue(pb.GetResidueRequest(request_id="req-0"))
        assert after == before
    finally:
        await sidecar.stop()
